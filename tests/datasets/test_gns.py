"""GNS / LagrangeBench HDF5 converter, on small synthetic files written here in the documented layout."""
import json

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.gns import GNSConfig, convert_gns
from dist_egnn.datasets.store import StoreError, open_store

h5py = pytest.importorskip("h5py")


def write_folder(folder, dim=3, trajectories=None, dt=0.005, radius=0.035):
    """metadata.json + train/valid/test.h5; trajectories: {file: [(frames, particles), ...]}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.json").write_text(json.dumps(dict(dt=dt, default_connectivity_radius=radius, dim=dim,
                                                          bounds=[[0, 1]] * dim)))
    rng = np.random.default_rng(0)
    trajectories = trajectories or {"train.h5": [(12, 30), (10, 40)], "valid.h5": [(9, 25)], "test.h5": [(9, 25)]}
    data = {}
    for name, shapes in trajectories.items():
        with h5py.File(folder / name, "w") as f:
            for k, (frames, particles) in enumerate(shapes):
                pos = np.cumsum(rng.normal(0, 0.01, size=(frames, particles, dim)), axis=0).astype(np.float32)
                ptype = np.where(np.arange(particles) < 5, 3, 5)             # GNS: 3 boundary, 5 water
                f.create_dataset(f"{k:05d}/position", data=pos, compression="gzip")
                f.create_dataset(f"{k:05d}/particle_type", data=ptype)
                data[name, k] = (pos, ptype)
    return data


def test_lagrangebench_folder_becomes_a_store(tmp_path):
    data = write_folder(tmp_path / "Water-3D")
    path = convert_gns(tmp_path / "water.zarr", GNSConfig(path=str(tmp_path / "Water-3D"), frames_per_write=4),
                       progress=False)
    info = open_store(path, check_values=True)
    assert info.attrs["source"] == "gns" and info.attrs["dt"] == pytest.approx(0.005)
    assert info.attrs["radius"] == pytest.approx(0.035)                  # from metadata.json
    assert info.splits["train"].num_frames == 9                          # 10 - 1, the shorter trajectory
    assert info.splits["val"].num_nodes == 25 and info.splits["train"].num_nodes == 70
    assert any("cut from 11 to 9" in note for note in info.attrs["generator"]["notes"])
    group = zarr.open_group(str(path))
    pos, ptype = data["train.h5", 1]
    np.testing.assert_array_equal(group["train/pos"][:, 30:], pos[1:10])   # stored frame k = file frame k + 1
    np.testing.assert_allclose(group["train/vel"][:, 30:], (pos[1:10] - pos[:9]) / 0.005, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(group["train/node_scalars"][30:, 0], ptype)


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
