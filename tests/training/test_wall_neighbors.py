"""Nearest-wall edges (``dataset.wall_neighbors`` = k): every moving node receives from its k nearest walls
however far, or only within ``dataset.wall_neighbors_reach``, the choice is invariant under rotations and
translations, a stored partition's halo holds those walls so P ranks in exact mode build the whole graph's
edges, in drop mode each rank's graph is its part's own (``datasets.graphs.part_graphs``), which the one-process
reference reproduces, a rollout step builds the loader's graph, and a store without walls refuses the option.

The store is test_walls.py's hand-made box of falling particles with wall rows (fluid rows first).
"""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from omegaconf import OmegaConf
from scipy.spatial.transform import Rotation

from dist_egnn.datasets.graphs import graph_edges, part_graphs, radius_graph
from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import StoreError, open_store
from dist_egnn.inference.rollout import GraphRecipe, build_graph
from dist_egnn.partitioners.artifacts import load_assignments, partition_status, prepare_partitions
from dist_egnn.training.rank_data import RankData
from tests.training.test_walls import RADIUS, SCENES, dataset, rank_ids, wall_store

K = 2
REACH = 0.38      # the second-nearest walls beyond the radius (0.35) lie at 0.35-0.43: some within, some not


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return wall_store(tmp_path_factory.mktemp("nearwalls") / "data" / "walls.zarr")


def scene(store):
    sample = dataset(store).read([0])[0]
    return sample.pos.astype(np.float64), ~sample.moving


def test_every_moving_node_receives_from_its_k_nearest_walls(store):
    pos, walls = scene(store)
    edges = graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K)
    plain = radius_graph(pos, RADIUS, walls=walls)
    pairs = set(map(tuple, edges.T.tolist()))
    assert set(map(tuple, plain.T.tolist())) <= pairs and len(pairs) == edges.shape[1]   # no duplicate
    wall_ids = np.flatnonzero(walls)
    far = 0
    for i in np.flatnonzero(~walls):
        d = np.linalg.norm(pos[wall_ids] - pos[i], axis=1)
        for w in wall_ids[np.argsort(d)[:K]]:
            assert (i, w) in pairs
            far += np.linalg.norm(pos[w] - pos[i]) >= RADIUS
    assert far > 0                                   # some nearest walls lie beyond the radius: new edges
    extra = pairs - set(map(tuple, plain.T.tolist()))
    assert all(not walls[r] and walls[s] for r, s in extra)        # only wall -> moving, walls receive nothing new
    assert np.array_equal(graph_edges(pos, RADIUS, walls=walls, wall_neighbors=0), plain)


def test_a_reach_keeps_only_the_nearest_walls_within_it(store):
    """guards: a particle flung far from the box still wired to walls farther than training ever showed."""
    pos, walls = scene(store)
    plain = set(map(tuple, radius_graph(pos, RADIUS, walls=walls).T.tolist()))
    unbounded = set(map(tuple, graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K).T.tolist()))
    bounded = graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K, wall_reach=REACH)
    wall_ids = np.flatnonzero(walls)
    expected = set(plain)
    for i in np.flatnonzero(~walls):
        d = np.linalg.norm(pos[wall_ids] - pos[i], axis=1)
        expected |= {(i, w) for w, dw in zip(wall_ids[np.argsort(d)[:K]], np.sort(d)[:K]) if dw <= REACH}
    assert set(map(tuple, bounded.T.tolist())) == expected and len(expected) == bounded.shape[1]
    assert plain < expected < unbounded                  # the reach drops some nearest walls and keeps others
    assert np.array_equal(graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K, wall_reach=100.0),
                          graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K))   # a reach beyond all: as none


def test_a_rollout_step_builds_the_loaders_graph_with_a_reach(store):
    cfg = OmegaConf.create({"dataset": {"radius": RADIUS, "wall_neighbors": K, "wall_neighbors_reach": REACH,
                                        "node_features": ["speed", "type"], "edge_features": ["distance"],
                                        "delta_t": 2}, "model": {}})
    data = dataset(store, wall_neighbors=K, wall_neighbors_reach=REACH)
    sample = data.read([3])[0]
    step = build_graph(sample.pos, sample.vel, data.read_states([data.locate(3)])[0][3],
                       GraphRecipe.of(cfg, open_store(store)))
    np.testing.assert_array_equal(step.edge_index, sample.edge_index)
    assert not np.array_equal(sample.edge_index, dataset(store, wall_neighbors=K).read([3])[0].edge_index)


def test_nearest_walls_do_not_depend_on_the_frame_of_reference(store):
    pos, walls = scene(store)
    rotated = pos @ Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix().T + [5.0, -2.0, 0.5]
    a = set(map(tuple, graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K).T.tolist()))
    b = set(map(tuple, graph_edges(rotated, RADIUS, walls=walls, wall_neighbors=K).T.tolist()))
    assert a == b


@pytest.mark.parametrize("reach", [None, REACH])
def test_exact_ranks_build_the_whole_graph_and_drop_ranks_their_parts_graphs(store, reach):
    data = dataset(store, wall_neighbors=K, wall_neighbors_reach=reach)
    splits = {split: dataset(store, split, wall_neighbors=K, wall_neighbors_reach=reach) for split in SCENES}
    path = prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads")
    stored = load_assignments(path, "train")
    # the artifact records the options: the partition of the plain graph (or of the unbounded one) is another one
    plain = {split: dataset(store, split) for split in SCENES}
    inputs = zarr.open_group(str(path), mode="r").attrs["inputs"]
    assert inputs["wall_neighbors"] == K and inputs.get("wall_neighbors_reach") == reach
    assert partition_status(plain, "metis", 2)[1] != partition_status(splits, "metis", 2)[1]
    if reach is not None:
        unbounded = {split: dataset(store, split, wall_neighbors=K) for split in SCENES}
        assert partition_status(unbounded, "metis", 2)[1] != partition_status(splits, "metis", 2)[1]
    for i in (0, 4):
        sc, frame = data.locate(i)
        sample = data.read([i])[0]
        walls, parts = ~sample.moving, stored.of(sc, frame)
        whole = graph_edges(sample.pos, RADIUS, walls=walls, wall_neighbors=K, wall_reach=reach)
        per_part = part_graphs(sample.pos, parts, 2, RADIUS, walls=walls, wall_neighbors=K, wall_reach=reach)
        reference = RankData(data, 0, 2, assignments=stored, sequential=True).build([i])
        assert reference.graph.edge_index.shape[1] == sum(g.shape[1] for g in per_part)
        for part in range(2):
            exact = RankData(data, part, 2, halo=True, assignments=stored).build([i])
            ids = rank_ids(stored, part, sc, frame)
            got = {(ids[r], ids[q]) for r, q in exact.graph.edge_index.T.tolist()}
            assert got == {(r, q) for r, q in whole.T.tolist() if parts[r] == part}
            drop = RankData(data, part, 2, assignments=stored).build([i])
            owned = np.flatnonzero(parts == part)
            got = {(owned[r], owned[q]) for r, q in drop.graph.edge_index.T.tolist()}
            assert got == set(map(tuple, per_part[part].T.tolist()))
            wall_senders = {q for r, q in got if walls[q]}
            assert all(parts[q] == part for q in wall_senders)       # a part's own walls only


def test_a_store_without_walls_refuses_wall_neighbors(tmp_path):
    path = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=6, train=2, val=1, test=1, steps=300),
                          progress=False)
    with pytest.raises(StoreError, match="dataset.wall_neighbors=1.*no node scalar `type`"):
        TrajectoryDataset(open_store(path), "train", delta_t=1, node_features=["speed"], edge_features=["distance"],
                          wall_neighbors=1)
