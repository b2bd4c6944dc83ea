"""Devices and precision: trainer.device=auto|cpu|cuda, the GPU of each rank, bf16 autocast, CUDA timers."""
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_egnn.config import check
from dist_egnn.errors import ConfigError
from dist_egnn.training.device import autocast, edge_chunk_rows, memory_mb, resolve_device

from runs import config, fit, records

ROOT = Path(__file__).resolve().parents[2]


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_names_the_key_and_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.device=cuda but no CUDA device.*trainer.device=auto"):
        resolve_device("cuda")


def test_each_rank_takes_local_rank_modulo_the_visible_gpus(monkeypatch):
    """One GPU shown per task (CUDA_VISIBLE_DEVICES) or all GPUs shown to every rank: both work."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto", local_rank=3, local_world_size=1) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [resolve_device("cuda", r, 4).index for r in range(4)] == [0, 1, 2, 3]


def test_more_ranks_than_gpus_under_nccl_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"4 ranks on this node but 2 visible GPU.*--num_gpus 2"):
        resolve_device("auto", local_rank=0, local_world_size=4)
    assert resolve_device("auto", 3, 4, backend="gloo") == torch.device("cuda", 1)   # gloo may share


def test_precision_contexts():
    cpu = torch.device("cpu")
    assert isinstance(autocast(cpu, "fp32"), contextlib.nullcontext)
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


def test_chunk_rows_per_device():
    cpu = torch.device("cpu")
    assert edge_chunk_rows("auto", cpu, 64) is None and edge_chunk_rows(None, cpu, 64) is None
    assert edge_chunk_rows(4096, cpu, 64) == 4096
    assert set(memory_mb(cpu)) == {"peak_mem_mb"}


@pytest.mark.parametrize("override, message", [
    ("trainer.precision=bf16 trainer.dtype=float64", "trainer.precision=bf16 with trainer.dtype=float64"),
    ("trainer.precision=fp16", "trainer.precision='fp16'"),
    ("model.edge_chunk_size=-5", "model.edge_chunk_size=-5"),
    ("model.edge_chunk_size=0", "model.edge_chunk_size=0"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
])
def test_bad_device_and_precision_keys(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        check(config(tmp_path, *override.split()))
    assert message in str(err.value)


def test_bf16_trains_on_cpu_and_says_so(tmp_path):
    result = fit(tmp_path / "data", tmp_path / "run", "trainer.precision=bf16", "trainer.max_epochs=2")
    assert result["precision"] == "bf16" and result["device"] == "cpu"
    assert all(r["train_loss"] == r["train_loss"] for r in records(tmp_path / "run"))      # finite
    weights = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    assert all(w.dtype == torch.float32 for w in weights.values())    # parameters stay float32


def test_cuda_without_a_gpu_exits_2_before_any_work(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), f"paths.data={tmp_path / 'data'}",
                           "trainer.device=cuda", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "trainer.device=cuda" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()                            # nothing prepared


def test_deterministic_runs_are_bitwise_equal_on_cpu(tmp_path):
    """trainer.deterministic=true: two runs give the same weights bit for bit (on the CPU this held before too;
    on CUDA it is what the switch is for: gpu_check's determinism stage checks it there)."""
    from runs import results

    for name in ("a", "b"):
        fit(tmp_path / "data", tmp_path / name, "trainer.deterministic=true", "trainer.max_epochs=2")
    assert results(tmp_path / "a") == results(tmp_path / "b")
    a, b = (torch.load(tmp_path / n / "checkpoints" / "best.pt", weights_only=True)["model"] for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.are_deterministic_algorithms_enabled()                 # the process follows the config
    fit(tmp_path / "data", tmp_path / "c", "trainer.max_epochs=1")
    assert not torch.are_deterministic_algorithms_enabled()


def test_threads_follow_the_setting_then_omp_num_threads_then_the_cores(monkeypatch):
    """trainer.num_threads wins; else OMP_NUM_THREADS (torchrun sets it to 1 for several ranks); else each of the
    node's ranks takes its share of the cores. A value that is not a whole number >= 1 is refused, naming it."""
    from dist_egnn.parallel.runtime import DistEnv
    from dist_egnn.training.setup import thread_share

    two_ranks = DistEnv(world_size=2, local_world_size=2)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_share(two_ranks, None) == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_share(two_ranks, None) == 3
    assert thread_share(two_ranks, 5) == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("OMP_NUM_THREADS", bad)
        with pytest.raises(ConfigError, match=r"OMP_NUM_THREADS=.*trainer.num_threads=N"):
            thread_share(two_ranks, None)
