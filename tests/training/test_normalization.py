"""trainer.normalization=rms (issue 19 item 5): the model works in units where the training displacement has RMS 1,
every reported number stays in the store's units, the model stays equivariant, and a loaded model scales the same way.

Runs happen in this process (tests/runs.py) on the tiny N-body set; a copy of its store with every length 8 times
larger (positions and velocities: another length unit; 8 is a power of two, so the scaled data are exact) checks
the units.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import zarr

import dist_egnn
from dist_egnn.datasets.statistics import STATISTICS_ATTR
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.inference.load import RunError
from dist_egnn.inference.rollout import rollout
from dist_egnn.training.normalization import NormalizedModel
from dist_egnn.training.setup import load_splits, open_dataset_store

from equivariance import Graph, assert_equivariant
from runs import config, fit, records

RMS = ("trainer.normalization=rms", "trainer.checkpoint_every_steps=0")
UNIT = 8.0
STORE = "nbody_small.zarr"
REPORTED = ("train_mse", "val_mse", "test_mse", "zero_motion_mse", "constant_velocity_mse")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/data: the tiny store; root/data8: the same in a length unit 8 times smaller; root/none and root/rms:
    FastEGNN runs on root/data without and with normalisation, root/rms8 with it on root/data8."""
    root = tmp_path_factory.mktemp("normalization")
    open_dataset_store(config(root / "data").dataset, progress=False)
    shutil.copytree(root / "data" / STORE, root / "data8" / STORE)
    for split in ("train", "val", "test"):
        group = zarr.open_group(str(root / "data8" / STORE / split), mode="r+")
        for name in ("pos", "vel"):
            group[name][:] = group[name][:] * UNIT
    fit(root / "data", root / "none", "trainer.checkpoint_every_steps=0")
    assert STATISTICS_ATTR not in zarr.open_group(str(root / "data" / STORE)).attrs    # none reads no statistics
    fit(root / "data", root / "rms", *RMS)
    fit(root / "data8", root / "rms8", *RMS, f"dataset.mmd_sigma={1.5 * UNIT}")      # σ is a length too
    return root


def test_another_length_unit_leaves_the_loss_and_scales_every_reported_mse(root):
    """Guards the units: with rms the model sees the same numbers whatever the store's length unit, so the loss
    (and the MMD's share) is the same, while train/val/test MSE and the baselines stay in the store's units
    (× 8²). And normalisation changes training: the rms run differs from the none run."""
    one, eight = records(root / "rms"), records(root / "rms8")
    assert len(one) == len(eight) == 4
    for a, b in zip(one, eight):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-12)
        assert b["mmd_share"] == pytest.approx(a["mmd_share"], rel=1e-12)
        for key in REPORTED:
            if key in a:
                assert b[key] == pytest.approx(a[key] * UNIT ** 2, rel=1e-9), key
    plain = records(root / "none")
    assert [r["train_loss"] for r in plain] != [r["train_loss"] for r in one]
    # the baselines do not depend on the model: the same numbers with and without normalisation
    for key in ("zero_motion_mse", "constant_velocity_mse"):
        assert one[-1][key] == plain[-1][key]
    # train_loss is the objective in model units: its MSE part is train_mse / s_x²
    stats = zarr.open_group(str(root / "data" / STORE)).attrs[STATISTICS_ATTR]
    (record,) = stats.values()
    assert one[0]["train_mse"] / record["displacement_rms"] ** 2 == pytest.approx(
        one[0]["train_loss"] * (1 - one[0]["mmd_share"]), rel=1e-4)


def test_best_checkpoint_and_loaded_model_carry_the_statistics(root):
    best = torch.load(root / "rms" / "checkpoints" / "best.pt", weights_only=True)
    (record,) = zarr.open_group(str(root / "data" / STORE)).attrs[STATISTICS_ATTR].values()
    assert best["normalization"]["length"] == record["displacement_rms"]
    assert best["normalization"]["velocity"] == record["velocity_rms"]            # velocity_unit=store: factor 1
    model = dist_egnn.load_model(root / "rms")
    assert isinstance(model, NormalizedModel) and model.normalization.length == record["displacement_rms"]
    assert model.node_features == 2 and not model.training                     # the wrapped model's attributes
    assert "normalization" not in torch.load(root / "none" / "checkpoints" / "best.pt", weights_only=True)
    assert not isinstance(dist_egnn.load_model(root / "none"), NormalizedModel)


def test_loaded_model_and_rollout_predict_what_the_trainer_evaluated(root, tmp_path):
    """Guards prediction time: load_model scales inputs and unscales outputs as the trainer's evaluation does
    (same one-step predictions, bit for bit), and a rollout's first step scores the run's test_mse."""
    from dist_egnn.training.trainer import Trainer

    model = dist_egnn.load_model(root / "rms")
    test_mse = records(root / "rms")[-1]["test_mse"]
    trainer = Trainer.from_config(config(root / "data", *RMS), tmp_path / "again")
    try:
        trainer.engine.import_state(torch.load(root / "rms" / "checkpoints" / "best.pt", weights_only=True)["model"])
        assert trainer.evaluate("test") == test_mse
        data = trainer.data["test"]
        batch = next(data.batches(data.batch_ids(3, shuffle=False, seed=0, epoch=0)))
        with torch.no_grad():
            theirs = trainer.normalization.call(trainer.engine.model, batch.graph.model_inputs()).pos
            mine = model(**batch.graph.model_inputs()).pos
            raw = trainer.engine.model(**batch.graph.model_inputs()).pos
        assert torch.equal(mine, theirs)
        assert not torch.allclose(raw, theirs)                    # the scaling is not a no-op on this data
    finally:
        trainer.lock.release()
    result = rollout(model, model.config, open_store(model.config.dataset.store), "test", 1)
    assert result.mse[0] == pytest.approx(test_mse, rel=1e-6)


def test_a_model_trained_with_normalization_is_equivariant_end_to_end(root):
    """The loaded model, scaling included, on real test graphs: rotations, reflections, translations and
    permutations commute with it (only positive scalars multiply vectors)."""
    assert_loaded_model_equivariant(root / "rms")


def assert_loaded_model_equivariant(run: Path) -> None:
    model = dist_egnn.load_model(run, dtype="float64")
    cfg = model.config
    batch = next(load_splits(cfg, open_dataset_store(cfg.dataset, progress=False))["test"].batches(3, shuffle=False))
    graph = Graph(node_features=batch.node_features, pos=batch.pos, vel=batch.vel, edge_index=batch.edge_index,
                  edge_attr=batch.edge_attr, batch=batch.batch, num_graphs=batch.num_graphs)
    with torch.no_grad():
        assert_equivariant(lambda g: model(**g.kwargs()).pos, graph, torch.float64)


def test_a_best_checkpoint_without_its_statistics_is_refused(root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(root / "rms", run)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    del best["normalization"]
    torch.save(best, run / "checkpoints" / "best.pt")
    with pytest.raises(RunError, match=r"best\.pt holds no 'normalization'.*trainer\.normalization=rms"):
        dist_egnn.load_model(run)


def test_inputs_scale_vectors_and_length_features_by_positive_scalars_only():
    """What the model sees with rms: positions, distances and the gravity field over s_x, velocities and speeds over
    s_v, every other input untouched; none hands the very same objects over."""
    from dist_egnn.training.normalization import NONE, Normalization

    norm = Normalization.rms(dict(displacement_rms=0.5, velocity_rms=2.0), 4.0, ["speed", "charge"],
                             ["charge_product", "distance", "distance_sq"])
    assert norm.velocity == 8.0                                      # the velocity_unit factor applies to s_v
    g = torch.Generator().manual_seed(0)
    inputs = dict(pos=torch.randn(5, 3, generator=g), vel=torch.randn(5, 3, generator=g),
                  node_features=torch.rand(5, 2, generator=g), edge_attr=torch.rand(7, 3, generator=g),
                  gravity=torch.randn(2, 3, generator=g), batch=torch.zeros(5, dtype=torch.long),
                  moving=torch.ones(5, dtype=torch.bool), num_graphs=2)
    got = norm.inputs(inputs)
    torch.testing.assert_close(got["pos"], inputs["pos"] * 2.0)
    torch.testing.assert_close(got["vel"], inputs["vel"] / 8.0)
    torch.testing.assert_close(got["gravity"], inputs["gravity"] * 2.0)
    torch.testing.assert_close(got["node_features"], inputs["node_features"] * torch.tensor([1 / 8.0, 1.0]))
    torch.testing.assert_close(got["edge_attr"], inputs["edge_attr"] * torch.tensor([1.0, 2.0, 4.0]))
    assert all(got[k] is inputs[k] for k in ("batch", "moving", "num_graphs"))
    assert NONE.inputs(inputs) is inputs and NONE.model_units(inputs["pos"]) is inputs["pos"]
    assert norm.mmd_sigma(1.5, "gaussian") == 3.0 and norm.mmd_sigma(1.5, "unsquared") == pytest.approx(1.5 * 2 ** 0.5)


def test_radius_units_scale_lengths_by_the_radius_and_need_one():
    """trainer.normalization=radius: lengths over the graphs' radius, velocities over s_v as under rms; saved and
    restored as such; a complete graph (no radius) or a radius that is no positive length is refused by name."""
    from dist_egnn.training.normalization import Normalization

    record = dict(displacement_rms=0.5, velocity_rms=2.0)
    norm = Normalization.radius(record, 4.0, 0.25, ["speed"], ["distance", "distance_sq"])
    assert (norm.mode, norm.length, norm.velocity) == ("radius", 0.25, 8.0)
    pos, edges = torch.randn(5, 3), torch.rand(7, 2)
    got = norm.inputs(dict(pos=pos, vel=pos, edge_attr=edges))
    torch.testing.assert_close(got["pos"], pos * 4.0)
    torch.testing.assert_close(got["edge_attr"], edges * torch.tensor([4.0, 16.0]))
    assert Normalization.from_state(norm.state_dict()) == norm
    assert "the graphs' radius 0.25 (the displacement's RMS is 2 of it)" in norm.describe()
    for bad in (None, 0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match=r"trainer\.normalization=radius .*set dataset\.radius"):
            Normalization.radius(record, 4.0, bad, ["speed"], ["distance"])


def test_a_run_in_radius_units_trains_saves_and_loads_them(root, tmp_path):
    """End to end on the tiny N-body set with a radius graph: the objective is train_mse / r², best.pt and the
    loaded model carry r as the length unit, and the loaded model is equivariant."""
    run, radius = tmp_path / "radius", 4.0
    fit(root / "data", run, "trainer.normalization=radius", f"dataset.radius={radius}",
        "trainer.checkpoint_every_steps=0")
    first = records(run)[0]
    assert first["train_mse"] / radius ** 2 == pytest.approx(first["train_loss"] * (1 - first["mmd_share"]), rel=1e-4)
    (record,) = zarr.open_group(str(root / "data" / STORE)).attrs[STATISTICS_ATTR].values()
    saved = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["normalization"]
    assert (saved["mode"], saved["length"], saved["velocity"]) == ("radius", radius, record["velocity_rms"])
    model = dist_egnn.load_model(run)
    assert isinstance(model, NormalizedModel) and model.normalization.length == radius
    assert_loaded_model_equivariant(run)


def test_rms_warns_when_the_displacement_is_far_below_the_radius(root, tmp_path):
    """Under rms a displacement RMS far below the radius (a fine frame rate) inflates every distance the model
    reads: set-up warns and names trainer.normalization=radius; radius units and complete graphs say nothing."""
    from dist_egnn.training.normalization import SMALL_DISPLACEMENT, Normalization
    from dist_egnn.training.trainer import Trainer

    record = dict(displacement_rms=0.25, velocity_rms=1.0)
    norm = Normalization.rms(record, 1.0, [], [])
    assert norm.small_displacement(None) is None                                  # a complete graph
    assert norm.small_displacement(0.25 / SMALL_DISPLACEMENT) is None             # at the threshold
    assert "is 4x smaller than the graphs' radius 1" in norm.small_displacement(1.0)
    assert Normalization.radius(record, 1.0, 1.0, [], []).small_displacement(1.0) is None
    (stats,) = zarr.open_group(str(root / "data" / STORE)).attrs[STATISTICS_ATTR].values()
    radius = 4 * stats["displacement_rms"]
    with pytest.warns(UserWarning, match=r"4x smaller .*trainer\.normalization=radius keeps lengths"):
        trainer = Trainer.from_config(config(root / "data", "trainer.normalization=rms", f"dataset.radius={radius}"),
                                      tmp_path / "run")
    trainer.lock.release()
