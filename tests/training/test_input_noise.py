"""Training noise (``trainer.input_noise`` = σ, GNS-style): the moving nodes' input positions and velocities get
a keyed error, walls and targets none, the edges stay the clean frame's, and the draw depends on (seed, epoch,
sample, global node id) only, so a resumed run and P ranks in exact halo mode see what one process sees.

The store is test_walls.py's hand-made box of falling particles with wall rows.
"""
from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.partitioners.artifacts import load_assignments, prepare_partitions
from dist_egnn.training.rank_data import RankData, input_errors
from dist_egnn.training.setup import training_noise, wall_training_noise
from tests.training.test_walls import SCENES, dataset, rank_ids, wall_store

SIGMA = 0.01


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return wall_store(tmp_path_factory.mktemp("noise") / "data" / "walls.zarr")


def test_noise_moves_the_fluid_inputs_only_by_the_keyed_errors(store):
    data = dataset(store)
    clean = RankData(data).build([0, 5], seed=3, epoch=2)
    noisy = RankData(data, noise=SIGMA).build([0, 5], seed=3, epoch=2)
    moving = clean.graph.moving.numpy()
    shift = (noisy.graph.pos - clean.graph.pos).numpy()
    assert not shift[~moving].any()                                   # walls stay where they are
    assert np.array_equal(noisy.graph.target, clean.graph.target)     # the target stays the true next frame
    assert np.array_equal(noisy.graph.edge_index, clean.graph.edge_index)   # the clean frame's graph
    n = len(moving) // 2
    per_step = data.velocity_scale / (data.delta_t * 0.05)
    for b, sample in enumerate([0, 5]):
        errors = input_errors(3, 2, sample, n, SIGMA)
        rows = slice(b * n, (b + 1) * n)
        fluid = moving[rows]
        np.testing.assert_allclose(shift[rows][fluid], errors[0][fluid], atol=1e-6)
        np.testing.assert_allclose((noisy.graph.vel - clean.graph.vel).numpy()[rows][fluid],
                                   ((errors[0] - errors[1]) * per_step)[fluid], rtol=1e-4, atol=1e-5)
    assert 0.5 * SIGMA < shift[moving].std() < 2 * SIGMA
    # features built from the inputs follow them: the speed feature and the edge distances
    assert not np.array_equal(noisy.graph.node_features[:, 0], clean.graph.node_features[:, 0])
    assert not np.array_equal(noisy.graph.edge_attr, clean.graph.edge_attr)


def test_shifted_target_moves_with_the_input_error_of_the_fluid(store):
    """trainer.noise_target=shifted (GNS): the target moves with the input position, so the displacement the model
    is asked for stays the true one; inputs as with clean targets, walls untouched."""
    data = dataset(store)
    clean = RankData(data).build([0, 5], seed=3, epoch=2)
    noisy = RankData(data, noise=SIGMA).build([0, 5], seed=3, epoch=2)
    shifted = RankData(data, noise=SIGMA, noise_shifts_target=True).build([0, 5], seed=3, epoch=2)
    moving = clean.graph.moving.numpy()
    assert np.array_equal(shifted.graph.pos, noisy.graph.pos) and np.array_equal(shifted.graph.vel, noisy.graph.vel)
    np.testing.assert_allclose((shifted.graph.target - shifted.graph.pos).numpy()[moving],
                               (clean.graph.target - clean.graph.pos).numpy()[moving], atol=1e-6)
    assert np.array_equal(shifted.graph.target[~moving], clean.graph.target[~moving])
    assert not np.array_equal(shifted.graph.target, clean.graph.target)


def test_noise_is_a_function_of_seed_epoch_and_sample():
    a = input_errors(0, 1, 4, 50, SIGMA)
    assert np.array_equal(a, input_errors(0, 1, 4, 50, SIGMA))        # a resumed epoch draws the same noise
    for other in (input_errors(1, 1, 4, 50, SIGMA), input_errors(0, 2, 4, 50, SIGMA), input_errors(0, 1, 5, 50, SIGMA)):
        assert not np.array_equal(a, other)


def test_two_ranks_in_exact_mode_see_one_process_noise(store):
    """Each rank's owned and halo rows carry the noise of their global ids: the same inputs as one process."""
    data = dataset(store)
    splits = {split: dataset(store, split) for split in SCENES}
    stored = load_assignments(prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads"), "train")
    whole = RankData(data, noise=SIGMA).build([3], seed=1, epoch=0)
    scene, frame = data.locate(3)
    for part in range(2):
        rank = RankData(data, part, 2, halo=True, assignments=stored, noise=SIGMA).build([3], seed=1, epoch=0)
        ids = rank_ids(stored, part, scene, frame)
        owned = len(rank.graph.pos)
        np.testing.assert_array_equal(rank.graph.pos, whole.graph.pos[ids[:owned]])
        np.testing.assert_array_equal(rank.graph.vel, whole.graph.vel[ids[:owned]])
        np.testing.assert_array_equal(rank.graph.node_features, whole.graph.node_features[ids[:owned]])
        got = {(ids[r], ids[q]): a
               for (r, q), a in zip(rank.graph.edge_index.T.tolist(), rank.graph.edge_attr.tolist())}
        want = {(r, q): a for (r, q), a in zip(whole.graph.edge_index.T.tolist(), whole.graph.edge_attr.tolist())
                if r in set(ids[:owned].tolist())}
        assert got == want                                           # halo rows carry the same noisy positions


def test_noise_near_the_radius_is_refused(store):
    data = dataset(store)
    cfg = OmegaConf.create({"trainer": {"input_noise": 0.3 * data.radius}})
    with pytest.raises(ConfigError, match="trainer.input_noise=.*radius"):
        training_noise(cfg, data)
    assert training_noise(OmegaConf.create({"trainer": {"input_noise": 0.01}}), data) == 0.01
    assert training_noise(OmegaConf.create({"trainer": {}}), data) == 0.0


def test_wall_noise_takes_the_larger_sigma_near_the_walls_only(store):
    """trainer.wall_noise: moving nodes within the reach of a wall particle take σ_w, the others σ, walls none;
    both from the one keyed draw, so the nodes far from the walls see exactly the input_noise run's inputs."""
    data = dataset(store)
    sigma, near_sigma, reach = SIGMA, 3 * SIGMA, data.radius
    clean = RankData(data).build([0, 5], seed=3, epoch=2)
    plain = RankData(data, noise=sigma).build([0, 5], seed=3, epoch=2)
    walled = RankData(data, noise=sigma, wall_noise=near_sigma, wall_noise_reach=reach).build([0, 5], seed=3, epoch=2)
    assert np.array_equal(walled.graph.target, clean.graph.target)
    assert np.array_equal(walled.graph.edge_index, clean.graph.edge_index)
    pos, moving = clean.graph.pos.numpy(), clean.graph.moving.numpy()
    n = len(moving) // 2
    shift = (walled.graph.pos - clean.graph.pos).numpy()
    for b, sample in enumerate([0, 5]):
        rows = slice(b * n, (b + 1) * n)
        p, fluid = pos[rows], moving[rows]
        distance = np.linalg.norm(p[fluid][:, None] - p[~fluid][None], axis=2).min(axis=1)
        near = np.zeros(n, bool)
        near[np.flatnonzero(fluid)[distance <= reach]] = True
        far = fluid & ~near
        assert near.any() and far.any()                                 # the store has both kinds
        unit = input_errors(3, 2, sample, n, 1.0)
        np.testing.assert_allclose(shift[rows][near], near_sigma * unit[0][near], atol=1e-6)
        assert np.array_equal(walled.graph.pos.numpy()[rows][far], plain.graph.pos.numpy()[rows][far])
        assert np.array_equal(walled.graph.vel.numpy()[rows][far], plain.graph.vel.numpy()[rows][far])
        assert not shift[rows][~fluid].any()                            # walls stay where they are


def test_wall_noise_on_positions_only_keeps_the_velocity_error_of_input_noise(store):
    """trainer.wall_noise_velocity=false: near a wall σ_w moves the position, the input a task step earlier moves
    with it, so every velocity is the input_noise run's; positions as with wall_noise_velocity=true."""
    data = dataset(store)
    kw = dict(noise=SIGMA, wall_noise=3 * SIGMA, wall_noise_reach=data.radius)
    plain = RankData(data, noise=SIGMA).build([0, 5], seed=3, epoch=2)
    both = RankData(data, **kw).build([0, 5], seed=3, epoch=2)
    position = RankData(data, **kw, wall_noise_velocity=False).build([0, 5], seed=3, epoch=2)
    assert np.array_equal(position.graph.pos, both.graph.pos)
    assert not np.array_equal(both.graph.vel, plain.graph.vel)                # σ_w did reach some velocities
    np.testing.assert_allclose(position.graph.vel.numpy(), plain.graph.vel.numpy(), rtol=1e-5, atol=1e-6)


def test_wall_noise_is_refused_where_it_cannot_be_decided_or_is_too_large(store):
    data = dataset(store)
    splits = {split: dataset(store, split) for split in SCENES}
    stored = load_assignments(prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads"), "train")
    with pytest.raises(ConfigError, match="trainer.wall_noise=.*distributed.parts=2"):
        RankData(data, 0, 2, halo=True, assignments=stored, wall_noise=SIGMA, wall_noise_reach=data.radius)
    with pytest.raises(ValueError, match="wall_noise_reach > 0"):
        RankData(data, wall_noise=SIGMA)                     # a silent no-op otherwise: no node within 0 of a wall
    cfg = lambda **t: OmegaConf.create({"trainer": t})  # noqa: E731
    with pytest.raises(ConfigError, match="trainer.wall_noise=.*radius"):
        wall_training_noise(cfg(wall_noise=0.3 * data.radius), data)
    assert wall_training_noise(cfg(wall_noise=0.01), data) == (0.01, data.radius)
    assert wall_training_noise(cfg(wall_noise=0.01, wall_noise_reach=0.2), data) == (0.01, 0.2)
    assert wall_training_noise(cfg(), data) == (0.0, 0.0)


def test_wall_noise_on_a_store_without_walls_is_refused(tmp_path):
    """An N-body store has no `type` scalar, a wall-less SPH store (fluid_small) no node of type 1: σ_w would
    silently change nothing on either, so it is refused naming the store."""
    path = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=6, train=2, val=1, test=1, steps=500),
                          progress=False)
    data = TrajectoryDataset(open_store(path), "train", delta_t=2, node_features=["speed", "charge"],
                             edge_features=["distance"])
    cfg = OmegaConf.create({"trainer": {"wall_noise": 0.01}})
    with pytest.raises(ConfigError, match=r"trainer.wall_noise=0.01: .*nb.zarr holds no wall particles \(no node"):
        wall_training_noise(cfg, data)
    wall_less = dataset(wall_store(tmp_path / "fluid.zarr", wall_type=0.0))
    with pytest.raises(ConfigError, match=r"fluid.zarr holds no wall particles \(no node of type 1"):
        wall_training_noise(cfg, wall_less)
