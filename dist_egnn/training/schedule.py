"""Learning-rate schedules: linear warmup, then constant, cosine, exponential or on plateau (``trainer.scheduler``).

torch.optim.lr_scheduler does the work on the optimizer the engine steps (for DeepSpeed, the one
``deepspeed.initialize`` returned). Optimizer step n (from 0, over the whole run, skipped steps included) uses

    lr_n = lr · f(n),   f(n) = (n + 1) / (W + 1)                              for n < W  (warmup: W = warmup_steps)
                        none:        1
                        cosine:      m + (1 − m) · ½ (1 + cos(π · min(1, (n − W) / (T − W))))
                        exponential: max(m, γ^(n − W))
    (m = min_lr / lr, T = the run's optimizer steps: max_epochs × steps per epoch)

a closed form of n (``LambdaLR``), so the only state is n itself and a resumed run sets exactly the rates of an
uninterrupted one; raising ``trainer.max_epochs`` on resume gives the rates of a run started with the new length
(the cosine's rate jumps at the resumed step, e.g. from min_lr at the old end back up: a warning says from what to
what). ``plateau`` is
``ReduceLROnPlateau`` on the validation MSE, stepped after every evaluation once warmup is over: the rate is
multiplied by ``plateau_factor`` after more than ``plateau_patience`` evaluations without improvement, down to
``min_lr``. Its state, and the rate itself (in the optimizer's state), travel in every checkpoint.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

SCHEDULERS = ("none", "cosine", "exponential", "plateau")


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside an engine's optimizer (DeepSpeed may wrap it; the schedulers need the real one)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class Schedule:
    """The learning rate of one run: :meth:`after_step` after every optimizer step, :meth:`after_evaluation`
    after every evaluation; :meth:`state_dict` / :meth:`load_state_dict` for checkpoints."""

    def __init__(self, optimizer, name: str = "none", lr: float = 1e-3, total_steps: int = 1, warmup_steps: int = 0,
                 min_lr: float = 0.0, gamma: float = 0.999, plateau_patience: int = 5, plateau_factor: float = 0.5):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown schedule {name!r}: choose one of {SCHEDULERS}")     # config.check names the key
        self.name, self.warmup, self.total_steps, self.base_lr = name, int(warmup_steps), int(total_steps), lr
        self.optimizer = torch_optimizer(optimizer)
        floor = min_lr / lr if lr > 0 else 0.0

        def factor(n: int, total_steps: int = self.total_steps) -> float:
            if n < self.warmup:
                return (n + 1) / (self.warmup + 1)
            if name == "cosine":
                progress = min(1.0, (n - self.warmup) / max(1, total_steps - self.warmup))
                return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
            if name == "exponential":
                return max(floor, gamma ** (n - self.warmup))
            return 1.0

        self.factor = factor
        # No per-step scheduler for a constant rate without warmup: the optimizer is left exactly as it was.
        self.per_step = LambdaLR(self.optimizer, factor) if self.warmup or name in ("cosine", "exponential") else None
        self.plateau = (ReduceLROnPlateau(self.optimizer, mode="min", factor=plateau_factor, patience=plateau_patience,
                                          min_lr=min_lr) if name == "plateau" else None)

    @classmethod
    def from_config(cls, trainer_cfg, optimizer, total_steps: int) -> "Schedule":
        t = trainer_cfg
        return cls(optimizer, t.get("scheduler", "none"), t.lr, total_steps, t.get("warmup_steps", 0),
                   t.get("min_lr", 0.0), t.get("gamma", 0.999), t.get("plateau_patience", 5),
                   t.get("plateau_factor", 0.5))

    @property
    def active(self) -> bool:
        return self.per_step is not None or self.plateau is not None

    @property
    def steps(self) -> int:
        """Optimizer steps counted so far (0 without a per-step schedule)."""
        return self.per_step.last_epoch if self.per_step is not None else 0

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def after_step(self) -> None:
        """After each optimizer step (or skipped step). Under ``plateau`` only warmup is per step: afterwards
        the rate belongs to the plateau rule, which a per-step factor would overwrite."""
        if self.per_step is not None and (self.plateau is None or self.per_step.last_epoch < self.warmup):
            self.per_step.step()

    def after_evaluation(self, val_mse: float) -> None:
        if self.plateau is not None and (self.per_step is None or self.per_step.last_epoch >= self.warmup):
            self.plateau.step(val_mse)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loadable with ``torch.load(weights_only=True)``)."""
        return dict(name=self.name, total_steps=self.total_steps,
                    per_step=None if self.per_step is None else self.per_step.state_dict(),
                    plateau=None if self.plateau is None else self.plateau.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.per_step is not None and state.get("per_step") is not None:
            self.per_step.load_state_dict(state["per_step"])
            self.warn_if_resized(state.get("total_steps"))
        if self.plateau is not None and state.get("plateau") is not None:
            self.plateau.load_state_dict(state["plateau"])

    def warn_if_resized(self, saved_total: int | None) -> None:
        """A cosine schedule resumed with another run length (``trainer.max_epochs`` may change on resume) takes the
        rate of a run started with the new length: at the resumed step it jumps (e.g. from the old end's min_lr
        back up). Said once, with both rates, rather than left for the curves to show."""
        if self.name != "cosine" or saved_total is None or saved_total == self.total_steps:
            return
        step = self.per_step.last_epoch
        before, after = (self.base_lr * self.factor(step, total) for total in (saved_total, self.total_steps))
        warnings.warn(f"resumed with {self.total_steps} optimizer steps in the run instead of {saved_total} "
                      f"(trainer.max_epochs changed): the cosine schedule follows the new length, so at step {step} "
                      f"the learning rate goes from {before:.3g} to {after:.3g}, as in a run started with the new "
                      f"length", stacklevel=2)
