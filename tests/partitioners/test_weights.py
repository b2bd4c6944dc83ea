"""Weighted parts (distributed.part_weights, issue 20 item 3): every method gives part p about w_p of the nodes,
equal weights give exactly the unweighted parts, bad weight vectors are refused, and weights name the stored
partition."""
from __future__ import annotations

import numpy as np
import pytest

from dist_egnn.config import part_weights_problem
from dist_egnn.errors import ConfigError
from dist_egnn.partitioners import partition
from dist_egnn.partitioners.artifacts import artifact_path, canonical_weights
from dist_egnn.partitioners.strategies import BALANCE_TOLERANCE
from dist_egnn.training.weights import shares_from_seconds

POS = np.random.default_rng(0).uniform(0, 1, (1500, 3))


@pytest.mark.parametrize("method", ["metis", "spatial", "random"])
@pytest.mark.parametrize("weights", [[1 / 3, 2 / 3], [0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.25]])
def test_every_method_honours_the_weights(method, weights):
    sizes = np.bincount(partition(POS, len(weights), method, radius=0.12, weights=weights).assignment,
                        minlength=len(weights))
    target = np.asarray(weights) * len(POS)
    bound = np.ceil((1 + BALANCE_TOLERANCE) * target) if method == "metis" else target + 2
    assert np.all(sizes <= bound) and np.all(sizes > 0), (sizes, target)
    assert np.abs(sizes - target).max() <= 0.05 * len(POS), (sizes, target)


@pytest.mark.parametrize("method", ["metis", "spatial", "random"])
def test_equal_weights_are_the_unweighted_parts(method):
    """Guards the stored partitions made before weights existed: equal weights must not change an assignment."""
    plain = partition(POS, 3, method, radius=0.12, seed=4).assignment
    assert np.array_equal(partition(POS, 3, method, radius=0.12, seed=4, weights=[1 / 3] * 3).assignment, plain)


@pytest.mark.parametrize("weights, message", [([0.5, 0.5, 0.0], "positive"), ([0.5, 0.3], "sum to 0.8"),
                                              ([1.0], "1 shares for 2 parts")])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(ConfigError, match=message):
        partition(POS, len(weights) if message != "1 shares for 2 parts" else 2, "random", weights=weights)


def test_config_check_of_part_weights():
    assert part_weights_problem("uniform", 2) is None and part_weights_problem("measured", 4) is None
    assert part_weights_problem([0.4, 0.6], 2) is None
    assert "has 3 shares but distributed.parts=2" in part_weights_problem([0.2, 0.3, 0.5], 2)
    assert "sums to 2, not 1" in part_weights_problem([1, 1], 2)
    assert "choose uniform, measured" in part_weights_problem("fast", 2)


def test_weights_name_the_stored_partition(tmp_path):
    store = tmp_path / "d.zarr"
    plain = artifact_path(store, "metis", 2, 0)
    assert plain.name == "metis-p2-s0.zarr" and artifact_path(store, "metis", 2, 0, [0.5, 0.5]) == plain
    weighted = artifact_path(store, "metis", 2, 0, [0.33, 0.67])
    assert weighted.name.startswith("metis-p2-s0-w") and weighted != artifact_path(store, "metis", 2, 0, [0.34, 0.66])
    assert canonical_weights([1 / 3, 2 / 3], 2) == [0.333333, 0.666667]


def test_measured_shares_follow_speed():
    assert shares_from_seconds([2.0, 1.0]) == [0.33, 0.67]              # rank 0 at half speed
    assert shares_from_seconds([1.0, 1.05]) is None                    # within timing noise: equal parts
    shares = shares_from_seconds([3.0, 1.0, 1.0, 1.0])
    assert abs(sum(shares) - 1) < 1e-12 and shares[0] == min(shares)
