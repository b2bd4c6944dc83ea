"""Protein MD through MDAnalysis: the built-in AdK store, velocities from files or differences, bad inputs."""
import warnings

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.md import MDConfig, generate_md
from dist_egnn.datasets.store import StoreError, open_store

mda = pytest.importorskip("MDAnalysis")
datafiles = pytest.importorskip("MDAnalysisTests.datafiles")


def universe(top, traj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mda.Universe(top, traj)


@pytest.fixture(scope="module")
def adk(tmp_path_factory):
    path = tmp_path_factory.mktemp("md") / "adk.zarr"
    return generate_md(path, MDConfig(), dataset="protein_adk", progress=False)


def test_adk_backbone_store_split_by_time(adk):
    info = open_store(adk, check_values=True)
    assert info.attrs["source"] == "md" and info.attrs["radius"] == 10.0 and info.attrs["dt"] == pytest.approx(1.0)
    assert info.node_scalars == ["charge"]
    for split, frames in (("train", 58), ("val", 19), ("test", 20)):
        meta = info.splits[split]
        assert meta.num_scenes == 2 and meta.num_nodes == 2 * 855 and meta.num_frames == frames   # SPEC: 855


def test_positions_charges_and_forward_difference_velocities(adk):
    group = zarr.open_group(str(adk))
    u = universe(datafiles.PSF, datafiles.DCD)
    backbone = u.select_atoms("backbone")
    frames = [backbone.positions.copy() for _ in u.trajectory[:60]]
    np.testing.assert_array_equal(group["train/pos"][:, :855], np.stack(frames[:58]))
    np.testing.assert_allclose(group["train/vel"][:, :855], np.stack(frames[1:59]) - np.stack(frames[:58]),
                               atol=1e-4)                       # SPEC: v = x(t + 1) - x(t), dt = 1 ps
    np.testing.assert_array_equal(group["val/pos"][0, :855], frames[58])   # val starts where train stops
    np.testing.assert_allclose(group["train/node_scalars"][:855, 0], backbone.charges, atol=1e-6)


def test_velocities_from_the_file_when_it_has_them(tmp_path):
    # the TRR is wrapped into its box (three CA atoms jump 79 Å between frames 0 and 1): unwrapped here
    cfg = MDConfig(topology="MDAnalysisTests:GRO", trajectories=["MDAnalysisTests:TRR"], selection="name CA",
                   unwrap=True)
    path = generate_md(tmp_path / "trr.zarr", cfg, progress=False)
    u = universe(datafiles.GRO, datafiles.TRR)
    ca = u.select_atoms("name CA")
    u.trajectory[0]
    group = zarr.open_group(str(path))
    np.testing.assert_allclose(group["train/vel"][0], ca.velocities, rtol=1e-6)
    info = open_store(path)
    assert info.attrs["generator"]["velocities_from_file"] == [True]
    assert sum(m.num_frames for m in info.splits.values()) == 10      # no frame is used up by differences
    assert info.attrs["dt"] == pytest.approx(100.0)


def test_a_trajectory_wrapped_into_its_box_is_refused_or_unwrapped(tmp_path):
    """Wrapped coordinates make an atom jump a box length between frames, stored as a velocity and a target: refused
    naming the atom, the move and the fix; with dataset.md.unwrap=true (NoJump) no stored move is over half a box."""
    cfg = dict(topology="MDAnalysisTests:GRO", trajectories=["MDAnalysisTests:TRR"], selection="name CA")
    with pytest.raises(StoreError, match=r"adk_oplsaa.trr: atom \d+ of the selection moves -?79.\d Å along y "
                                         r"between the file's frames 0 and 1, over half the periodic box "
                                         r".*dataset.md.unwrap=true"):
        generate_md(tmp_path / "wrapped.zarr", MDConfig(**cfg), progress=False)
    assert not (tmp_path / "wrapped.zarr").exists()
    u = universe(datafiles.GRO, datafiles.TRR)
    box = u.dimensions[:3]
    path = generate_md(tmp_path / "unwrapped.zarr", MDConfig(**cfg, unwrap=True), progress=False)
    group = zarr.open_group(str(path))
    pos = np.concatenate([group[f"{split}/pos"][:] for split in ("train", "val", "test")])   # consecutive blocks
    assert np.all(np.abs(np.diff(pos, axis=0)) < box / 2)


def test_trajectories_with_different_frame_intervals_are_refused(tmp_path):
    cfg = MDConfig(topology=["MDAnalysisTests:PSF", "MDAnalysisTests:PSF_NAMD_GBIS"],
                   trajectories=["MDAnalysisTests:DCD", "MDAnalysisTests:DCD_NAMD_GBIS"])
    with pytest.raises(ValueError, match=r"different frame intervals \(adk_dims.dcd: 1 ps, .*0.01 ps\)"):
        generate_md(tmp_path / "x.zarr", cfg, progress=False)
    assert not (tmp_path / "x.zarr").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(StoreError, match=r"nope.dcd: trajectory file does not exist"):
        generate_md(tmp_path / "x.zarr", MDConfig(trajectories=[str(tmp_path / "nope.dcd")]), progress=False)


def test_unknown_file_format_names_both_files(tmp_path):
    junk = tmp_path / "traj.qqq"
    junk.write_text("not a trajectory\n")
    with pytest.raises(StoreError, match=r"MDAnalysis cannot read topology .*adk.psf with trajectory .*traj.qqq"):
        generate_md(tmp_path / "x.zarr", MDConfig(trajectories=[str(junk)]), progress=False)


def test_file_velocities_requested_from_a_file_without_them(tmp_path):
    with pytest.raises(ValueError, match=r"adk_dims.dcd: holds no velocities, but dataset.md.velocities=file"):
        generate_md(tmp_path / "x.zarr", MDConfig(velocities="file"), progress=False)


def test_empty_selection_and_too_few_trajectories(tmp_path):
    with pytest.raises(ValueError, match="selects no atom"):
        generate_md(tmp_path / "x.zarr", MDConfig(selection="resname XYZ"), progress=False)
    with pytest.raises(ValueError, match="split=trajectory needs at least 3 trajectories"):
        generate_md(tmp_path / "x.zarr", MDConfig(split="trajectory"), progress=False)
    with pytest.raises(ValueError, match="MDAnalysisTests.datafiles has no file named 'NOPE'"):
        generate_md(tmp_path / "x.zarr", MDConfig(trajectories=["MDAnalysisTests:NOPE"]), progress=False)


@pytest.mark.parametrize("top, traj, why, stride", [
    ("PRM", "TRJ", "MDAnalysis finds no time information in it and would assume 1 ps", 1),   # AMBER .mdcrd
    ("PRMncdf", "NCDF", "its frames are 0.0 ps apart", 2),                                  # NetCDF, time 0
])
def test_formats_without_a_time_step_take_dataset_md_dt(tmp_path, top, traj, why, stride):
    cfg = dict(topology=f"MDAnalysisTests:{top}", trajectories=[f"MDAnalysisTests:{traj}"], selection="name CA")
    with pytest.raises(ValueError, match=rf"the file carries no time step \({why}\); give .* dataset.md.dt=PS"):
        generate_md(tmp_path / "x.zarr", MDConfig(**cfg), progress=False)
    path = generate_md(tmp_path / "x.zarr", MDConfig(**cfg, dt=1.5, stride=stride), progress=False)
    assert open_store(path).attrs["dt"] == pytest.approx(1.5 * stride)
    with pytest.raises(ValueError, match=r"dataset.md.dt=-1.0: must be a positive number"):
        generate_md(tmp_path / "y.zarr", MDConfig(**cfg, dt=-1.0), progress=False)


def test_dt_overrides_the_files_own(tmp_path):
    path = generate_md(tmp_path / "x.zarr", MDConfig(dt=2.0), progress=False)
    assert open_store(path).attrs["dt"] == pytest.approx(2.0)


def test_empty_selection_suggests_the_usual_ones(tmp_path):
    with pytest.raises(ValueError, match=r"selects no atom of .*adk.psf \(3341 atoms\); the usual ones are "
                                         r"protein, backbone, nucleic"):
        generate_md(tmp_path / "x.zarr", MDConfig(selection="nucleic"), progress=False)


def test_task_step_equal_to_the_difference_step_warns(adk):
    from dist_egnn.datasets.loader import TrajectoryDataset

    info = open_store(adk)
    common = dict(node_features=["speed"], edge_features=["distance"])
    with pytest.warns(UserWarning, match=r"dataset.delta_t=1 .* forward differences .* nothing is left to learn"):
        TrajectoryDataset(info, "train", delta_t=1, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrajectoryDataset(info, "train", delta_t=2, **common)
