"""Streaming reads: sample order from a seed, bad Δt, damaged chunks named at read time."""
import numpy as np
import pytest

from dist_egnn.datasets.loader import TrajectoryDataset, velocity_scale
from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import StoreError, open_store
from dist_egnn.errors import ConfigError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return generate_nbody(tmp_path_factory.mktemp("loader") / "nb.zarr",
                          NBodyConfig(num_particles=6, train=4, val=2, test=2, steps=500), progress=False)


def dataset(path, **kw):
    args = dict(delta_t=2, node_features=["speed", "charge"], edge_features=["distance"])
    return TrajectoryDataset(open_store(path), "train", **{**args, **kw})


def sample_ids(data, seed, epoch):
    ids = []
    for batch in data.batches(3, shuffle=True, seed=seed, epoch=epoch):
        # the first node of every graph identifies its (scene, frame) by its input position
        firsts = np.flatnonzero(np.diff(np.concatenate([[-1], batch.batch.numpy()])))
        ids += [tuple(np.round(batch.pos[i].numpy(), 5)) for i in firsts]
    return ids


def test_sample_order_depends_only_on_seed_and_epoch(store):
    # guards ranks that share a graph: each opens its own dataset and must read the same samples in turn
    a, b = dataset(store), dataset(store)
    assert sample_ids(a, seed=3, epoch=1) == sample_ids(b, seed=3, epoch=1)
    assert sample_ids(a, seed=3, epoch=1) != sample_ids(a, seed=3, epoch=2)
    assert sorted(sample_ids(a, seed=3, epoch=1)) == sorted(sample_ids(a, seed=4, epoch=1))


def test_dropping_unwired_walls_on_a_store_without_walls_is_refused(store):
    """dataset.unwired_walls=drop on a store with no `type` scalar would silently change nothing: it is refused."""
    with pytest.raises(StoreError, match=r"nb.zarr: dataset.unwired_walls=drop .* no node scalar `type` .*"
                                         r"set dataset.unwired_walls=keep"):
        dataset(store, unwired_walls="drop")


def test_a_neighbour_cap_on_complete_graphs_is_refused(store):
    """dataset.max_neighbors caps a radius graph's senders; on N-body's complete graphs (no radius) it would
    silently change nothing: refused naming the fix."""
    with pytest.raises(ConfigError, match=r"nb.zarr: dataset.max_neighbors=10 .* complete .*set dataset.radius"):
        dataset(store, max_neighbors=10)
    assert dataset(store, max_neighbors=10, radius=2.0).max_neighbors == 10


def test_horizon_velocity_unit_scales_inputs_and_speed_alike(store):
    info = open_store(store)
    scale = velocity_scale("horizon", 2, info.attrs["dt"])
    assert scale == pytest.approx(2 * info.attrs["dt"]) and velocity_scale("store", 2, 0.5) == 1.0
    plain, scaled = dataset(store).read([1])[0], dataset(store, velocity_scale=scale).read([1])[0]
    np.testing.assert_allclose(scaled.vel, plain.vel * scale, rtol=1e-6)
    np.testing.assert_allclose(scaled.node_features[:, 0], plain.node_features[:, 0] * scale, rtol=1e-6)
    np.testing.assert_array_equal(scaled.pos, plain.pos)
    np.testing.assert_array_equal(scaled.target, plain.target)
    (part,) = dataset(store, velocity_scale=scale).read_parts([1], [np.arange(3)], [np.arange(3, 6)])
    np.testing.assert_allclose(part.vel, plain.vel[:3] * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="dataset.velocity_unit='mps': choose one of"):
        velocity_scale("mps", 2, 0.5)


def test_delta_t_beyond_the_end_names_the_store_and_the_fix(store):
    with pytest.raises(StoreError, match=r"nb.zarr/train: frame 0 \+ delta_t 5 is beyond the trajectory's end "
                                         r"\(5 frames\); lower dataset.frame_start or dataset.delta_t"):
        dataset(store, delta_t=5)


def test_truncated_chunk_is_named_when_read(tmp_path):
    path = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=6, train=2, val=1, test=1, steps=300),
                          progress=False)
    data = dataset(path, delta_t=1)
    chunk = path / "train" / "pos" / "c" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:7])
    with pytest.raises(StoreError, match=r"nb.zarr/train: reading samples .* failed .*prepare.overwrite=true"):
        data.read([0])


def test_missing_chunk_is_found_by_the_validator(tmp_path):
    path = generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=6, train=2, val=1, test=1, steps=300),
                          progress=False)
    (path / "val" / "vel" / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"val/vel: 1 of 3 chunks are missing \(zarr would read them as zeros\)"):
        open_store(path)


def test_a_radius_beyond_the_stores_wall_reach_is_refused(store):
    """A store whose walls were kept only within dataset.sph.wall_reach of the fluid (datasets/sph.py) cannot
    give the wall edges of a larger radius: refused with the key and both fixes, not trained on quietly."""
    info = open_store(store)
    info.attrs["generator"] = dict(info.attrs.get("generator") or {}, wall_reach=0.5)
    args = dict(delta_t=2, node_features=["speed", "charge"], edge_features=["distance"])
    TrajectoryDataset(info, "train", radius=0.5, **args)                    # at the reach: fine
    with pytest.raises(StoreError, match=r"dataset.sph.wall_reach=0.5 m .* radius 0.75 .*dataset.radius <= 0.5"):
        TrajectoryDataset(info, "train", radius=0.75, **args)
