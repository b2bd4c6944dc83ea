"""GNS / LagrangeBench HDF5 converter, on small synthetic files written here in the documented layout."""
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.gns import GNSConfig, convert_gns
from dist_egnn.datasets.store import StoreError, open_store

h5py = pytest.importorskip("h5py")


def write_folder(folder, dim=3, trajectories=None, dt=0.005, radius=0.035, walls=5, wall_type=3, fluid_type=5,
                 **metadata):
    """metadata.json + train/valid/test.h5; trajectories: {file: [(frames, particles), ...]}. The first
    ``walls`` particles of each trajectory are static, of type ``wall_type``; the rest random walks."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = dict(dt=dt, default_connectivity_radius=radius, dim=dim, bounds=[[0, 1]] * dim, **metadata)
    (folder / "metadata.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))
    rng = np.random.default_rng(0)
    trajectories = trajectories or {"train.h5": [(12, 30), (10, 40)], "valid.h5": [(9, 25)], "test.h5": [(9, 25)]}
    data = {}
    for name, shapes in trajectories.items():
        with h5py.File(folder / name, "w") as f:
            for k, (frames, particles) in enumerate(shapes):
                start = rng.uniform(0, 0.1, size=(1, particles, dim))
                pos = (start + np.cumsum(rng.normal(0, 0.01, size=(frames, particles, dim)), axis=0)).astype(np.float32)
                pos[:, :walls] = pos[0, :walls]                                # static boundary particles
                ptype = np.where(np.arange(particles) < walls, wall_type, fluid_type)   # GNS: 3 boundary, 5 water
                f.create_dataset(f"{k:05d}/position", data=pos, compression="gzip")
                f.create_dataset(f"{k:05d}/particle_type", data=ptype)
                data[name, k] = (pos, ptype)
    return data


def convert(tmp_path, name="src", **cfg):
    return convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / name), **cfg), progress=False)


def test_lagrangebench_folder_becomes_a_store(tmp_path):
    data = write_folder(tmp_path / "Water-3D")
    path = convert_gns(tmp_path / "water.zarr", GNSConfig(path=str(tmp_path / "Water-3D"), frames_per_write=4),
                       progress=False)
    info = open_store(path, check_values=True)
    assert info.attrs["source"] == "gns" and info.attrs["dt"] == pytest.approx(0.005)
    assert info.attrs["radius"] == pytest.approx(0.035)                  # from metadata.json
    assert info.node_scalars == ["type", "source_type"]
    assert info.splits["train"].num_frames == 9                          # 10 - 1, the shorter trajectory
    assert info.splits["val"].num_nodes == 25 and info.splits["train"].num_nodes == 70
    assert any("cut from 11 to 9" in note for note in info.attrs["generator"]["notes"])
    group = zarr.open_group(str(path))
    pos, ptype = data["train.h5", 1]
    np.testing.assert_array_equal(group["train/pos"][:, 30:], pos[1:10])   # stored frame k = file frame k + 1
    np.testing.assert_allclose(group["train/vel"][:, 30:], (pos[1:10] - pos[:9]) / 0.005, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(group["train/node_scalars"][30:, 1], ptype)        # the file's own id
    np.testing.assert_array_equal(group["train/node_scalars"][30:, 0], ptype == 3)   # GNS 3 -> wall (1)


def test_gns_and_lagrangebench_type_conventions(tmp_path):
    """GNS files (no write_every): 3 is the boundary; LagrangeBench files: 1 and 2 are walls, 0 fluid, 3 a rigid
    body (moving); dataset.gns.wall_types overrides both. Walls are stored exactly still, velocity 0."""
    write_folder(tmp_path / "gns", wall_type=3, fluid_type=5)
    write_folder(tmp_path / "lb", wall_type=1, fluid_type=0, write_every=1, periodic_boundary_conditions=[False] * 3)
    # DeepMind's files as LagrangeBench's tfrecord_to_h5 leaves them: GNS ids, its two keys added, no write_every
    write_folder(tmp_path / "gns-h5", wall_type=3, fluid_type=5, num_particles_max=20,
                 periodic_boundary_conditions=[False] * 3)
    for name, walls in (("gns", 3), ("lb", 1), ("gns-h5", 3)):
        path = convert_gns(tmp_path / f"{name}.zarr", GNSConfig(path=str(tmp_path / name)), progress=False)
        group = zarr.open_group(str(path))
        scalars = group["train/node_scalars"][:]
        np.testing.assert_array_equal(scalars[:, 0], scalars[:, 1] == walls)
        wall = scalars[:, 0] == 1
        assert wall.sum() == 10                                          # 5 per trajectory
        pos, vel = group["train/pos"][:], group["train/vel"][:]
        assert np.all(pos[:, wall] == pos[:1, wall]) and np.all(vel[:, wall] == 0)
        assert np.any(vel[:, ~wall] != 0)
    write_folder(tmp_path / "rigid", wall_type=3, fluid_type=0, write_every=1)   # LagrangeBench: 3 = rigid body
    scalars = zarr.open_group(str(convert(tmp_path, "rigid")))["train/node_scalars"][:]
    assert not np.any(scalars[:, 0])
    path = convert_gns(tmp_path / "o.zarr", GNSConfig(path=str(tmp_path / "gns"), wall_types=[]), progress=False)
    assert not np.any(zarr.open_group(str(path))["test/node_scalars"][:, 0])      # no walls when told so


def test_wall_types_that_move_are_refused_with_the_fix(tmp_path):
    write_folder(tmp_path / "src", walls=0, wall_type=3, fluid_type=3)   # every particle of type 3 moves
    with pytest.raises(StoreError, match=r"wall particles of type \[3\] move .*dataset.gns.wall_types"):
        convert(tmp_path)
    assert not (tmp_path / "x.zarr").exists()


def test_write_every_spaces_the_frames(tmp_path):
    data = write_folder(tmp_path / "src", dt=0.0004, write_every=100)
    path = convert(tmp_path)
    info = open_store(path)
    assert info.attrs["dt"] == pytest.approx(0.04)                       # dt x write_every
    pos, _ = data["test.h5", 0]
    np.testing.assert_allclose(zarr.open_group(str(path))["test/vel"][:, 5:], (pos[1:] - pos[:-1])[:, 5:] / 0.04,
                               rtol=1e-4, atol=1e-5)
    write_folder(tmp_path / "bad", write_every=2.5)
    with pytest.raises(StoreError, match=r"'write_every' must be a positive whole number"):
        convert(tmp_path, "bad")


def test_periodic_sets_are_refused_clearly(tmp_path):
    write_folder(tmp_path / "src", write_every=100, periodic_boundary_conditions=[True, True, False])
    with pytest.raises(StoreError, match=r"periodic_boundary_conditions=\[True, True, False\]: periodic sets are "
                                         r"not supported.*minimum-image"):
        convert(tmp_path)
    assert not (tmp_path / "x.zarr").exists()


def test_radius_comes_from_the_file_unless_overridden(tmp_path):
    """water3d.yaml leaves dataset.radius null, so prepare hands None and the file's radius wins."""
    from dist_egnn.datasets.prepare import prepare_dataset

    write_folder(tmp_path / "src", radius=0.08)
    dataset = dict(name="w", source="gns", gns=dict(path=str(tmp_path / "src")), radius=None)
    assert open_store(prepare_dataset(dataset, tmp_path / "a.zarr", progress=False)).attrs["radius"] == 0.08
    dataset["radius"] = 0.12
    assert open_store(prepare_dataset(dataset, tmp_path / "b.zarr", progress=False)).attrs["radius"] == 0.12
    write_folder(tmp_path / "none", radius=None)
    with pytest.raises(StoreError, match="no positive 'default_connectivity_radius'.*dataset.radius"):
        convert(tmp_path, "none")


def test_a_radius_under_one_edge_per_node_warns(tmp_path):
    write_folder(tmp_path / "src", radius=1e-4)
    with pytest.warns(UserWarning, match=r"radius 0.0001 gives 0.00 edges per node on train.h5/00000"):
        convert(tmp_path)


def test_the_water3d_config_takes_the_files_radius():
    import yaml

    conf = Path(__file__).resolve().parents[2] / "launch" / "conf" / "dataset" / "water3d.yaml"
    assert yaml.safe_load(conf.read_text())["radius"] is None


def test_two_dimensional_data_get_z_zero(tmp_path):
    write_folder(tmp_path / "2D", dim=2)
    path = convert_gns(tmp_path / "flat.zarr", GNSConfig(path=str(tmp_path / "2D")), progress=False)
    pos = zarr.open_group(str(path))["test/pos"][:]
    assert pos.shape[2] == 3 and np.all(pos[..., 2] == 0) and np.any(pos[..., :2] != 0)


def test_missing_path_setting_says_which_override(tmp_path):
    with pytest.raises(ValueError, match="dataset.gns.path=/data/Water-3D"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(), progress=False)


def test_unknown_layout_names_the_file_and_what_was_expected(tmp_path):
    write_folder(tmp_path / "src")
    with h5py.File(tmp_path / "src" / "valid.h5", "w") as f:
        f.create_dataset("trajectory_0/positions", data=np.zeros((5, 3, 3)))   # another converter's naming
    with pytest.raises(StoreError, match=r"valid.h5/trajectory_0: expected a group with datasets 'position' "
                                         r"and 'particle_type'.*LagrangeBench HDF5 layout"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / "src")), progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_metadata_and_non_hdf5_file(tmp_path):
    write_folder(tmp_path / "src")
    (tmp_path / "src" / "test.h5").write_text("this is not HDF5")
    with pytest.raises(StoreError, match=r"test.h5 is not a readable HDF5 file"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / "src")), progress=False)
    (tmp_path / "src" / "metadata.json").unlink()
    with pytest.raises(StoreError, match=r"metadata.json is missing"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / "src")), progress=False)


def test_particle_types_that_disagree_on_n(tmp_path):
    write_folder(tmp_path / "src")
    with h5py.File(tmp_path / "src" / "train.h5", "a") as f:
        del f["00000/particle_type"]
        f.create_dataset("00000/particle_type", data=np.zeros(7, dtype=int))
    with pytest.raises(StoreError, match=r"train.h5/00000/particle_type: shape \(7,\) disagrees with position"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / "src")), progress=False)


def test_nan_positions_name_trajectory_and_frame(tmp_path):
    write_folder(tmp_path / "src")
    with h5py.File(tmp_path / "src" / "test.h5", "a") as f:
        f["00000/position"][6, 2, 1] = np.nan
    with pytest.raises(StoreError, match=r"test.h5/00000/position: NaN or Inf at frame 6"):
        convert_gns(tmp_path / "x.zarr", GNSConfig(path=str(tmp_path / "src")), progress=False)
    assert not (tmp_path / "x.zarr").exists()
