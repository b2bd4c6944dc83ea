"""Radius and complete graphs, edge dropping, feature recipes."""
import numpy as np
import pytest

from dist_egnn.datasets.graphs import (
    complete_graph,
    drop_longest_edges,
    edge_features,
    graph_edges,
    node_features,
    radius_graph,
)


def brute_force_pairs(pos, r):
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    return {(i, j) for i, j in zip(*np.nonzero((d < r) & ~np.eye(len(pos), dtype=bool)))}


def test_radius_graph_equals_brute_force_both_directions():
    pos = np.random.default_rng(0).normal(size=(300, 3))
    edges = radius_graph(pos, 0.5)
    assert set(map(tuple, edges.T)) == brute_force_pairs(pos, 0.5)


def test_neighbor_cap_keeps_the_nearest_senders():
    pos = np.random.default_rng(1).normal(size=(200, 3))
    full, capped = radius_graph(pos, 1.0), radius_graph(pos, 1.0, max_neighbors=4)
    assert np.bincount(capped[0], minlength=200).max() <= 4
    for i in range(0, 200, 37):
        senders = full[1, full[0] == i]
        nearest = senders[np.argsort(np.linalg.norm(pos[senders] - pos[i], axis=1), kind="stable")[:4]]
        assert set(capped[1, capped[0] == i]) == set(nearest)



def test_capped_graph_of_piled_nodes_stays_bounded_and_equals_the_cap_of_the_full_graph():
    """A diverging rollout piles thousands of nodes inside one radius: the capped graph asks for the nearest
    only (n · cap edges, never the n² pairs), and on a spread cloud with walls equals capping the full graph."""
    piled = np.random.default_rng(3).normal(scale=1e-4, size=(6000, 3))
    assert radius_graph(piled, 0.075, max_neighbors=24).shape == (2, 6000 * 24)
    rng = np.random.default_rng(4)
    pos, walls = rng.uniform(size=(400, 3)), rng.uniform(size=400) < 0.4
    full = radius_graph(pos, 0.2, walls=walls)
    capped = radius_graph(pos, 0.2, max_neighbors=7, walls=walls)
    for i in range(400):
        senders = full[1, full[0] == i]
        nearest = senders[np.argsort(np.linalg.norm(pos[senders] - pos[i], axis=1))[:7]]
        assert set(capped[1, capped[0] == i]) == set(nearest)

def test_no_edge_joins_two_walls_and_every_other_pair_stays():
    """Walls (a dense lattice shell) and a cloud inside: the graph is the plain one minus wall -> wall edges,
    both directions of every wall-fluid pair kept; the cap then picks among the edges left."""
    rng = np.random.default_rng(2)
    side = np.arange(0.0, 1.01, 0.1)
    shell = np.array([(x, y, z) for x in side for y in side for z in side if min(x, y, z) == 0 or max(x, y, z) > 0.99])
    pos = np.concatenate([rng.uniform(0.05, 0.95, size=(150, 3)), shell])
    walls = np.arange(len(pos)) >= 150
    plain = radius_graph(pos, 0.15)
    wall_pair = walls[plain[0]] & walls[plain[1]]
    assert wall_pair.mean() > 0.5                                       # the case the rule is for
    got = radius_graph(pos, 0.15, walls=walls)
    assert sorted(map(tuple, got.T)) == sorted(map(tuple, plain[:, ~wall_pair].T))
    assert (walls[got[0]] & ~walls[got[1]]).any() and (~walls[got[0]] & walls[got[1]]).any()
    assert np.array_equal(radius_graph(pos, 0.15, walls=np.zeros(len(pos), bool)), plain)     # no walls: as before
    capped = radius_graph(pos, 0.15, max_neighbors=3, walls=walls)
    assert not (walls[capped[0]] & walls[capped[1]]).any() and np.bincount(capped[0]).max() <= 3
    for i in (0, 150, 151, 200):                                        # nearest 3 among the kept senders
        senders = got[1, got[0] == i]
        nearest = senders[np.argsort(np.linalg.norm(pos[senders] - pos[i], axis=1), kind="stable")[:3]]
        assert set(capped[1, capped[0] == i]) == set(nearest)
    complete = graph_edges(pos[145:155], None, walls=walls[145:155])    # 5 fluid, 5 walls
    assert complete.shape[1] == 10 * 9 - 5 * 4 and not (walls[145:155][complete].all(axis=0)).any()
    assert np.array_equal(graph_edges(pos, 0.15), plain)


def test_complete_graph_has_every_ordered_pair_once():
    e = complete_graph(5)
    assert e.shape == (2, 20) and len(set(map(tuple, e.T))) == 20 and not np.any(e[0] == e[1])


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_edge_dropping_keeps_the_shortest_floor_fraction(rate):
    pos = np.random.default_rng(2).normal(size=(50, 3))
    e = complete_graph(50)
    kept = drop_longest_edges(e, pos, rate)
    budget = int(np.floor((1 - rate) * e.shape[1]))
    assert kept.shape[1] == budget - budget % 2           # distinct lengths: whole pairs, at most the budget
    if 0 < kept.shape[1] < e.shape[1]:
        length = lambda x: np.linalg.norm(pos[x[0]] - pos[x[1]], axis=1)  # noqa: E731
        dropped = np.array(sorted(set(map(tuple, e.T)) - set(map(tuple, kept.T)))).T
        assert length(kept).max() <= length(dropped).min()


def test_edge_dropping_rejects_rates_outside_unit_interval():
    with pytest.raises(ValueError, match="cutoff_rate"):
        drop_longest_edges(complete_graph(3), np.zeros((3, 3)), 1.5)


def test_feature_recipes():
    pos = np.array([[0, 0, 0], [3, 4, 0]], dtype=np.float32)
    vel = np.array([[1, 0, 0], [0, 2, 0]], dtype=np.float32)
    charge = np.array([[1.0], [-1.0]], dtype=np.float32)
    f = node_features(["speed", "charge"], vel, charge, ["charge"])
    np.testing.assert_allclose(f, [[1, 1], [2, -1]])
    e = edge_features(["charge_product", "distance", "distance_sq"], complete_graph(2), pos, charge, ["charge"])
    np.testing.assert_allclose(e, [[-1, 5, 25], [-1, 5, 25]])
    with pytest.raises(ValueError, match="unknown node feature 'mass'"):
        node_features(["mass"], vel, charge, ["charge"])
    with pytest.raises(ValueError, match="unknown edge feature"):
        edge_features(["angle"], complete_graph(2), pos, charge, ["charge"])


def pairs_whole(edges: np.ndarray) -> bool:
    kept = set(map(tuple, edges.T))
    return all((j, i) in kept for i, j in kept)


@pytest.mark.parametrize("rate", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_edge_dropping_keeps_or_drops_both_directions_of_a_pair(rate):
    """A lattice has many exact ties: the keep boundary falls inside a group of equal lengths, and the
    two directions of a pair must not be split (issue 17 item 5)."""
    grid = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3) * 0.05
    e = radius_graph(grid, 0.075)
    budget = int(np.floor((1 - rate) * e.shape[1]))
    kept = drop_longest_edges(e, grid, rate)
    assert pairs_whole(kept) and budget - 1 <= kept.shape[1] <= budget
    ids = np.random.default_rng(0).permutation(len(grid)) + 1000        # other ids decide other ties
    kept = drop_longest_edges(e, grid, rate, node_ids=ids)
    assert pairs_whole(kept) and budget - 1 <= kept.shape[1] <= budget


def test_pair_rule_on_a_split_pair():
    """Three points on a line: lengths 1, 1 (two pairs) and 2; keeping 3 of 6 would split the second pair."""
    pos = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0]])
    e = complete_graph(3)
    kept = drop_longest_edges(e, pos, 0.5)                                # budget 3 -> the first pair only
    assert set(map(tuple, kept.T)) == {(0, 1), (1, 0)}
    kept = drop_longest_edges(e, pos, 1 / 3)                              # budget 4 -> both short pairs
    assert set(map(tuple, kept.T)) == {(0, 1), (1, 0), (1, 2), (2, 1)}
