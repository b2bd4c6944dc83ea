"""dataset.gravity end to end (issue 17 item 2): configuration -> batches -> trainer -> best.pt -> load_model ->
rollout. One tiny N-body run is trained with a field (N-body has none physically: the run only checks the path).

Guards: a field that the batches do not carry or carry unscaled, a trainer or a rollout that drops it, a loaded
model built without phi_g, and a config.yaml whose dataset.gravity does not match its checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import dist_egnn
from dist_egnn.datasets.store import open_store
from dist_egnn.inference.load import RunError
from dist_egnn.inference.rollout import rollout
from dist_egnn.training.rank_data import RankData
from dist_egnn.training.setup import load_splits

from runs import config, fit, records

GRAVITY = (0.0, -9.81, 0.0)
TRAIN = ("dataset.delta_t=3", "trainer.max_epochs=1", "trainer.checkpoint_every_steps=0",
         "dataset.velocity_unit=horizon", f"dataset.gravity=[{','.join(map(str, GRAVITY))}]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """root/data: the tiny N-body store; root/run: a one-epoch FastEGNN run with gravity on it."""
    root = tmp_path_factory.mktemp("gravity")
    fit(root / "data", root / "run", *TRAIN)
    return root


def test_batches_carry_gravity_in_the_task_units(trained):
    # velocity_unit=horizon: velocities are displacements per task step T = delta_t * dt, so g becomes g * T^2
    cfg = config(trained / "data", *TRAIN)
    info = open_store(cfg.dataset.store)
    step = 3 * float(info.attrs["dt"])
    batch = RankData(load_splits(cfg, info)["train"], report=False).build([0, 1, 2])
    expected = torch.tensor(GRAVITY, dtype=torch.float32) * step ** 2
    assert batch.graph.gravity.shape == (3, 3)
    assert torch.allclose(batch.graph.gravity, expected.expand(3, 3), rtol=1e-6)
    assert torch.equal(batch.graph.model_inputs()["gravity"], batch.graph.gravity)


def test_a_run_with_gravity_trains_its_field_head_and_loads_with_it(trained):
    best = torch.load(trained / "run" / "checkpoints" / "best.pt", weights_only=True)["model"]
    heads = [k for k in best if ".field_mlp." in k]
    assert len(heads) == 4 * 4                                # 4 layers x (Linear weight, bias) x 2
    assert np.isfinite(records(trained / "run")[-1]["test_mse"])
    model = dist_egnn.load_model(trained / "run")
    assert model.external_field and all(layer.field_mlp is not None for layer in model.layers)
    torch.manual_seed(0)
    untrained = type(model)(external_field=True)
    moved = [k for k in heads if not torch.equal(best[k], untrained.state_dict()[k])]
    assert moved, "training never updated phi_g: the trainer's forward does not pass gravity"


def test_rollout_passes_gravity(trained):
    model = dist_egnn.load_model(trained / "run")
    info = open_store(model.config.dataset.store)
    result = rollout(model, model.config, info, "test", 2)
    assert result.steps == 2 and np.all(np.isfinite(result.mse))
    calls = []
    original = model.forward

    def recording(*args, **kwargs):
        calls.append(kwargs.get("gravity"))
        return original(*args, **kwargs)
    model.forward = recording
    rollout(model, model.config, info, "test", 1)
    scale = (3 * float(info.attrs["dt"])) ** 2
    assert calls and all(g is not None and torch.allclose(g[0], torch.tensor(GRAVITY) * scale) for g in calls)


def test_config_whose_gravity_does_not_match_the_checkpoint_is_refused(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained / "run", run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["dataset"]["gravity"] = None                          # the checkpoint has phi_g, this config builds none
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunError, match=r"dataset\.gravity=None"):
        dist_egnn.load_model(run)
    cfg["dataset"]["gravity"] = [0.0, "down", 0.0]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RunError, match=r"dataset\.gravity"):
        dist_egnn.load_model(run)
