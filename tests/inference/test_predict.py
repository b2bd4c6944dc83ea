"""From a trained run to predictions: ``dist_egnn.load_model`` and ``launch/predict.py`` end to end.

One tiny N-body model is trained in-process (tests/runs.py, Δt = 3 frames so that the 11 stored frames hold
3 task steps after frame 0); every test then predicts from it.
"""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr
from hydra import compose, initialize_config_dir

import dist_egnn
from dist_egnn.config import register
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import BadInput
from dist_egnn.inference.load import RunError
from dist_egnn.inference.predict import predict
from dist_egnn.inference.rollout import Parts, rollout

from runs import ROOT, config, digest, fit, records

TRAIN = ("dataset.delta_t=3", "trainer.max_epochs=1", "trainer.checkpoint_every_steps=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """root/data: the tiny N-body store; root/run: a finished one-epoch FastEGNN run on it."""
    root = tmp_path_factory.mktemp("predict")
    fit(root / "data", root / "run", *TRAIN)
    return root


def options(*overrides: str):
    """The options ``python launch/predict.py <overrides>`` would run."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        return compose("predict", overrides=["num_threads=1", "progress=false", *overrides])


def test_load_model_is_the_trainers_model(trained, tmp_path):
    """The loaded model's output on a test batch is the trainer's (same batch, best weights), and its test
    MSE is the one metrics.jsonl reports. guards: a model rebuilt with other widths, dtype or weights."""
    from dist_egnn.training.trainer import Trainer

    model = dist_egnn.load_model(trained / "run")
    assert not model.training and model.config.dataset.delta_t == 3 and model.checkpoint["epoch"] == 1
    trainer = Trainer.from_config(config(trained / "data", *TRAIN), tmp_path / "again")
    try:
        best = torch.load(trained / "run" / "checkpoints" / "best.pt", weights_only=True)
        trainer.engine.import_state(best["model"])
        assert trainer.evaluate("test") == records(trained / "run")[-1]["test_mse"]
        data = trainer.data["test"]
        batch = next(data.batches(data.batch_ids(2, shuffle=False, seed=0, epoch=0)))
        with torch.no_grad():
            theirs = trainer.engine.model(**batch.graph.model_inputs()).pos
            mine = model(**batch.graph.model_inputs()).pos
        assert torch.equal(mine, theirs)
    finally:
        trainer.lock.release()


def test_first_rollout_step_is_the_one_step_test_mse(trained):
    model = dist_egnn.load_model(trained / "run")
    info = open_store(model.config.dataset.store)
    result = rollout(model, model.config, info, "test", 5)
    assert result.steps == 3 and "stopped after 3 of 5 steps" in result.stopped
    assert result.mse[0] == pytest.approx(records(trained / "run")[-1]["test_mse"], rel=1e-6)
    assert all(m > 0 for m in result.mse) and all(b > 0 for b in result.baseline_mse)


def test_two_exact_parts_equal_one_process_in_float64(trained):
    model = dist_egnn.load_model(trained / "run", dtype="float64")
    info = open_store(model.config.dataset.store)
    one = rollout(model, model.config, info, "test", 3, dtype=torch.float64)
    two = rollout(model, model.config, info, "test", 3, parts=Parts(2, "exact", "metis"), dtype=torch.float64)
    np.testing.assert_allclose(two.pred, one.pred, rtol=0, atol=1e-12)
    assert len(two.cut_fraction) == 3


def test_predict_command_writes_every_output(trained):
    """`python launch/predict.py run=RUN steps=3 format=vtk`: rollout.json with per-step lists of length 3,
    a store that open_store validates, .vtu frames meshio reads, a PNG."""
    meshio = pytest.importorskip("meshio")              # the `io` extra
    run = trained / "run"
    proc = subprocess.run([sys.executable, "launch/predict.py", f"run={run}", "steps=3", "format=vtk",
                           "num_threads=1", "progress=false"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = run / "predict"
    record = json.loads((out / "rollout.json").read_text())
    assert record["steps"] == 3 and record["samples"] == 3 and record["stopped_early"] is None
    for key in ("mse", "baseline_mse", "frames", "mse_over_baseline"):
        assert len(record[key]) == 3, key
    assert record["frames"] == [3, 6, 9]
    assert record["outside_share"] is None                     # N-body: no walls to be outside of
    assert record["command"].startswith("python launch/predict.py run=") and record["config"]["steps"] == 3
    assert record["mse"][0] == pytest.approx(records(run)[-1]["test_mse"], rel=1e-6)

    info = open_store(out / "rollout.zarr", check_values=True)
    split = info.splits["test"]
    assert (split.num_scenes, split.num_frames, split.num_nodes) == (3, 4, 36)
    assert info.attrs["rollout_split"] == "test" and info.node_scalars == ["charge"]
    group = zarr.open_group(str(out / "rollout.zarr"), mode="r")["test"]
    source = open_store(trained / "data" / "nbody_small.zarr")
    source_pos = zarr.open_group(str(source.path), mode="r")["test"]["pos"]
    np.testing.assert_array_equal(group["pos"][0], source_pos[0])              # frame 0: the stored input
    np.testing.assert_array_equal(group["true_pos"][3], source_pos[9])        # step 3: stored frame 0 + 3·3
    per_step = np.mean(np.square(group["pos"][1:].astype(np.float64) - group["true_pos"][1:]), axis=(1, 2))
    np.testing.assert_allclose(per_step, record["mse"], rtol=1e-5)

    assert len(record["outputs"]["vtk"]) == 3
    for k in range(4):
        mesh = meshio.read(out / "vtk" / "scene_000" / f"frame_{k:04d}.vtu")
        assert mesh.points.shape == (12, 3)
        np.testing.assert_allclose(mesh.points, group["pos"][k, :12], rtol=1e-6)
        np.testing.assert_allclose(mesh.point_data["true"], group["true_pos"][k, :12], rtol=1e-6)
        assert {"predicted", "to_true", "error", "velocity", "charge"} <= set(mesh.point_data)
    assert "scene_000/frame_0003.vtu" in (out / "vtk" / "scene_000.pvd").read_text()
    assert (out / "rollout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "step" in proc.stdout and "const. vel." in proc.stdout


def test_bad_command_exits_2_in_one_line_and_writes_nothing(trained):
    before = digest(trained)
    proc = subprocess.run([sys.executable, "launch/predict.py", f"run={trained / 'run'}", "steps=0", "progress=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "steps=0" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(trained) == before


def remove(name: str):
    return lambda run, data: (run / name).unlink()


def edit_config(run: Path, _data: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["hidden"] = 32
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def other_scalars(run: Path, data: Path) -> None:
    """A copy of the training store that calls its node scalar `type` instead of `charge`."""
    shutil.copytree(data / "nbody_small.zarr", data / "other.zarr")
    meta = data / "other.zarr" / "zarr.json"
    root = json.loads(meta.read_text())
    root["attributes"]["node_scalars"] = ["type"]
    meta.write_text(json.dumps(root))


def drop_key(section: str, key: str):
    def damage(run: Path, _data: Path) -> None:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        del cfg[section][key]
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return damage


def relative_store(run: Path, _data: Path) -> None:
    """config.yaml's store as training wrote it, relative to a folder predict does not run in."""
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["dataset"]["store"] = "elsewhere/nbody_small.zarr"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))


def other_dt(run: Path, data: Path) -> None:
    """A copy of the training store whose frames are twice as far apart."""
    shutil.copytree(data / "nbody_small.zarr", data / "other.zarr")
    meta = data / "other.zarr" / "zarr.json"
    root = json.loads(meta.read_text())
    root["attributes"]["dt"] *= 2
    meta.write_text(json.dumps(root))


def foreign_file(run: Path, data: Path) -> None:
    (data / "notes.txt").write_text("mine")


BAD = {   # case: (damage, overrides, error, fragments the message names)
    "no config.yaml": (remove("config.yaml"), (), RunError, ("config.yaml", "run directory")),
    "no best.pt": (remove("checkpoints/best.pt"), (), RunError, ("best.pt", "resume=auto")),
    "K = 0": (None, ("steps=0",), BadInput, ("steps=0", ">= 1")),
    "K < 0": (None, ("steps=-2",), BadInput, ("steps=-2",)),
    "cap below one": (None, ("max_neighbors=0",), BadInput, ("max_neighbors=0", ">= 1")),
    "cap on complete graphs": (None, ("max_neighbors=2",), BadInput, ("max_neighbors=2", "complete", "config.yaml")),
    "reach not positive": (None, ("wall_neighbors_reach=0",), BadInput, ("wall_neighbors_reach=0", "> 0")),
    "reach without walls": (None, ("wall_neighbors_reach=0.5",), BadInput,
                            ("wall_neighbors_reach=0.5", "dataset.wall_neighbors=0", "config.yaml")),
    "unknown split": (None, ("split=holdout",), BadInput, ("split='holdout'", "test")),
    "start past the end": (None, ("start=9",), BadInput, ("start=9", "0..7")),
    "widths differ": (edit_config, (), RunError, ("best.pt", "model.hidden=32", "config.yaml")),
    "node scalars differ": (other_scalars, ("data={data}/other.zarr",), BadInput,
                            ("other.zarr", "['type']", "nbody_small.zarr", "['charge']")),
    "missing store": (None, ("data={data}/absent.zarr",), BadInput, ("absent.zarr", "does not exist")),
    "contain without a container": (None, ("contain=true",), BadInput,
                                    ("contain=true", "nbody_small.zarr", "'nbody'", "leave contain out")),
    "config.yaml without delta_t": (drop_key("dataset", "delta_t"), (), RunError,
                                    ("config.yaml", "dataset.delta_t", "best.pt")),
    "store relative elsewhere": (relative_store, (), RunError,
                                 ("config.yaml", "dataset.store=elsewhere/nbody_small.zarr", "data=")),
    "store of another dt": (other_dt, ("data={data}/other.zarr",), BadInput, ("other.zarr", "dt=", "nbody_small.zarr")),
    "more scenes than the split": (None, ("scenes=99",), BadInput, ("scenes=99", "scenes; choose 1 to")),
    "a scene outside the split": (None, ("scene_ids=[7]",), BadInput, ("scene_ids=[7]", "scenes 0 to 2")),
    "out= the run directory": (None, ("out={run}",), BadInput, ("out=", "config.yaml", "new or empty folder")),
    "out= a folder of the user's": (foreign_file, ("out={data}",), BadInput, ("notes.txt", "nbody_small.zarr")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_key_or_file_and_writes_nothing(trained, tmp_path, case):
    damage, overrides, error, says = BAD[case]
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(trained / "run", run, ignore=shutil.ignore_patterns("predict"))
    shutil.copytree(trained / "data", data)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["dataset"]["store"] = str(data / "nbody_small.zarr")                 # the copy, not the fixture's
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    if damage is not None:
        damage(run, data)
    before = digest(tmp_path)
    with pytest.raises(error) as caught:
        predict(options(f"run={run}", *(o.format(data=data, run=run) for o in overrides)))
    for fragment in says:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    assert digest(tmp_path) == before and not (run / "predict").exists()
    assert not list(tmp_path.rglob(".predict*"))


def test_graph_bounds_replace_the_runs_in_the_rollout_only(trained):
    """predict's max_neighbors and wall_neighbors_reach replace the run's dataset keys in the rollout only; a reach
    for a run without nearest-wall edges is refused (it would do nothing)."""
    from dist_egnn.inference.predict import rollout_config
    run_cfg = dist_egnn.load_model(trained / "run").config
    capped = rollout_config(run_cfg, 3)
    assert capped.dataset.max_neighbors == 3 and run_cfg.dataset.get("max_neighbors") is None
    assert rollout_config(run_cfg) is run_cfg
    with pytest.raises(BadInput, match=r"wall_neighbors_reach=0\.5 bounds the nearest-wall edges, but the run has "
                                       r"none \(dataset\.wall_neighbors=0 in the run's config\.yaml\)"):
        rollout_config(run_cfg, wall_neighbors_reach=0.5)
    walled = copy.deepcopy(run_cfg)
    walled.dataset.wall_neighbors = 2
    bounded = rollout_config(walled, wall_neighbors_reach=0.5)
    assert bounded.dataset.wall_neighbors_reach == 0.5 and walled.dataset.get("wall_neighbors_reach") is None
