"""dist_egnn.measure.baselines: the zero-motion and constant-velocity reference errors."""
from types import SimpleNamespace

import numpy as np
import pytest

from dist_egnn.measure.baselines import score


class Split:
    """Samples whose motion over Δt is ``alpha * vel`` plus noise of standard deviation ``noise``."""

    def __init__(self, n: int, alpha: float, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        self.samples = []
        for _ in range(n):
            pos, vel = rng.normal(size=(7, 3)), rng.normal(size=(7, 3))
            target = pos + alpha * vel + noise * rng.normal(size=(7, 3))
            self.samples.append(SimpleNamespace(pos=pos, vel=vel, target=target))

    def __len__(self):
        return len(self.samples)

    def read(self, indices):
        return [self.samples[i] for i in indices]


def test_constant_velocity_recovers_alpha_and_the_noise_floor():
    result = score(Split(120, alpha=2.5, noise=0.1, seed=0), Split(60, alpha=2.5, noise=0.1, seed=1))
    assert result["constant_velocity_alpha"] == pytest.approx(2.5, abs=0.02)
    assert result["constant_velocity_mse"] == pytest.approx(0.01, rel=0.15)     # the noise variance
    assert result["zero_motion_mse"] == pytest.approx(2.5 ** 2 + 0.01, rel=0.15)  # |α v|² per coordinate
    assert result["test_samples"] == 60 and result["fit_samples"] == 120


def test_alpha_is_fitted_on_train_only():
    result = score(Split(50, alpha=1.0, noise=0.0, seed=0), Split(50, alpha=-1.0, noise=0.0, seed=1))
    assert result["constant_velocity_alpha"] == pytest.approx(1.0)
    assert result["constant_velocity_mse"] == pytest.approx(4 * 1.0, rel=0.2)     # (−v − v)² = 4 v²
