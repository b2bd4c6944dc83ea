"""`python launch/train.py`: the run directory, reproducibility, and configuration errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset.nbody.num_particles=12", "dataset.nbody.train=6", "dataset.nbody.val=3", "dataset.nbody.test=3",
        "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1",
        "trainer.batch_size=3", "trainer.max_epochs=2", "trainer.progress=false", "trainer.num_threads=1"]


def train(tmp_path: Path, *overrides: str, run: str = "run") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), f"paths.data={tmp_path / 'data'}",
           f"hydra.run.dir={tmp_path / run}", *TINY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["fastegnn", "egnn"])
def test_training_writes_the_run_directory(tmp_path, model):
    proc = train(tmp_path, f"model={model}")
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "run"
    assert f"run directory: {run_dir}" in proc.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == model and config["model"]["node_features"] == 2   # resolved
    lines = records(run_dir)
    assert [r["epoch"] for r in lines[:-1]] == [1, 2]
    assert all({"epoch", "train_loss", "val_mse"} <= set(r) for r in lines)
    assert "test_mse" in lines[-1] and np_finite(lines[-1]["test_mse"])
    assert (run_dir / "checkpoints" / "best.pt").exists()


def np_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_two_runs_with_one_seed_are_identical(tmp_path):
    a, b = train(tmp_path, run="a"), train(tmp_path, run="b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    measured = ("best_checkpoint", "peak_mem_mb")                      # measurements, not results
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("time_s") and k not in measured} for r in rs]  # noqa: E731
    assert strip(records(tmp_path / "a")) == strip(records(tmp_path / "b"))


def test_unknown_config_key_is_named(tmp_path):
    proc = train(tmp_path, "trainer.learning_rate=0.1")
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr


def test_feature_width_that_does_not_match_the_model(tmp_path):
    proc = train(tmp_path, "model.node_features=3")
    assert proc.returncode != 0
    assert "model.node_features=3" in proc.stderr and "dataset.node_features" in proc.stderr


def test_missing_store_without_auto_prepare(tmp_path):
    proc = train(tmp_path, "dataset.auto_prepare=false")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "prepare.py" in proc.stderr


def test_nan_in_the_store_stops_before_training(tmp_path):
    assert train(tmp_path).returncode == 0                    # creates the store
    import zarr
    zarr.open_group(str(tmp_path / "data" / "nbody_small.zarr"))["val/pos"][0, 0, 0] = float("nan")
    proc = train(tmp_path, run="again")
    assert proc.returncode == 2
    assert "val/pos: NaN or Inf" in proc.stderr
    assert not (tmp_path / "again" / "metrics.jsonl").exists()


def test_unknown_feature_recipe(tmp_path):
    proc = train(tmp_path, "dataset.node_features=[speed,mass]", "model.node_features=2")
    assert proc.returncode == 2
    assert "mass" in proc.stderr


def test_compose_config_is_the_configuration_the_command_line_runs(tmp_path):
    """Guards the Python API (issue 19 item 6): dist_egnn.compose_config(*overrides) gives the configuration
    `python launch/train.py <overrides>` runs (its config.yaml), and Trainer.from_config trains it."""
    from omegaconf import OmegaConf

    import dist_egnn
    from dist_egnn.config import to_container
    from dist_egnn.training.trainer import Trainer

    proc = train(tmp_path, "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr
    overrides = [f"paths.data={tmp_path / 'data'}", *TINY, "trainer.max_epochs=1"]
    cfg = dist_egnn.compose_config(*overrides)
    assert to_container(cfg) == yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    result = Trainer.from_config(cfg, tmp_path / "api").fit()
    assert result["test_mse"] == records(tmp_path / "run")[-1]["test_mse"]
    assert OmegaConf.to_yaml(to_container(cfg)) == (tmp_path / "api" / "config.yaml").read_text()
