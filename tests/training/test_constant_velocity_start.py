"""model.constant_velocity_start: the untrained model is the constant-velocity predictor x + αv, α fitted as the
reference baseline fits it (dist_egnn.measure.baselines), in the model's units with and without normalisation."""
from __future__ import annotations

import pytest
import torch

from dist_egnn.measure import baselines
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.training.setup import open_dataset_store
from dist_egnn.training.trainer import Trainer

from runs import config

START = "model.constant_velocity_start=true"


@pytest.mark.parametrize("model_class", [EGNN, FastEGNN])
def test_every_layer_adds_its_share_of_alpha_v(model_class):
    torch.manual_seed(0)
    n = 30
    pos, vel = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    edge_index = torch.stack(torch.nonzero(torch.cdist(pos, pos) < 1.5).T.unbind()).flip(0)
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    model = model_class(node_features=1, edge_features=1, hidden=16, layers=3).double()
    inputs = dict(node_features=vel.norm(dim=1, keepdim=True), pos=pos, vel=vel, edge_index=edge_index,
                  edge_attr=(pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True))
    before = model(**inputs).pos - pos
    model.start_at_constant_velocity(0.7)
    moved = model(**inputs).pos - pos
    # the other summands of (4) start near zero (gain 1e-3), so x + 0.7 v holds to ~1e-3 of |v|
    assert (moved - 0.7 * vel).abs().max() < 1e-2 * vel.abs().max()
    assert (before - 0.7 * vel).abs().max() > 0.1                       # and it was not so before
    for layer in model.layers:
        assert torch.all(layer.velocity_mlp[-1].weight == 0) and layer.velocity_mlp[-1].bias.item() == 0.7 / 3
    with pytest.raises(ValueError, match="alpha=nan"):
        model.start_at_constant_velocity(float("nan"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    data = tmp_path_factory.mktemp("cv_start") / "data"
    open_dataset_store(config(data, "dataset.velocity_unit=horizon").dataset, progress=False)
    return data


@pytest.mark.parametrize("normalization", ["none", "rms"])
def test_the_untrained_model_scores_the_constant_velocity_baseline(data, tmp_path, normalization):
    """Guards α's units: the test MSE of the model as set up, before any step, is the baseline's constant-velocity
    MSE on the same samples (velocity_unit=horizon: v in displacement per task step, so α is near 1)."""
    extra = (START, f"trainer.normalization={normalization}", "dataset.velocity_unit=horizon")
    trainer = Trainer.from_config(config(data, *extra), tmp_path / "run")
    try:
        untrained = trainer.evaluate("test")
        reference = baselines.score(trainer.data["train"].dataset, trainer.data["test"].dataset)
    finally:
        trainer.lock.release()
    assert untrained == pytest.approx(reference["constant_velocity_mse"], rel=2e-2)
    assert untrained < 0.9 * reference["zero_motion_mse"]             # not a model that predicts no motion
