"""The normalisation statistics of a store (datasets/statistics.py): what they are, where they go, bad stores."""
import numpy as np
import pytest
import zarr

from dist_egnn.datasets.prepare import store_identity
from dist_egnn.datasets.statistics import (
    STATISTICS_ATTR,
    compute_statistics,
    ensure_statistics,
    recorded_statistics,
    statistics_key,
)
from dist_egnn.datasets.store import StoreError, atomic_store, create_split, open_store, write_root_attrs, write_scenes
from dist_egnn.training.normalization import Normalization

FRAMES, FLUID, WALLS = 7, 5, 3


def make_store(path, moving: bool = True):
    """Two training scenes of FLUID fluid particles and WALLS static walls (type 1) whose positions move by a
    random walk (not at all without ``moving``); val/test one scene each. Returns (path, train pos, vel, type)."""
    rng = np.random.default_rng(0)
    n = FLUID + WALLS
    kinds = np.array([0] * FLUID + [1] * WALLS, np.float32)
    arrays = {}
    with atomic_store(path) as root:
        write_root_attrs(root, dataset="toy", source="synthetic", dt=0.1, units={"length": "m", "time": "s"},
                         radius=1.0, node_scalars=["type"], generator={})
        for split, scenes in (("train", 2), ("val", 1), ("test", 1)):
            group = create_split(root, split, [n] * scenes, FRAMES, 1, chunk_nodes=4)
            steps = rng.normal(size=(scenes, FRAMES, n, 3)).astype(np.float32) * moving
            steps[:, :, FLUID:] = 0.0                                   # walls never move
            pos = (np.cumsum(steps, axis=1) + rng.normal(size=(scenes, 1, n, 3)) * 10).astype(np.float32)
            vel = rng.normal(size=(scenes, FRAMES, n, 3)).astype(np.float32) * moving
            vel[:, :, FLUID:] = 0.0
            write_scenes(group, 0, pos, vel, np.broadcast_to(kinds[None, :, None], (scenes, n, 1)).copy())
            arrays[split] = (pos, vel)
    return path, arrays["train"], kinds


def test_statistics_are_the_rms_over_moving_nodes_of_the_training_frames(tmp_path):
    """Guards the definition: pooled over the 3 axes, training split only, walls left out, only the frames the
    run reads (delta_t, frame_start, frame_stop, frame_stride)."""
    path, (pos, vel), kinds = make_store(tmp_path / "toy.zarr")
    got = compute_statistics(open_store(path), delta_t=2, frame_start=1, frame_stop=None, frame_stride=2)
    frames = np.arange(1, FRAMES - 2, 2)                                # 1, 3: inputs with a target 2 frames on
    fluid = kinds == 0
    displacement = (pos[:, frames + 2] - pos[:, frames])[:, :, fluid].astype(np.float64)
    velocity = vel[:, frames][:, :, fluid].astype(np.float64)
    assert got["displacement_rms"] == pytest.approx(np.sqrt(np.mean(displacement ** 2)), rel=1e-6)
    assert got["velocity_rms"] == pytest.approx(np.sqrt(np.mean(velocity ** 2)), rel=1e-6)
    assert got["displacement_mean_norm"] == pytest.approx(np.linalg.norm(displacement, axis=-1).mean(), rel=1e-6)
    assert got["samples"] == 2 * len(frames) and got["moving_nodes"] == 2 * FLUID
    with_walls = np.sqrt(np.mean((pos[:, frames + 2] - pos[:, frames]).astype(np.float64) ** 2))
    assert got["displacement_rms"] > with_walls                       # the static walls would pull it down


def test_a_displacement_input_velocity_gets_statistics_of_its_own(tmp_path):
    """dataset.input_velocity=displacement feeds (x(t) - x(t - Δt)) / (Δt dt) from frame Δt on: its velocity RMS is
    of that velocity over those frames, under a key of its own (it used to share the stored velocity's record)."""
    path, (pos, vel), kinds = make_store(tmp_path / "toy.zarr")
    info = open_store(path)
    got = compute_statistics(info, delta_t=2, frame_start=1, frame_stride=2, input_velocity="displacement")
    frames = np.array([3])                                             # 1 and 3 have targets; only 3 is >= Δt
    fluid = kinds == 0
    velocity = ((pos[:, frames] - pos[:, frames - 2]) / (2 * 0.1))[:, :, fluid].astype(np.float64)
    displacement = (pos[:, frames + 2] - pos[:, frames])[:, :, fluid].astype(np.float64)
    assert got["velocity_rms"] == pytest.approx(np.sqrt(np.mean(velocity ** 2)), rel=1e-5)
    assert got["displacement_rms"] == pytest.approx(np.sqrt(np.mean(displacement ** 2)), rel=1e-6)
    assert got["samples"] == 2 and got["input_velocity"] == "displacement"
    key = statistics_key(2, 1, None, 2, "displacement")
    assert key == "delta_t=2,frames=1:None:2,velocity=displacement" != statistics_key(2, 1, None, 2)
    record, _ = ensure_statistics(info, 2, 1, None, 2, input_velocity="displacement")
    assert record == got and recorded_statistics(path, key) == got


def test_recorded_once_in_the_attributes_without_changing_the_store_identity(tmp_path):
    path, _, _ = make_store(tmp_path / "toy.zarr")
    info = open_store(path)
    identity = store_identity(info)
    key = statistics_key(2, 0, None, 1)
    assert recorded_statistics(path, key) is None
    record, note = ensure_statistics(info, 2)
    assert "computed" in note and "recorded" in note
    assert recorded_statistics(path, key) == record
    again, note = ensure_statistics(open_store(path), 2)
    assert note is None and again == record                         # read back, not computed again
    other, note = ensure_statistics(open_store(path), 3)            # another delta_t: its own record beside it
    assert note is not None and other["delta_t"] == 3
    assert set(zarr.open_group(str(path)).attrs[STATISTICS_ATTR]) == {key, statistics_key(3, 0, None, 1)}
    assert store_identity(open_store(path))["hash"] == identity["hash"]


def test_a_store_in_which_nothing_moves_is_refused_by_name(tmp_path):
    """Guards the division: a zero statistic is a StoreError naming the store and the statistic, not inf/NaN."""
    path, _, _ = make_store(tmp_path / "still.zarr", moving=False)
    record = compute_statistics(open_store(path), delta_t=1)
    assert record["displacement_rms"] == 0.0
    with pytest.raises(StoreError, match=r"still\.zarr.*displacement_rms=0\.0.*trainer\.normalization=none"):
        Normalization.rms(record, 1.0, ["speed"], [], where=str(path))
    for bad in (float("nan"), float("inf"), -1.0, None):
        with pytest.raises(StoreError, match="velocity_rms"):
            Normalization.rms(dict(record, displacement_rms=1.0, velocity_rms=bad), 1.0, [], [], where=str(path))


def test_no_input_frame_is_refused(tmp_path):
    path, _, _ = make_store(tmp_path / "toy.zarr")
    with pytest.raises(StoreError, match="no input frame.*delta_t"):
        compute_statistics(open_store(path), delta_t=FRAMES)
