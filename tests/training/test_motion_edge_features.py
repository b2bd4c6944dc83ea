"""The edge features for particle fluids: ``radial_velocity`` (v_i − v_j) · (x_i − x_j) / |x_i − x_j|, the speed
at which an edge's ends separate, ``distance_per_radius`` |x_i − x_j| / radius and ``height_per_radius``
(x_i − x_j) · u / radius with u = −g / |g|. Their worked values, their invariance when positions, velocities and
the field move together, and that every graph builder computes them alike: the loader, a rollout step, and P
ranks in exact halo mode (halo rows carry their velocities, with the training noise), so exact mode still equals
one process. A complete graph refuses the per-radius features, a dataset without gravity ``height_per_radius``.

The store is test_walls.py's hand-made box of falling particles with wall rows.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from dist_egnn.datasets.graphs import edge_features, graph_edges, up_of
from dist_egnn.datasets.loader import TrajectoryDataset, task_gravity
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.inference.rollout import GraphRecipe, build_graph
from dist_egnn.partitioners.artifacts import load_assignments, prepare_partitions
from dist_egnn.training.normalization import Normalization
from dist_egnn.training.rank_data import RankData
from tests.training.test_walls import RADIUS, SCENES, dataset, rank_ids, wall_store

RECIPE = ["distance", "radial_velocity", "distance_per_radius", "height_per_radius"]
GRAVITY = np.array([0.0, -2.0, 0.0], np.float32)    # any field: height_per_radius reads its direction only


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return wall_store(tmp_path_factory.mktemp("radial") / "data" / "walls.zarr")


def test_radial_velocity_is_the_speed_at_which_the_ends_separate():
    pos = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])    # a particle above a wall; a copy of it
    vel = np.array([[0.0, -2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    edges = np.array([[0, 1, 1], [1, 0, 2]])                             # wall -> particle, back, coincident pair
    got = edge_features(["radial_velocity"], edges, pos, np.zeros((3, 0)), [], vel)[:, 0]
    np.testing.assert_array_equal(got, [-2.0, -2.0, 0.0])               # closing at 2 m/step; both directions alike
    with pytest.raises(ValueError, match="radial_velocity.*velocities"):
        edge_features(["radial_velocity"], edges, pos, np.zeros((3, 0)), [])


def test_distance_per_radius_puts_a_radius_graphs_neighbours_at_0_to_1(store, tmp_path):
    pos = np.array([[0.0, 0.0, 0.0], [0.03, 0.04, 0.0]])
    edges = np.array([[0, 1], [1, 0]])
    got = edge_features(["distance_per_radius", "distance"], edges, pos, np.zeros((2, 0)), [], radius=0.1)
    np.testing.assert_allclose(got, [[0.5, 0.05], [0.5, 0.05]], rtol=1e-6)
    sample = dataset(store, edge_features=["distance_per_radius"]).read([0])[0]
    assert 0 < sample.edge_attr.min() and sample.edge_attr.max() <= 1.0
    complete = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=5, train=1, val=1, test=1, steps=300),
                              progress=False)                   # N-body: no radius, the complete graph
    with pytest.raises(ConfigError, match="distance_per_radius.*complete.*dataset.radius"):
        TrajectoryDataset(open_store(complete), "train", delta_t=1, node_features=["speed"],
                          edge_features=["distance_per_radius"])


def test_height_per_radius_tells_the_two_sides_of_a_wall_apart(store, tmp_path):
    pos = np.array([[0.0, 0.0, 0.0], [0.0, 0.03, 0.0], [0.0, -0.03, 0.0]])    # a wall; a particle above, below
    edges = np.array([[1, 2, 0], [0, 0, 1]])                               # wall -> both particles, one back
    up = up_of([0.0, -9.81, 0.0])
    got = edge_features(["height_per_radius", "distance_per_radius"], edges, pos, np.zeros((3, 0)), [],
                        radius=0.075, up=up)
    np.testing.assert_allclose(got, [[0.4, 0.4], [-0.4, 0.4], [-0.4, 0.4]], rtol=1e-6)  # distances alike, sides not
    assert up_of(None) is None and up_of([0.0, 0.0, 0.0]) is None
    with pytest.raises(ValueError, match="height_per_radius.*up="):
        edge_features(["height_per_radius"], edges, pos, np.zeros((3, 0)), [], radius=0.075)
    with pytest.raises(ConfigError, match="height_per_radius.*dataset.gravity is null"):
        dataset(store, edge_features=["height_per_radius"])
    with pytest.raises(ConfigError, match="height_per_radius.*dataset.gravity is zero"):
        dataset(store, edge_features=["height_per_radius"], gravity=np.zeros(3))
    sample = dataset(store, edge_features=["height_per_radius"], gravity=GRAVITY).read([0])[0]
    recv, send = sample.edge_index
    np.testing.assert_allclose(sample.edge_attr[:, 0], (sample.pos[recv, 1] - sample.pos[send, 1]) / RADIUS,
                               rtol=1e-5, atol=1e-6)


def test_the_edge_features_do_not_depend_on_the_frame_of_reference():
    rng = np.random.default_rng(0)
    pos, vel = rng.normal(size=(30, 3)), rng.normal(size=(30, 3))
    edges = graph_edges(pos, 1.2)
    turn = Rotation.from_euler("xyz", [0.4, -1.3, 2.2]).as_matrix() @ np.diag([1.0, 1.0, -1.0])  # with a reflection
    g = np.array([0.3, -9.0, 1.0])
    a = edge_features(RECIPE, edges, pos, np.zeros((30, 0)), [], vel, 1.2, up_of(g))
    b = edge_features(RECIPE, edges, pos @ turn.T + [3.0, -1.0, 0.5], np.zeros((30, 0)), [], vel @ turn.T, 1.2,
                      up_of(g @ turn.T))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.abs(a[:, 3]).max() > 0.1


def test_loader_and_rollout_step_compute_the_same_features(store):
    field = [0.7, -9.81, 0.3]                           # m/s², tilted: float rounding could tell the two apart
    cfg = OmegaConf.create({"dataset": {"radius": RADIUS, "wall_neighbors": 2, "node_features": ["speed", "type"],
                                        "edge_features": RECIPE, "gravity": field, "delta_t": 2,
                                        "velocity_unit": "horizon"}, "model": {}})
    info = open_store(store)
    data = dataset(store, edge_features=RECIPE, wall_neighbors=2,
                   gravity=task_gravity(field, "horizon", 2, info.attrs["dt"]))      # as training's set-up
    sample = data.read([3])[0]
    assert (sample.edge_attr[:, 1] < 0).any() and (sample.edge_attr[:, 1] > 0).any()
    recipe = GraphRecipe.of(cfg, info)                  # what launch/predict.py builds from config.yaml
    assert recipe.up == tuple(data.up.tolist())
    scalars = data.read_states([data.locate(3)])[0][3]
    step = build_graph(sample.pos, sample.vel, scalars, recipe)
    np.testing.assert_array_equal(step.edge_index, sample.edge_index)
    np.testing.assert_array_equal(step.edge_attr, sample.edge_attr)


def test_two_ranks_in_exact_mode_see_one_process_radial_velocities(store):
    """Halo rows carry their (noisy) input velocities: every rank's edge features are one process's."""
    splits = {split: dataset(store, split, edge_features=RECIPE, gravity=GRAVITY) for split in SCENES}
    data = splits["train"]
    stored = load_assignments(prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads"), "train")
    noise = RADIUS / 10
    whole = RankData(data, noise=noise).build([3], seed=1, epoch=0)
    scene, frame = data.locate(3)
    for part in range(2):
        rank = RankData(data, part, 2, halo=True, assignments=stored, noise=noise).build([3], seed=1, epoch=0)
        ids = rank_ids(stored, part, scene, frame)
        owned = set(ids[:len(rank.graph.pos)].tolist())
        got = {(ids[r], ids[q]): a
               for (r, q), a in zip(rank.graph.edge_index.T.tolist(), rank.graph.edge_attr.tolist())}
        want = {(r, q): a for (r, q), a in zip(whole.graph.edge_index.T.tolist(), whole.graph.edge_attr.tolist())
                if r in owned}
        assert got == want and any(ids[q] not in owned for _, q in rank.graph.edge_index.T.tolist())


def test_rms_normalization_scales_radial_velocity_as_a_velocity_and_leaves_the_per_radius_features():
    norm = Normalization.rms({"displacement_rms": 2.0, "velocity_rms": 4.0}, 1.0, ["speed"], RECIPE)
    attrs = norm.inputs({"pos": torch.zeros(1, 3), "vel": torch.zeros(1, 3),
                         "edge_attr": torch.tensor([[2.0, 8.0, 0.5, -0.25]])})
    assert attrs["edge_attr"].tolist() == [[1.0, 2.0, 0.5, -0.25]]
