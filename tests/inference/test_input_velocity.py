"""dataset.input_velocity=displacement: the input velocity at frame t is (x(t) − x(t − Δt)) / (Δt·dt) in the
training unit, what a rollout feeds back; input frames before Δt are left out, and a rollout starts at the first
input frame training used, its first step fed exactly what the loader fed.

The toy store of test_rollout.py moves every particle at exact constant velocity, so the displacement velocity
equals the stored one; a store of uniformly accelerated particles shows the lag g·Δt·dt/2 that the option
exists for.
"""
from __future__ import annotations

import numpy as np
import pytest

from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.store import StoreError, atomic_store, create_split, open_store, write_root_attrs, write_scenes
from dist_egnn.errors import ConfigError
from dist_egnn.inference.rollout import RolloutError, rollout
from dist_egnn.keys import SPLITS
from tests.inference.test_rollout import DELTA_T, DT, ConstantVelocity, run_config, toy_store

G = np.array([0.0, -1.0, 0.0])          # uniform acceleration of the falling store (exact in binary)


def falling_store(path, n: int = 12, frames: int = 9):
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 64, size=(1, n, 3)) / 32
    v0 = rng.integers(-4, 5, size=(1, n, 3)) / 32
    t = (np.arange(frames) * DT)[None, :, None, None]
    pos = (x0[:, None] + v0[:, None] * t + 0.5 * G * t**2).astype(np.float32)
    vel = (v0[:, None] + G * t).astype(np.float32)
    with atomic_store(path) as root:
        write_root_attrs(root, dataset="fall", source="toy", dt=DT, units={"length": "m", "time": "s"},
                         radius=None, node_scalars=["type"], generator={})
        for split in SPLITS:
            write_scenes(create_split(root, split, [n], frames, 1), 0, pos, vel, np.zeros((1, n, 1), np.float32))
    return open_store(path)


def data(info, **kw):
    return TrajectoryDataset(info, "train", delta_t=DELTA_T, node_features=["speed"], edge_features=["distance"],
                             velocity_scale=DELTA_T * DT, **kw)


def test_displacement_velocity_lags_the_stored_one_by_half_a_step_of_acceleration(tmp_path):
    info = falling_store(tmp_path / "fall.zarr")
    stored, displaced = data(info), data(info, input_velocity="displacement")
    assert displaced.frames.tolist() == [f for f in stored.frames.tolist() if f >= DELTA_T]
    a = stored.read([stored.frames.tolist().index(4)])[0]
    b = displaced.read([displaced.frames.tolist().index(4)])[0]
    assert np.array_equal(a.pos, b.pos) and np.array_equal(a.target, b.target)
    step = DELTA_T * DT                                 # horizon unit: velocities as displacement per task step
    lag = (a.vel - b.vel) / step
    np.testing.assert_allclose(lag, np.broadcast_to(G * step / 2, lag.shape), atol=1e-6)


def test_rollout_of_a_displacement_run_starts_where_training_did_and_sees_the_loaders_inputs(tmp_path):
    info = toy_store(tmp_path / "toy.zarr")
    cfg = run_config("horizon")
    cfg.dataset.input_velocity = "displacement"
    seen = []

    class Recorder(ConstantVelocity):
        def forward(self, node_features, pos, vel, *args, **kw):
            seen.append(vel.clone())
            return super().forward(node_features, pos, vel, *args, **kw)

    result = rollout(Recorder(1.0), cfg, info, "test", 2)
    assert result.start == DELTA_T                                     # frame 0 has no step before it
    loader = TrajectoryDataset(info, "test", delta_t=DELTA_T, node_features=["speed", "type"],
                               edge_features=["distance"], velocity_scale=DELTA_T * DT, input_velocity="displacement")
    first = loader.read([0])[0]
    assert first.frame == DELTA_T
    np.testing.assert_array_equal(seen[0].numpy(), first.vel)
    np.testing.assert_array_equal(result.pred, result.truth)          # constant motion: exact either way
    with pytest.raises(RolloutError, match="input_velocity=displacement.*start at frame 2"):
        rollout(Recorder(1.0), cfg, info, "test", 1, start=0)


def test_bad_values_are_refused(tmp_path):
    info = toy_store(tmp_path / "toy.zarr")
    with pytest.raises(ConfigError, match="dataset.input_velocity='velocity'"):
        data(info, input_velocity="velocity")
    with pytest.raises(StoreError, match="input_velocity=displacement needs input frames >= delta_t"):
        data(info, input_velocity="displacement", frame_stop=DELTA_T)
