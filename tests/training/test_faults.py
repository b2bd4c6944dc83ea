"""Rank failures on 2 gloo ranks: a stop signal on one rank, a killed rank, a hung rank.

Faults are injected through the real paths (dist_egnn.training.faults, DIST_EGNN_FAULTS): the rank sends itself
SIGTERM, SIGKILLs itself mid-step, or stops answering. Runs use DDP in float64 with exact halos on a tiny
radius-graph N-body set (3 epochs of 2 steps, a resume point after every step).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ranks import free_port
from runs import engine_checkpoint, max_difference, records, results

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["dataset.nbody.num_particles=40", "dataset.nbody.train=6", "dataset.nbody.val=3", "dataset.nbody.test=3",
        "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1", "dataset.radius=1.5",
        "trainer.batch_size=3", "trainer.max_epochs=3", "trainer.progress=false", "trainer.dtype=float64",
        "trainer.checkpoint_every_steps=1", "distributed.parts=2", "distributed.halo=exact", "engine=ddp"]


def command(root: Path, run: str, *overrides: str) -> list[str]:
    return [str(ROOT / "launch" / "train.py"), f"paths.data={root / 'data'}", f"hydra.run.dir={root / run}",
            *TINY, *overrides]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1",
            **extra}


def torchrun(root: Path, run: str, *overrides: str, restarts: int = 0, faults: str = ""):
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", f"--max-restarts={restarts}",
           *command(root, run, *overrides)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=600,
                          env=environment(DIST_EGNN_FAULTS=faults))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The store, its 2-part partition and a 2-rank reference run that never stopped."""
    root = tmp_path_factory.mktemp("faults")
    proc = torchrun(root, "reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def test_restarts_after_a_signal_and_a_killed_rank_equal_an_uninterrupted_run(root):
    """Guards exact resume on 2 ranks under `torchrun --max-restarts`: attempt 0 gets SIGTERM on rank 0 in
    step 3 (both ranks stop together and write a checkpoint), attempt 1 loses rank 1 to SIGKILL in step 5
    (the survivor fails at once, torchrun restarts both), attempt 2 resumes from the evaluation checkpoint
after step 4 and finishes."""
    proc = torchrun(root, "restarted", "resume=auto", restarts=2, faults="sigterm@3,kill@5:1#1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM in epoch 2 after step 1" in out and "stopped by a stop signal on another rank" in out
    assert "epoch-00002-step-000001 in epoch 2 after step 1 (global step 3)" in out      # after the signal
    assert "engine/epoch-00002 after epoch 2 (global step 4)" in out                     # killed in step 5: none lost
    assert results(root / "restarted") == results(root / "reference")
    got = engine_checkpoint(root / "restarted", "epoch-00003")
    want = engine_checkpoint(root / "reference", "epoch-00003")
    assert max_difference(got["model"], want["model"]) == 0.0
    assert max_difference(got["optimizer"], want["optimizer"]) == 0.0


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_stops_the_other(root, fault):
    """Guards against hangs: without a launcher to clean up, rank 1 dies (or stops answering) in step 3 and
    rank 0 still exits, with a message, within distributed.timeout_s; the checkpoints stay resumable."""
    run, port = f"lost-{fault}", str(free_port())
    cmd = [sys.executable, *command(root, run, "distributed.timeout_s=10")]
    procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=environment(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                              DIST_EGNN_FAULTS=f"{fault}@3:1"))
             for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=300)                  # a hang would end here, failing the test
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "error (rank 0)" in err and "distributed.timeout_s=10" in err and "resume=auto" in err
    assert len(records(root / run)) == 1                            # epoch 1 was evaluated before the fault
