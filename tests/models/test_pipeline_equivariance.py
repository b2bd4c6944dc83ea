"""The whole N-body pipeline (store -> graph and features -> model) is E(3)- and permutation-equivariant.

Rotating, reflecting, translating and relabelling the raw data before graphs and features are built must
transform the predicted positions the same way: this catches a feature recipe that is not invariant (say,
a raw velocity component) as well as a model that is not equivariant.
"""
import numpy as np
import pytest
import torch

from dist_egnn.datasets.loader import TrajectoryDataset, collate
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import open_store
from dist_egnn.models import EGNN, FastEGNN

from equivariance import random_orthogonal


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = generate_nbody(tmp_path_factory.mktemp("data") / "nb.zarr",
                          NBodyConfig(num_particles=16, train=2, val=1, test=1, steps=1100), progress=False)
    return TrajectoryDataset(open_store(path), "train", delta_t=10, frame_start=0, frame_stop=1,
                             node_features=["speed", "charge"], edge_features=["charge_product", "distance_sq"],
                             cutoff_rate=0.5)


@pytest.mark.parametrize("model_cls", [EGNN, FastEGNN])
@pytest.mark.parametrize("reflect", [False, True])
def test_store_to_prediction_is_equivariant(dataset, model_cls, reflect):
    torch.manual_seed(0)
    model = model_cls().double()
    for name, module in model.named_modules():        # make the coordinate terms visible (see test_models)
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)
    group = dataset._pos.compute(), dataset._vel.compute(), dataset._scalars.compute()
    nodes = dataset.meta.scene_nodes(0)
    pos, vel, target = (a[f, nodes].astype(np.float64) for a, f in ((group[0], 0), (group[1], 0), (group[0], 10)))
    scalars = group[2][nodes]

    gen = torch.Generator().manual_seed(int(reflect))
    q = random_orthogonal(gen, reflect).numpy()
    shift = np.array([3.0, -1.0, 2.0])
    perm = np.random.default_rng(0).permutation(len(pos))

    def predict(p, v, t, s):
        batch = collate([dataset.make_sample(0, 0, p, v, t, s)]).to("cpu", torch.float64)
        return model(**batch.model_inputs()).pos.detach().numpy()

    out = predict(pos, vel, target, scalars)
    moved = predict((pos @ q.T + shift)[perm], (vel @ q.T)[perm], (target @ q.T + shift)[perm], scalars[perm])
    expected = (out @ q.T + shift)[perm]
    assert np.abs(moved - expected).max() / np.abs(expected).max() < 1e-10
