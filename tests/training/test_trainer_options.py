"""What a run records and the training options on one process: gradient accumulation, the weight average,
the test line's reference errors, the MMD share, TensorBoard files and curves.png (issue 19).

Runs happen in this process (tests/runs.py) on the tiny N-body set: 6 training graphs of 12 nodes, 3 epochs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_egnn.measure.baselines import trivial_baselines

from runs import config, engine_checkpoint, fit, max_difference, records, results


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The store and a default run (batch 3: 2 optimizer steps per epoch)."""
    root = tmp_path_factory.mktemp("options")
    fit(root / "data", root / "default")
    return root


def test_accumulating_two_batches_equals_one_batch_twice_as_large(root):
    """Guards the loss normalisation of accumulation: each micro-batch's loss is a per-node mean (and the MMD a
    per-graph mean), so with graphs of equal size the mean over k batches of b graphs is the loss of one batch of
    k·b graphs, and so are its gradients and every later step (float64: to rounding)."""
    common = ["trainer.dtype=float64", "trainer.checkpoint_every_steps=0"]
    fit(root / "data", root / "accumulated", *common, "trainer.batch_size=1", "trainer.accumulate=2")
    fit(root / "data", root / "large", *common, "trainer.batch_size=2")
    got, want = records(root / "accumulated"), records(root / "large")
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        for key in ("train_loss", "train_mse", "mmd_share", "val_mse", "test_mse"):
            if key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-9, abs=1e-12), key
    a, b = (engine_checkpoint(root / r, "epoch-00003") for r in ("accumulated", "large"))
    assert max_difference(a["model"], b["model"]) < 1e-9
    assert a["client"]["trainer"]["global_step"] == b["client"]["trainer"]["global_step"] == 9   # optimizer steps


def test_evaluations_and_best_checkpoint_use_the_weight_average(root):
    """Guards trainer.ema_decay: best.pt holds the average (the checkpoint's `ema`), not the trained weights,
    and a run with the average evaluates other numbers than one without."""
    fit(root / "data", root / "ema", "trainer.ema_decay=0.9")
    best_tag = engine_checkpoint(root / "ema", "epoch-00003")["client"]["trainer"]["best_tag"]
    at_best = engine_checkpoint(root / "ema", best_tag)
    best = torch.load(root / "ema" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert max_difference(best, at_best["client"]["ema"]) == 0.0
    assert max_difference(best, at_best["model"]) > 0.0
    # training itself is unchanged by the average: same losses, other validation numbers
    ema, plain = records(root / "ema"), records(root / "default")
    assert [r["train_loss"] for r in ema[:-1]] == [r["train_loss"] for r in plain[:-1]]
    assert [r["val_mse"] for r in ema[:-1]] != [r["val_mse"] for r in plain[:-1]]


def test_test_line_carries_the_reference_errors_and_records_the_mmd_share(root):
    """Guards issue 19 item 7: the test line says what test_mse means (zero-motion and constant-velocity MSE of
    the same test samples, as the study runner computes them), and every evaluation records the MMD term's part
    of the loss (loss = MSE + λ·MMD in one process, so the share is (loss - MSE) / loss)."""
    lines = records(root / "default")
    reference = trivial_baselines(config(root / "data"))
    assert lines[-1]["zero_motion_mse"] == pytest.approx(reference["zero_motion_mse"], rel=1e-12)
    assert lines[-1]["constant_velocity_mse"] == pytest.approx(reference["constant_velocity_mse"], rel=1e-12)
    for r in lines[:-1]:
        assert r["mmd_share"] == pytest.approx((r["train_loss"] - r["train_mse"]) / r["train_loss"], rel=1e-4)
        assert r["mmd_share"] != 0.0
        assert r["lr"] == 5e-4                                       # the default: a constant rate
    fit(root / "data", root / "egnn", "model=egnn")
    assert all(r["mmd_share"] == 0.0 for r in records(root / "egnn")[:-1])


def test_tensorboard_files_and_curves(root):
    """Guards issue 19 item 4: rank 0 writes TensorBoard scalars per optimizer step and per evaluation, and
    curves.png (a PNG, rewritten at every evaluation, here the last one after the test)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = root / "default"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "eval/train_loss", "eval/val_mse", "eval/step_time_s", "eval/peak_mem_mb",
            "test/test_mse", "test/zero_motion_mse"} <= tags
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4, 5, 6]
    lines = records(run)
    assert [e.value for e in events.Scalars("eval/val_mse")] == pytest.approx([r["val_mse"] for r in lines[:-1]])
    # the per-step losses of an epoch average to its train_loss (one process: every step counted)
    losses = [e.value for e in events.Scalars("step/loss")]
    assert (losses[0] + losses[1]) / 2 == pytest.approx(lines[0]["train_loss"], rel=1e-5)


def test_tensorboard_can_be_switched_off(root):
    fit(root / "data", root / "quiet", "trainer.tensorboard=false", "trainer.max_epochs=1")
    assert not (root / "quiet" / "tensorboard").exists() and (root / "quiet" / "curves.png").exists()
    assert results(root / "quiet")[0] == results(root / "default")[0]
