"""Training runs inside the test process (tests only): compose the Hydra config, fit, read the run directory."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from omegaconf import DictConfig

import dist_egnn

ROOT = Path(__file__).resolve().parents[1]
# 6 training graphs in batches of 3: 2 steps per epoch; a resume point after every step.
TINY = ["dataset.nbody.num_particles=12", "dataset.nbody.train=6", "dataset.nbody.val=3", "dataset.nbody.test=3",
        "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1", "trainer.batch_size=3",
        "trainer.max_epochs=3", "trainer.progress=false", "trainer.num_threads=1", "trainer.checkpoint_every_steps=1"]
MEASURED = ("peak_mem_mb", "best_checkpoint")            # measurements and paths, not results


def config(data: Path, *overrides: str) -> DictConfig:
    """The configuration ``python launch/train.py paths.data=DATA <TINY> <overrides>`` would run (the Python API,
    ``dist_egnn.compose_config``)."""
    return dist_egnn.compose_config(f"paths.data={data}", *TINY, *overrides)


def fit(data: Path, run_dir: Path, *overrides: str) -> dict:
    from dist_egnn.training.trainer import Trainer
    return Trainer.from_config(config(data, *overrides), run_dir).fit()


def prepare_cli():
    """``launch/prepare.py`` as a module (a script, not a package member): its ``prepare(cfg)`` runs in this process."""
    spec = importlib.util.spec_from_file_location("prepare_cli", ROOT / "launch" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def results(run_dir: Path) -> list[dict]:
    """metrics.jsonl without timings and measurements: what two equal runs must share exactly."""
    return [{k: v for k, v in r.items() if not k.endswith("time_s") and k not in MEASURED} for r in records(run_dir)]


def engine_checkpoint(run_dir: Path, tag: str) -> dict:
    return torch.load(run_dir / "checkpoints" / "engine" / f"{tag}.pt", weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference between two nested structures of tensors and numbers (0.0: bit-equal)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max([max_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([max_difference(x, y) for x, y in zip(a, b)] or [0.0])
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, (int, float)):
        return abs(a - b)
    assert a == b
    return 0.0


def digest(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file under ``roots``: equal before and after means nothing was changed."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
