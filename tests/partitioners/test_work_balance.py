"""Parts of equal work on graphs with walls: node i weighs 1 + the edges it receives
(``partitioners.strategies.work_weights``), so the fluid and its edges are spread over the parts instead of
landing on one part while the others hold idle walls; graphs without walls keep the node balance."""
from __future__ import annotations

import numpy as np
import pytest

from dist_egnn.datasets.graphs import graph_edges
from dist_egnn.datasets.sph import box_walls
from dist_egnn.partitioners import partition
from dist_egnn.partitioners.strategies import BALANCE_TOLERANCE, work_weights

RADIUS = 0.08


def fluid_in_a_box():
    """A block of 1,000 fluid particles in one corner of a box of 6,536 wall particles."""
    walls = box_walls([2.0, 2.0, 2.0], 0.03, 1)
    grid = np.arange(10) * 0.05
    fluid = np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3) + [-0.95, 0.05, -0.95]
    fluid += np.random.default_rng(0).normal(0, 0.004, fluid.shape)
    pos = np.concatenate([fluid, walls])
    is_wall = np.arange(len(pos)) >= len(fluid)
    return pos, is_wall


@pytest.mark.parametrize("method", ["metis", "spatial", "random"])
@pytest.mark.parametrize("parts, shares", [(2, None), (3, None), (2, [0.25, 0.75])])
def test_parts_balance_work_when_there_are_walls(method, parts, shares):
    pos, walls = fluid_in_a_box()
    edges = graph_edges(pos, RADIUS, walls=walls)
    work = work_weights(edges, len(pos))
    assert walls.mean() > 0.8 and (work[walls] == 1).mean() > 0.8      # most walls idle: node counts mislead
    split = partition(pos, parts, method, radius=RADIUS, seed=1, walls=walls, weights=shares)
    loads = np.bincount(split.assignment, weights=work, minlength=parts)
    target = work.sum() * (np.full(parts, 1 / parts) if shares is None else np.asarray(shares))
    slack = BALANCE_TOLERANCE * target + work.max()
    assert np.all(loads <= target + slack), (loads, target)
    if shares is None:      # equal parts hold more work than all the idle walls: each gets edges
        assert all((split.assignment[edges[0]] == p).any() for p in range(parts))


def test_node_balance_alone_leaves_the_work_on_one_part():
    """The problem the rule fixes, measured on the same scene: METIS by node count (no walls given)."""
    pos, walls = fluid_in_a_box()
    edges = graph_edges(pos, RADIUS, walls=walls)
    work = work_weights(edges, len(pos))
    by_count = partition(pos, 2, "metis", edge_index=edges, seed=1).assignment
    by_work = partition(pos, 2, "metis", edge_index=edges, seed=1, walls=walls).assignment
    imbalance = lambda a: np.bincount(a, weights=work).max() / (work.sum() / 2)  # noqa: E731
    assert imbalance(by_count) > 1.5 and imbalance(by_work) <= 1 + BALANCE_TOLERANCE + 1e-9
    metrics = partition(pos, 2, "metis", edge_index=edges, seed=1, walls=walls).metrics
    assert metrics.work_imbalance == pytest.approx(imbalance(by_work)) and metrics.imbalance > 1.2


def test_graphs_without_walls_keep_the_node_balance():
    pos, walls = fluid_in_a_box()
    plain = partition(pos, 3, "metis", radius=RADIUS, seed=2).assignment
    assert np.array_equal(partition(pos, 3, "metis", radius=RADIUS, seed=2, walls=np.zeros(len(pos), bool)).assignment,
                          plain)
