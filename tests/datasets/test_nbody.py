"""The charged N-body simulator (docs/maths.md §6)."""
import numpy as np
import pytest
import zarr

from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody, initial_state, simulate
from dist_egnn.datasets.store import open_store

TINY = dict(num_particles=10, train=5, val=2, test=2, steps=300, sample_every=100)


def test_one_step_matches_coulomb_by_hand():
    cfg = NBodyConfig(num_particles=2, steps=2, sample_every=1, dt=0.01)
    pos = np.array([[[0.0, 0, 0], [2.0, 0, 0]]])
    vel = np.zeros((1, 2, 3))
    charge = np.array([[1.0, 1.0]])                     # like charges repel
    frames, speeds = simulate(pos, vel, charge, cfg)
    force = 1.0 / 2.0**2                                 # k q q / r^2, along the x axis
    np.testing.assert_allclose(speeds[0, 1, 0], [-cfg.dt * force, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(speeds[0, 1, 1], [cfg.dt * force, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(frames[0, 1, 0], [-cfg.dt**2 * force, 0, 0], rtol=1e-6)


def test_momentum_is_conserved_without_force_caps():
    cfg = NBodyConfig(num_particles=20, steps=500, sample_every=100, max_force=1e12)
    pos, vel, charge = initial_state(cfg, "train", 0)
    _, v = simulate(pos[None] * 3, vel[None], charge[None], cfg)     # spread out: no violent encounters
    momentum = v[0].sum(axis=1)                                         # (T, 3), unit masses
    np.testing.assert_allclose(momentum, momentum[:1].repeat(len(momentum), 0), atol=1e-4)


def test_trajectories_rotate_with_their_initial_conditions():
    # guards the force cap: a per-component clip would break rotational symmetry of the data
    cfg = NBodyConfig(num_particles=30, steps=400, sample_every=100)
    pos, vel, charge = initial_state(cfg, "train", 3)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
    a, _ = simulate(pos[None], vel[None], charge[None], cfg)
    b, _ = simulate(pos[None] @ q.T, vel[None] @ q.T, charge[None], cfg)
    np.testing.assert_allclose(a @ q.T.astype(np.float32), b, atol=2e-4)


def test_scenes_do_not_depend_on_batching(tmp_path):
    a = generate_nbody(tmp_path / "a.zarr", NBodyConfig(**TINY, scenes_per_batch=2), progress=False)
    b = generate_nbody(tmp_path / "b.zarr", NBodyConfig(**TINY, scenes_per_batch=7), progress=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(zarr.open_group(str(a))[f"{split}/pos"][:],
                                      zarr.open_group(str(b))[f"{split}/pos"][:])


def test_seed_changes_the_data_and_splits_differ(tmp_path):
    a = zarr.open_group(str(generate_nbody(tmp_path / "a.zarr", NBodyConfig(**TINY), progress=False)))
    b = zarr.open_group(str(generate_nbody(tmp_path / "b.zarr", NBodyConfig(**TINY, seed=1), progress=False)))
    assert not np.allclose(a["train/pos"][0], b["train/pos"][0])
    assert not np.allclose(a["train/pos"][0, :10], a["val/pos"][0, :10])


def test_generated_store_is_valid_and_documented(tmp_path):
    path = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(**TINY), dataset="tiny", progress=False)
    info = open_store(path, check_values=True)
    assert info.attrs["source"] == "nbody" and info.attrs["radius"] is None
    assert info.attrs["dt"] == pytest.approx(0.1)
    assert info.node_scalars == ["charge"]
    assert info.splits["train"].num_scenes == 5 and info.splits["train"].num_frames == 3
    charges = zarr.open_group(str(path))["train/node_scalars"][:]
    assert set(np.unique(charges)) <= {-1.0, 1.0}
