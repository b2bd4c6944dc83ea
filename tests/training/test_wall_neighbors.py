"""Nearest-wall edges (``dataset.wall_neighbors`` = k): every moving node receives from its k nearest walls
however far, the choice is invariant under rotations and translations, a stored partition's halo holds those
walls so P ranks in exact mode build the whole graph's edges, in drop mode each rank's graph is its part's own
(``datasets.graphs.part_graphs``), which the one-process reference reproduces, and a store without walls
refuses the option.

The store is test_walls.py's hand-made box of falling particles with wall rows (fluid rows first).
"""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy.spatial.transform import Rotation

from dist_egnn.datasets.graphs import graph_edges, part_graphs, radius_graph
from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import StoreError, open_store
from dist_egnn.partitioners.artifacts import load_assignments, partition_status, prepare_partitions
from dist_egnn.training.rank_data import RankData
from tests.training.test_walls import RADIUS, SCENES, dataset, rank_ids, wall_store

K = 2


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


def test_nearest_walls_do_not_depend_on_the_frame_of_reference(store):
    pos, walls = scene(store)
    rotated = pos @ Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix().T + [5.0, -2.0, 0.5]
    a = set(map(tuple, graph_edges(pos, RADIUS, walls=walls, wall_neighbors=K).T.tolist()))
    b = set(map(tuple, graph_edges(rotated, RADIUS, walls=walls, wall_neighbors=K).T.tolist()))
    assert a == b


def test_exact_ranks_build_the_whole_graph_and_drop_ranks_their_parts_graphs(store):
    data = dataset(store, wall_neighbors=K)
    splits = {split: dataset(store, split, wall_neighbors=K) for split in SCENES}
    path = prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads")
    stored = load_assignments(path, "train")
    # the artifact records the option: the partition of the plain graph is another one
    plain = {split: dataset(store, split) for split in SCENES}
    assert zarr.open_group(str(path), mode="r").attrs["inputs"]["wall_neighbors"] == K
    assert partition_status(plain, "metis", 2)[1] != partition_status(splits, "metis", 2)[1]
    for i in (0, 4):
        sc, frame = data.locate(i)
        sample = data.read([i])[0]
        walls, parts = ~sample.moving, stored.of(sc, frame)
        whole = graph_edges(sample.pos, RADIUS, walls=walls, wall_neighbors=K)
        per_part = part_graphs(sample.pos, parts, 2, RADIUS, walls=walls, wall_neighbors=K)
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
