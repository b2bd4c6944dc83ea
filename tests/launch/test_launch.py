"""The launchers end to end on a tiny radius-graph N-body set: deepspeed, torchrun (DDP, FSDP), plain python.

Each test launches real processes (gloo on CPU) and compares metrics.jsonl with a one-process run: exact
halo mode must give the same losses and MSEs (float64: 1e-9 relative; float32 under DeepSpeed: 1e-5).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = ["dataset.nbody.num_particles=40", "dataset.nbody.train=6", "dataset.nbody.val=3", "dataset.nbody.test=3",
        "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1", "dataset.radius=1.5",
        "trainer.batch_size=3", "trainer.max_epochs=2", "trainer.progress=false",
        "model.cutoff_rate=0.25",         # edge dropping on: exact mode must agree on the global threshold
        # One thread in every process, one-process runs included (their default is every core: two threads
        # beside the other test worker's processes on two cores spin more than they compute).
        "trainer.num_threads=1"]
COMPARED = ("train_loss", "train_mse", "val_mse", "test_mse")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One tiny store for the whole module, made by a plain one-process run (which the tests compare to)."""
    root = tmp_path_factory.mktemp("launch")
    for dtype in ("float64", "float32"):
        proc = launch([], root, f"single-{dtype}", f"trainer.dtype={dtype}")
        assert proc.returncode == 0, proc.stderr
    return root


def launch(launcher: list[str], root: Path, run: str, *overrides: str, timeout: float = 400):
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), f"paths.data={root / 'data'}",
           f"hydra.run.dir={root / run}", *TINY, *overrides]
    if not launcher:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=timeout, env=env)


def torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={n}"]


def deepspeed(n: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port())]


def free_port() -> int:
    from ranks import free_port as port
    return port()


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(run_dir: Path, reference: Path, tol: float, keys: tuple[str, ...] = COMPARED) -> None:
    got, want = records(run_dir), records(reference)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in keys:
            if key in w:
                assert abs(g[key] - w[key]) <= tol * abs(w[key]), f"{key}: {g[key]} != {w[key]}"


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_torchrun_ddp_exact_halo_equals_one_process(data_dir, overlap):
    """Guards the whole distributed path (partitions, per-rank reads, halo, loss scaling, DDP averaging), with
    the halo exchange and all-reduces blocking or started early (distributed.overlap)."""
    run = f"ddp-overlap-{overlap}"
    proc = launch(torchrun(2), data_dir, run, "trainer.dtype=float64", "distributed.parts=2",
                  "distributed.halo=exact", "engine=ddp", f"distributed.overlap={overlap}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(data_dir / run, data_dir / "single-float64", 1e-9)
    last = records(data_dir / run)[0]
    reference = records(data_dir / "single-float64")[0]
    assert last["world_size"] == 2 and last["parts"] == 2
    assert last["dropped_edge_fraction"] == pytest.approx(reference["dropped_edge_fraction"], abs=0.01)
    assert last["edges_per_rank"] < records(data_dir / "single-float64")[0]["edges_per_rank"]
    assert {"step_time_s", "peak_mem_mb"} <= set(last)


def test_exact_mode_in_one_process_running_the_parts_equals_one_device(data_dir):
    """Guards `python launch/train.py distributed.parts=2 distributed.halo=exact` (the fluid study's exact runs):
    one process holding every part has no halo to exchange; it once failed at its first step (a halo plan handed
    to the one-process communicator)."""
    proc = launch([], data_dir, "exact-sequential", "trainer.dtype=float64", "distributed.parts=2",
                  "distributed.halo=exact")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(data_dir / "exact-sequential", data_dir / "single-float64", 1e-9)
    assert records(data_dir / "exact-sequential")[0]["parts"] == 2
    # Hydra's record of an accepted launch (written by launch/train.py after set-up, not by Hydra before it)
    hydra = data_dir / "exact-sequential" / ".hydra"
    assert "distributed.halo=exact" in (hydra / "overrides.yaml").read_text()
    assert "halo: exact" in (hydra / "config.yaml").read_text() and "run:" in (hydra / "hydra.yaml").read_text()


def test_drop_mode_equals_one_process_running_the_parts(data_dir):
    """Guards drop mode through the real data path (cut edges and per-part edge dropping): P ranks equal
    one process that runs the P parts (`python launch/train.py distributed.parts=2`)."""
    common = ["trainer.dtype=float64", "distributed.parts=2", "distributed.halo=none"]
    ranks = launch(torchrun(2), data_dir, "drop", *common, "engine=ddp")
    one = launch([], data_dir, "drop-sequential", *common)
    assert ranks.returncode == 0 and one.returncode == 0, ranks.stderr[-3000:] + one.stderr[-3000:]
    assert_same_metrics(data_dir / "drop", data_dir / "drop-sequential", 1e-9)
    dropped = records(data_dir / "drop")[0]["dropped_edge_fraction"]
    assert dropped > records(data_dir / "single-float64")[0]["dropped_edge_fraction"] + 0.05   # cut edges too


def test_deepspeed_launcher_as_typed(data_dir):
    """Guards `deepspeed --num_gpus 2 launch/train.py distributed.parts=2 ...` (its --local_rank argument,
    one run directory for both ranks, DeepSpeed checkpoints), and exactness in float32."""
    proc = launch(deepspeed(2), data_dir, "ds", "distributed.parts=2", "distributed.halo=exact")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(data_dir / "ds", data_dir / "single-float32", 1e-5)
    assert records(data_dir / "ds")[0]["engine"] == "deepspeed"
    engine_dir = data_dir / "ds" / "checkpoints" / "engine"
    assert (engine_dir / "latest").read_text().strip() == "epoch-00002"
    assert (engine_dir / "epoch-00002.json").exists(), "a DeepSpeed tag is complete only with its manifest"
    assert not list(data_dir.glob("ds/*/metrics.jsonl")), "ranks must share one run directory"


def test_resume_with_a_different_number_of_parts(data_dir):
    """Guards resumability across P: a DeepSpeed run at P = 2 continues at P = 1 (ZeRO stage 0), from its
    newest complete tag, even when DeepSpeed's `latest` names a tag cut short (no manifest)."""
    shutil.copytree(data_dir / "ds", data_dir / "ds-resumed")
    engine_dir = data_dir / "ds-resumed" / "checkpoints" / "engine"
    shutil.copytree(engine_dir / "epoch-00002", engine_dir / "epoch-00003-step-000001")     # no manifest
    (engine_dir / "latest").write_text("epoch-00003-step-000001")
    proc = launch(deepspeed(1), data_dir, "ds-resumed", "trainer.max_epochs=3", "resume=auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch-00002 after epoch 2" in proc.stdout and "ignoring incomplete checkpoints" in proc.stderr
    evaluations = [r for r in records(data_dir / "ds-resumed") if "test_mse" not in r]
    assert [r["epoch"] for r in evaluations] == [1, 2, 3]
    assert evaluations[-1]["parts"] == 1


def test_resuming_a_deepspeed_run_under_another_engine_says_how(data_dir):
    """Guards issue 18: a DeepSpeed run resumed by plain python said "checkpoint ... does not exist"; now it
    names the engine that wrote the checkpoint and the command that resumes it, and changes nothing."""
    shutil.copytree(data_dir / "ds", data_dir / "ds-plain")
    before = sorted(p.name for p in (data_dir / "ds-plain" / "checkpoints" / "engine").iterdir())
    proc = launch([], data_dir, "ds-plain", "trainer.max_epochs=3", "resume=auto", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "does not exist" not in proc.stderr
    assert "epoch-00002.json was written by engine=deepspeed" in proc.stderr
    assert "deepspeed --num_gpus P launch/train.py" in proc.stderr
    assert sorted(p.name for p in (data_dir / "ds-plain" / "checkpoints" / "engine").iterdir()) == before


def test_a_taken_master_port_under_deepspeed_is_one_line(data_dir):
    """Guards issue 18: MASTER_PORT in use ended in a DistNetworkError traceback on rank 0 (and rank 1 waiting
    on whatever held the port); now rank 0 names the port and the fix, exits 2, and the launcher stops."""
    import socket
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port)], data_dir, "taken",
                      "distributed.parts=2", timeout=180)
    assert proc.returncode != 0
    assert f"MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is in use by another process" in proc.stderr
    assert "deepspeed --master_port PORT" in proc.stderr
    assert "Traceback" not in proc.stderr and "DistNetworkError" not in proc.stderr
    assert not (data_dir / "taken").exists()


def test_graph_and_data_parallel(data_dir):
    """Guards G = 2 graph groups of P = 2: equal to one process whose batch holds both groups' batches."""
    proc = launch(torchrun(4), data_dir, "gxd", "trainer.dtype=float64", "distributed.parts=2",
                  "distributed.halo=exact", "engine=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = launch([], data_dir, "single-b6", "trainer.dtype=float64", "trainer.batch_size=6")
    assert single.returncode == 0, single.stderr
    assert_same_metrics(data_dir / "gxd", data_dir / "single-b6", 1e-9)


def test_validation_rollout_under_data_parallel_ranks(data_dir):
    """Guards validation rollouts on 2 DDP ranks holding whole graphs (G = 2, P = 1): every rank rolls out the
    same validation scenes through the DDP wrapper, rank 0's numbers decide, and they are one process's whose
    batch holds both ranks' batches; best.pt is picked on them."""
    rollout = ("trainer.dtype=float64", "dataset.delta_t=3", "trainer.val_rollout_steps=3",
               "trainer.select_on=val_rollout_mse")
    proc = launch(torchrun(2), data_dir, "dp-rollout", *rollout, "engine=ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = launch([], data_dir, "single-b6-rollout", *rollout, "trainer.batch_size=6")
    assert single.returncode == 0, single.stderr
    assert_same_metrics(data_dir / "dp-rollout", data_dir / "single-b6-rollout", 1e-9,
                        (*COMPARED, "val_rollout_mse", "val_rollout_baseline_mse"))
    assert all(r["val_rollout_steps"] == 3 for r in records(data_dir / "dp-rollout"))


def test_fsdp_engine(data_dir):
    """Guards FSDP (fully_shard) under torchrun: sharded weights, gathered checkpoints, same numbers."""
    proc = launch(torchrun(2), data_dir, "fsdp", "trainer.dtype=float64", "distributed.parts=2",
                  "distributed.halo=exact", "engine=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(data_dir / "fsdp", data_dir / "single-float64", 1e-9)


def test_fsdp_with_two_graph_groups_evaluates_on_every_rank(data_dir):
    """Guards a hang: under FSDP (sharded over every rank) with G = 2 graph groups, the 3 validation samples make
    one evaluation batch, so group 1 has none; a forward of group 0 gathered the parameters while group 1 went on
    to the MSE's all-reduce (the mismatched collectives waited for distributed.timeout_s). Equal to one process
    whose batch holds both groups' batches."""
    proc = launch(torchrun(2), data_dir, "fsdp-g2", "trainer.dtype=float64", "engine=fsdp",
                  "distributed.timeout_s=60", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not (data_dir / "single-b6" / "metrics.jsonl").exists():       # test_graph_and_data_parallel's reference
        single = launch([], data_dir, "single-b6", "trainer.dtype=float64", "trainer.batch_size=6")
        assert single.returncode == 0, single.stderr
    assert_same_metrics(data_dir / "fsdp-g2", data_dir / "single-b6", 1e-9)


def test_world_size_not_a_multiple_of_parts_fails_on_every_rank(data_dir):
    """Guards against a hang: 3 ranks for P = 2 stop at once, each with the reason."""
    proc = launch(torchrun(3), data_dir, "bad-world", "distributed.parts=2", "engine=ddp", "distributed.timeout_s=600",
                  timeout=300)
    assert proc.returncode != 0
    # Every rank checks before its first collective; torchrun may stop the others once one has failed, so
    # at least one message, and no wait for a collective timeout (this test's timeout is below it).
    assert proc.stderr.count("not a multiple of distributed.parts=2") >= 1


def test_missing_partition_without_auto_prepare(data_dir):
    """Guards the stored-partition check: P without its partition is named with the command that builds it."""
    proc = launch(torchrun(2), data_dir, "no-part", "distributed.parts=2", "distributed.partition=spatial",
                  "engine=ddp", "dataset.auto_prepare=false", timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("distributed.parts=2 distributed.partition=spatial") >= 1


# Issue 19: batch 2 = 3 batches per epoch, 2 per optimizer step (steps of 2 and 1 batches), linear warmup for one
# step then cosine, the weight average for every evaluation and best.pt. P ranks (exact halo) equal one process
# with the same options: each engine combines gradients at the right micro-batch only, scales a shorter window
# right, and steps the schedule and the average identically on every rank.
OPTIONS = ["trainer.batch_size=2", "trainer.accumulate=2", "trainer.scheduler=cosine", "trainer.warmup_steps=1",
           "trainer.min_lr=1e-5", "trainer.ema_decay=0.8"]
COMPARED_OPTIONS = (*COMPARED, "lr", "mmd_share")


@pytest.fixture(scope="module")
def options_reference(data_dir) -> Path:
    for dtype in ("float64", "float32"):
        proc = launch([], data_dir, f"single-options-{dtype}", f"trainer.dtype={dtype}", *OPTIONS)
        assert proc.returncode == 0, proc.stderr[-3000:]
    lrs = [r["lr"] for r in records(data_dir / "single-options-float64")[:-1]]
    assert lrs[0] < 5e-4 and lrs[-1] < lrs[0], lrs             # the schedule moves the rate
    return data_dir


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_accumulation_schedule_and_average_under_torchrun_equal_one_process(options_reference, engine):
    """Guards DDP's no_sync on the micro-batches before a step's last, FSDP's sharded sums and the average of
    sharded weights, in float64: P = 2 exact halo equals one process with accumulate=2."""
    data_dir = options_reference
    proc = launch(torchrun(2), data_dir, f"{engine}-options", "trainer.dtype=float64", "distributed.parts=2",
                  "distributed.halo=exact", f"engine={engine}", *OPTIONS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_metrics(data_dir / f"{engine}-options", data_dir / "single-options-float64", 1e-9, COMPARED_OPTIONS)


def test_accumulation_schedule_and_average_under_deepspeed_equal_one_process(options_reference):
    """Guards DeepSpeed's gradient_accumulation_steps with the boundary the trainer sets (and its scaling of the
    epoch's shorter last step), and the torch schedule on the optimizer deepspeed.initialize returned."""
    data_dir = options_reference
    proc = launch(deepspeed(2), data_dir, "ds-options", "distributed.parts=2", "distributed.halo=exact", *OPTIONS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(data_dir / "ds-options")[0]["engine"] == "deepspeed"
    assert_same_metrics(data_dir / "ds-options", data_dir / "single-options-float32", 1e-5, COMPARED_OPTIONS)


def test_deepspeed_config_switches_its_default_clipping_off():
    # guards: DeepSpeed clips gradients at global norm 1.0 unless the config says otherwise, so an omitted
    # key made DeepSpeed runs train differently from DDP and one process (gradients ~1000x smaller on SPH)
    from omegaconf import OmegaConf

    from dist_egnn.engines.deepspeed import deepspeed_config
    cfg = OmegaConf.create({"trainer": {"batch_size": 2, "device": "cpu", "dtype": "float32"},
                            "engine": {"zero_stage": 0, "gradient_clipping": 0.0}})
    assert deepspeed_config(cfg)["gradient_clipping"] == 0.0
    cfg.engine.gradient_clipping = 2.5
    assert deepspeed_config(cfg)["gradient_clipping"] == 2.5
