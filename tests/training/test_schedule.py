"""Learning-rate schedules (dist_egnn.training.schedule) and the weight average (dist_egnn.training.ema), alone."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from dist_egnn.training.ema import EMA
from dist_egnn.training.schedule import Schedule


def rates(name: str, steps: int = 8, evaluations: dict[int, float] | None = None, **kwargs) -> list[float]:
    """The lr of optimizer steps 0 .. steps-1 (plateau: ``evaluations`` maps a step to the val MSE seen after it)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = Schedule(optimizer, name, lr=1.0, **kwargs)
    out = []
    for n in range(steps):
        out.append(schedule.lr())
        optimizer.step()
        schedule.after_step()
        if evaluations and n in evaluations:
            schedule.after_evaluation(evaluations[n])
    return out


def test_constant_rate_without_warmup_leaves_the_optimizer_alone():
    # guards: the default (scheduler=none, no warmup) must train exactly as before the schedules existed
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    schedule = Schedule(optimizer, "none", lr=5e-4, total_steps=10)
    assert not schedule.active and "initial_lr" not in optimizer.param_groups[0]
    schedule.after_step()
    assert optimizer.param_groups[0]["lr"] == 5e-4


def test_warmup_then_cosine_to_min_lr():
    got = rates("cosine", steps=8, total_steps=6, warmup_steps=2, min_lr=0.1)
    assert got[:2] == pytest.approx([1 / 3, 2 / 3])                       # linear warmup: (n + 1) / (W + 1)
    assert got[2] == 1.0                                                   # full rate when warmup ends
    assert got[3] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert got[6:] == pytest.approx([0.1, 0.1])                            # stays at min_lr after the run's end


def test_exponential_with_floor():
    got = rates("exponential", steps=5, warmup_steps=1, gamma=0.5, min_lr=0.2)
    assert got == pytest.approx([0.5, 1.0, 0.5, 0.25, 0.2])


def test_plateau_drops_only_after_warmup_and_patience():
    # val MSE after steps 0..: 1.0 (during warmup: ignored), 1.0, 1.0 (no better twice with patience 1: drop)
    got = rates("plateau", steps=6, warmup_steps=2, plateau_patience=1, plateau_factor=0.5,
                evaluations={0: 1.0, 2: 1.0, 3: 1.0, 4: 1.0})
    assert got == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0, 0.5])


def test_schedule_state_resumes_exactly():
    # guards: a schedule rebuilt from its state_dict continues with the same rates as one that never stopped
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
        return optimizer, Schedule(optimizer, "cosine", lr=0.3, total_steps=7, warmup_steps=2, min_lr=0.01)

    optimizer, schedule = make()
    for _ in range(3):
        optimizer.step()
        schedule.after_step()
    state, opt_state = schedule.state_dict(), optimizer.state_dict()
    optimizer2, schedule2 = make()
    optimizer2.load_state_dict(opt_state)
    schedule2.load_state_dict(state)
    for _ in range(5):
        assert schedule2.lr() == schedule.lr()
        optimizer.step()
        optimizer2.step()
        schedule.after_step()
        schedule2.after_step()


def test_a_cosine_resumed_with_another_length_says_how_the_rate_jumps():
    """trainer.max_epochs may change on resume; a finished 10-step cosine (at min_lr 0) resumed as a 20-step run
    takes the 20-step run's rate at step 10 (0.5 of lr): a warning names both rates. The same length: silent."""
    def make(total_steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return optimizer, Schedule(optimizer, "cosine", lr=1.0, total_steps=total_steps)

    optimizer, schedule = make(10)
    for _ in range(10):
        optimizer.step()
        schedule.after_step()
    assert schedule.lr() == pytest.approx(0.0, abs=1e-12)
    optimizer2, longer = make(20)
    optimizer2.load_state_dict(optimizer.state_dict())
    with pytest.warns(UserWarning, match=r"20 optimizer steps in the run instead of 10 .* at step 10 the learning "
                                         r"rate goes from 0 to 0.5"):
        longer.load_state_dict(schedule.state_dict())
    optimizer2.step()
    longer.after_step()
    assert longer.lr() == pytest.approx(0.5 * (1 + math.cos(math.pi * 11 / 20)))
    optimizer3, same = make(10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(schedule.state_dict())


def test_ema_update_and_applied_weights_are_restored_bit_for_bit():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.75)
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    trained = [p.detach().clone() for p in model.parameters()]
    for s, p0 in zip(ema.shadow, start):
        torch.testing.assert_close(s, p0 + 0.25, rtol=0, atol=1e-6)         # 0.75 · θ0 + 0.25 · (θ0 + 1)
    with ema.applied():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
