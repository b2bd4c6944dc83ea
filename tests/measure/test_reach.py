"""dist_egnn.measure.reach: per task step, the moving particles' displacement against the radius and the
receptive field, walls left out, on a hand-made store whose motion is known."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_egnn.datasets.store import (
    WALL,
    StoreError,
    atomic_store,
    create_split,
    open_store,
    write_root_attrs,
    write_scenes,
)
from dist_egnn.measure.reach import displacements, measure, table, wall_distances, wall_table

FLUID, WALLS, FRAMES, RADIUS = 10, 5, 9, 0.5


def uniform_motion_store(path: Path) -> Path:
    """Fluid particle i moves 0.1·(i + 1) per frame along x; walls fly off 100 per frame (they must not count)."""
    n = FLUID + WALLS
    with atomic_store(path) as root:
        write_root_attrs(root, dataset="reach", source="sph", dt=0.01, units={"length": "m", "time": "s"},
                         radius=RADIUS, node_scalars=["type"], generator={})
        frames = np.arange(FRAMES, dtype=np.float32)[:, None]
        pos = np.zeros((1, FRAMES, n, 3), np.float32)
        pos[0, :, :FLUID, 0] = frames * 0.1 * np.arange(1, FLUID + 1, dtype=np.float32)
        pos[0, :, FLUID:, 1] = frames * 100.0
        scalars = np.zeros((1, n, 1), np.float32)
        scalars[:, FLUID:] = WALL
        for split in ("train", "val", "test"):
            write_scenes(create_split(root, split, [n], FRAMES, num_scalars=1), 0, pos, np.zeros_like(pos), scalars)
    return path


def test_displacements_shares_and_table(tmp_path):
    store = uniform_motion_store(tmp_path / "reach.zarr")
    d = displacements(open_store(store), "train", delta_t=2, stride=3)                 # inputs t = 0, 3, 6 (t + 2 <= 8)
    np.testing.assert_allclose(np.sort(d), np.sort(np.tile(0.2 * np.arange(1, FLUID + 1), 3)), rtol=1e-5)
    rows, radius, dt = measure(store, "train", [1, 4], stride=1, radius=None, layers=2)
    assert radius == RADIUS and dt == 0.01
    one, four = rows
    assert one["count"] == 8 * FLUID and four["count"] == 5 * FLUID
    assert one["beyond_radius"] == pytest.approx(0.5)                       # 0.6 .. 1.0 of 0.1 .. 1.0 per frame
    assert one["beyond_field"] == 0.0                                       # none beyond 2 x 0.5
    assert four["beyond_field"] == pytest.approx(0.8)                       # 0.4 i > 1.0 for i = 3 .. 10
    text = table(rows, radius, dt, layers=2)
    assert "| 4 | 0.04 |" in text and "80.0%" in text


def test_distance_to_the_kth_nearest_wall(tmp_path):
    """What dataset.wall_neighbors_reach is chosen from: at frame t fluid particle i is at (0.1 t (i + 1), 0, 0)
    and every wall at (0, 100 t, 0)."""
    store = uniform_motion_store(tmp_path / "reach.zarr")
    d = wall_distances(open_store(store), "train", k=2, delta_t=1, stride=3)             # inputs t = 0, 3, 6
    t, i = np.repeat([0.0, 3.0, 6.0], FLUID), np.tile(np.arange(1, FLUID + 1), 3)
    np.testing.assert_allclose(d, np.hypot(0.1 * t * i, 100.0 * t), rtol=1e-6)
    text = wall_table(d, 2, RADIUS)
    assert "| k = 2 |" in text and f"| {d.max():.3f} | {d.max() / RADIUS:.1f} | 30 |" in text
    with pytest.raises(StoreError, match="--wall-neighbors 0: must be >= 1"):
        wall_distances(open_store(store), "train", k=0, delta_t=1, stride=1)


def test_bad_input_names_the_split_and_the_range(tmp_path):
    store = uniform_motion_store(tmp_path / "reach.zarr")
    with pytest.raises(StoreError, match="no split 'tst'"):
        displacements(open_store(store), "tst", 1, 1)
    with pytest.raises(StoreError, match="delta_t=9 must be in 1..8"):
        displacements(open_store(store), "train", 9, 1)


def test_command_line(tmp_path):
    store = uniform_motion_store(tmp_path / "reach.zarr")
    out = subprocess.run([sys.executable, "-m", "dist_egnn.measure.reach", str(store), "--delta-t", "1",
                          "--stride", "1", "--layers", "2"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("| Δt (frames) |") and "| 1 | 0.01 |" in out
    out = subprocess.run([sys.executable, "-m", "dist_egnn.measure.reach", str(store), "--delta-t", "1",
                          "--wall-neighbors", "2"], capture_output=True, text=True, check=True).stdout
    assert "| distance to the k-th nearest wall |" in out and "| k = 2 |" in out
