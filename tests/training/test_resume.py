"""Checkpoints and resume on one process: exact resume mid-epoch, continuing a finished run, stop signals, the
NaN/Inf guard, keep-last-K pruning and checkpoints that are complete only with their manifest.

Runs happen in this process (tests/runs.py) on a tiny N-body set: 3 epochs of 2 steps, a resume point after
every step. Faults are injected through the real paths (dist_egnn.training.faults): the process sends itself the
signal, the loss share becomes NaN, a gradient becomes Inf.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_egnn.training import checkpoint, guard

from runs import ROOT, TINY, engine_checkpoint, fit, max_difference, records, results


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The store and a reference run that never stopped (3 epochs)."""
    root = tmp_path_factory.mktemp("resume")
    fit(root / "data", root / "reference")
    return root


def final_state(run_dir: Path) -> dict:
    return engine_checkpoint(run_dir, "epoch-00003")


@pytest.mark.parametrize("fault, tag", [("sigterm@3", "epoch-00002-step-000001"),      # mid-epoch
                                        ("sigint@4", "epoch-00002-step-000002")])      # before an evaluation
def test_stopped_and_resumed_run_equals_one_that_never_stopped(root, monkeypatch, fault, tag):
    """Guards exact resume: the batch position, optimizer state, early stopping, the epoch's running sums and
    metrics.jsonl all continue where the signal stopped the run, bit for bit."""
    run = root / f"stopped-{fault}"
    monkeypatch.setenv("DIST_EGNN_FAULTS", fault)
    with pytest.raises(guard.Stopped, match=f"stopped by SIG(TERM|INT) in epoch 2 after step {tag[-1]} .*resume=auto"):
        fit(root / "data", run)
    monkeypatch.delenv("DIST_EGNN_FAULTS")
    assert checkpoint.latest_tag(run / "checkpoints" / "engine") == tag
    assert len(records(run)) == 1                                   # epoch 1 only

    fit(root / "data", run, "resume=auto")
    assert results(run) == results(root / "reference")              # one line per evaluation, then the test line
    got, want = final_state(run), final_state(root / "reference")
    assert max_difference(got["model"], want["model"]) == 0.0
    assert max_difference(got["optimizer"], want["optimizer"]) == 0.0
    best = [torch.load(r / "checkpoints" / "best.pt", weights_only=True)["model"] for r in (run, root / "reference")]
    assert max_difference(*best) == 0.0


# Each optimizer step of several batches (batch_size=1), a schedule with warmup, the weight average: a run stopped
# between optimizer steps equals one that never stopped. accumulate=4: every epoch's 6 batches are steps of 4
# and 2 (a shorter last window), and the signal in optimizer step 3 stops the run mid-epoch 2; accumulate=2:
# 3 steps per epoch, the signal stops it just before epoch 1's evaluation.
OPTIONS = {
    "cosine": ["trainer.scheduler=cosine", "trainer.warmup_steps=2", "trainer.min_lr=1e-5", "trainer.accumulate=4",
               "trainer.ema_decay=0.9"],
    "plateau": ["trainer.scheduler=plateau", "trainer.warmup_steps=1", "trainer.plateau_patience=0",
                "trainer.accumulate=4", "trainer.ema_decay=0.5", "trainer.lr=1e-2"],
    "exponential": ["trainer.scheduler=exponential", "trainer.gamma=0.8", "trainer.accumulate=2",
                    "trainer.ema_decay=0.99"],
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_resume_with_schedule_average_and_accumulation_equals_uninterrupted(root, monkeypatch, name):
    """Guards the new training state in checkpoints: the schedule's position (and plateau's counters and the
    rate itself), the weight average, and resume points that lie between optimizer steps of several batches."""
    options = ["trainer.batch_size=1", *OPTIONS[name]]
    fit(root / "data", root / f"{name}-reference", *options)
    run = root / f"{name}-stopped"
    monkeypatch.setenv("DIST_EGNN_FAULTS", "sigterm@3")
    with pytest.raises(guard.Stopped, match=r"stopped by SIGTERM in epoch \d after step \d \(global step 3\)"):
        fit(root / "data", run, *options)
    monkeypatch.delenv("DIST_EGNN_FAULTS")
    fit(root / "data", run, *options, "resume=auto")
    assert results(run) == results(root / f"{name}-reference")
    got, want = final_state(run), final_state(root / f"{name}-reference")
    for part in ("model", "optimizer"):
        assert max_difference(got[part], want[part]) == 0.0
    for part in ("schedule", "ema"):
        assert max_difference(got["client"][part], want["client"][part]) == 0.0
    best = [torch.load(r / "checkpoints" / "best.pt", weights_only=True)["model"]
            for r in (run, root / f"{name}-reference")]
    assert max_difference(*best) == 0.0
    lrs = [r["lr"] for r in records(run)[:-1]]
    assert len(set(lrs)) > 1, f"the schedule did not change the rate: {lrs}"


def test_finished_run_continues_when_max_epochs_is_raised(root):
    """Guards continuing a finished run: the old test line is superseded, the result equals a longer run."""
    run = root / "short"
    fit(root / "data", run, "trainer.max_epochs=2")
    assert "test_mse" in records(run)[-1] and len(records(run)) == 3
    fit(root / "data", run, "trainer.max_epochs=3", "resume=auto")
    assert results(run) == results(root / "reference")
    superseded = [json.loads(line) for line in (run / "metrics.superseded.jsonl").read_text().splitlines()]
    assert len(superseded) == 1 and "test_mse" in superseded[0]
    assert max_difference(final_state(run)["model"], final_state(root / "reference")["model"]) == 0.0


def test_keep_last_and_best(root):
    """Guards pruning in a real run: the newest trainer.keep_last=3 checkpoints and the best one remain."""
    manifests = checkpoint.complete_checkpoints(root / "reference" / "checkpoints" / "engine")
    best_tag = engine_checkpoint(root / "reference", "epoch-00003")["client"]["trainer"]["best_tag"]
    tags = [m["tag"] for m in manifests]
    assert set(tags) == {"epoch-00002", "epoch-00003-step-000001", "epoch-00003", best_tag}
    assert all(m["config_hash"] == manifests[0]["config_hash"] for m in manifests)


def test_nonfinite_loss_stops_with_a_diagnostic_checkpoint(root, monkeypatch):
    """Guards trainer.nonfinite=stop: the message names epoch, step and what was NaN; the diagnostic checkpoint
    holds the state before the bad step, is never resumed from, and a resume continues exactly."""
    run = root / "nan"
    monkeypatch.setenv("DIST_EGNN_FAULTS", "nan_loss@3")
    with pytest.raises(guard.NonFiniteError, match=r"non-finite loss and gradients at epoch 2, step 1 \(global step 3"
                                                   r".*trainer.nonfinite=skip"):
        fit(root / "data", run)
    monkeypatch.delenv("DIST_EGNN_FAULTS")
    diagnostic = run / "checkpoints" / "diagnostic"
    report = json.loads((diagnostic / "nonfinite-epoch-00002-step-000001.json").read_text())
    assert report["reason"] == "non-finite loss and gradients" and len(report["samples"]) == 3
    before = torch.load(diagnostic / "nonfinite-epoch-00002-step-000001.pt", weights_only=True)
    assert max_difference(before["model"], engine_checkpoint(run, "epoch-00001")["model"]) == 0.0

    fit(root / "data", run, "resume=auto")                          # the cause is gone: continue
    assert results(run) == results(root / "reference")


def test_nonfinite_gradient_skips_the_step(root, monkeypatch):
    """Guards trainer.nonfinite=skip: the step with an Inf gradient is skipped, counted, and training goes on."""
    run = root / "skip"
    monkeypatch.setenv("DIST_EGNN_FAULTS", "inf_grad@2")
    fit(root / "data", run, "trainer.nonfinite=skip")
    lines = records(run)
    assert [r.get("skipped_steps") for r in lines[:-1]] == [1, 0, 0]
    assert all(torch.isfinite(v).all() for v in final_state(run)["model"].values())
    assert lines[-1]["test_mse"] == lines[-1]["test_mse"]           # not NaN


def test_incomplete_checkpoints_are_never_picked_and_pruning_keeps_best(tmp_path):
    """Guards "complete only with its metadata": files without a manifest (a save cut short, a DeepSpeed tag
    that `latest` names) are ignored and later removed; keep-last-K keeps the best tag too."""
    for i, (tag, position) in enumerate([("epoch-00001", (1, 0)), ("epoch-00002-step-000001", (1, 1)),
                                         ("epoch-00002", (2, 0)), ("epoch-00003", (3, 0))]):
        (tmp_path / f"{tag}.pt").write_bytes(b"x" * (i + 1))
        checkpoint.write_manifest(tmp_path, tag, position=list(position), config_hash="h")
    (tmp_path / "epoch-00004.pt").write_bytes(b"torn")                         # plain engine, cut short
    (tmp_path / "epoch-00005").mkdir()                                          # DeepSpeed, cut short
    (tmp_path / "epoch-00005" / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    (tmp_path / "latest").write_text("epoch-00005")
    (tmp_path / ".epoch-00006.pt.1234abcd.tmp").write_bytes(b"torn")

    assert checkpoint.latest_tag(tmp_path) == "epoch-00003"
    assert checkpoint.incomplete_tags(tmp_path) == ["epoch-00004", "epoch-00005"]
    assert checkpoint.prune(tmp_path, keep_last=2, keep=["epoch-00001"]) == ["epoch-00002-step-000001"]
    assert ([m["tag"] for m in checkpoint.complete_checkpoints(tmp_path)]
            == ["epoch-00001", "epoch-00002", "epoch-00003"])
    assert checkpoint.remove_leftovers(tmp_path) == ["epoch-00004", "epoch-00005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["epoch-00001.pt", "epoch-00001.json", "epoch-00002.pt", "epoch-00002.json", "epoch-00003.pt",
         "epoch-00003.json", "latest"])


def test_a_checkpoint_from_before_a_new_key_resumes_at_its_default(tmp_path):
    """A checkpoint written by a version without a key (here trainer.noise_target) resumes when the key holds its
    default, the behaviour from before it existed; at another value, or with a changed key, it is refused."""
    config = checkpoint.schema_defaults()
    before = json.loads(json.dumps(config))
    del before["trainer"]["noise_target"]
    (tmp_path / "epoch-00001.pt").write_bytes(b"x")
    path = checkpoint.write_manifest(tmp_path, "epoch-00001", position=[1, 0], config=checkpoint.identity(before),
                                     config_hash=checkpoint.config_hash(before))
    manifest = checkpoint.read_manifest(path)
    checkpoint.verify(tmp_path, manifest, config)
    shifted = json.loads(json.dumps(config))
    shifted["trainer"]["noise_target"] = "shifted"
    with pytest.raises(checkpoint.CheckpointError, match="trainer.noise_target: '<absent>' -> 'shifted'"):
        checkpoint.verify(tmp_path, manifest, shifted)
    changed = json.loads(json.dumps(config))
    changed["trainer"]["lr"] = 0.5
    with pytest.raises(checkpoint.CheckpointError, match=r"trainer.lr: 0.0005 -> 0.5"):
        checkpoint.verify(tmp_path, manifest, changed)


@pytest.mark.parametrize("fault, code, message", [
    ("sigint@2", guard.EXIT_STOPPED, "stopped by SIGINT in epoch 1 after step 2"),
    ("nan_loss@1", guard.EXIT_NONFINITE, "non-finite loss and gradients at epoch 1, step 1")])
def test_exit_codes_of_the_launcher(root, fault, code, message):
    """Guards `python launch/train.py`: a stop signal and NaN each exit with their own code and message."""
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"paths.data={root / 'data'}",
           f"hydra.run.dir={root / ('cli-' + fault)}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=root,
                          env={**os.environ, "DIST_EGNN_FAULTS": fault, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == code, proc.stderr[-2000:]
    assert message in proc.stderr


def test_running_sums_move_to_another_world_size():
    # guards: the skipped-step count (agreed by every rank) summed over the old ranks onto rank 0 only, so
    # the new ranks disagree on it; the collective seconds (a maximum over ranks) summed
    import numpy as np

    from dist_egnn.training.state import MAX, SAME, SUM, EpochTotals, resumed_totals
    width = len(EpochTotals().to_array())
    saved = np.arange(2 * width, dtype=float).reshape(2, width)
    column = {name: i for i, name in enumerate(EpochTotals.__dataclass_fields__)}
    saved[:, column["skipped"]] = 3                                # 3 skipped steps, on both old ranks
    assert np.array_equal(resumed_totals(saved, 1, 2).to_array(), saved[1])   # same world size: own row
    rank0, rank1, rank2 = (resumed_totals(saved, r, 3).to_array() for r in range(3))
    same, summed, slowest = ([column[n] for n in EpochTotals.names(rule)] for rule in (SAME, SUM, MAX))
    assert same == [column["skipped"]] and column["loss"] in summed and column["comm_seconds"] in slowest
    assert rank0[same] == rank1[same] == rank2[same] == 3
    assert np.array_equal(rank0[slowest], saved[:, slowest].max(0)) and not rank1[slowest].any()
    assert np.array_equal(rank0[summed], saved[:, summed].sum(0)) and not rank1[summed].any()


def test_resume_on_a_copy_of_the_store_elsewhere(root):
    """Guards the store identity in checkpoints (issue 18 item 4): the path does not count, the contents do. A run
    resumed with paths.data pointing at a copy of its store continues exactly; each manifest records the store."""
    import shutil
    run = root / "moved"
    fit(root / "data", run, "trainer.max_epochs=2")
    manifest = checkpoint.complete_checkpoints(run / "checkpoints" / "engine")[-1]
    assert manifest["store"]["path"].endswith("nbody_small.zarr") and len(manifest["store"]["hash"]) == 16
    shutil.copytree(root / "data", root / "copy")
    fit(root / "copy", run, "trainer.max_epochs=3", "resume=auto")
    assert results(run) == results(root / "reference")
