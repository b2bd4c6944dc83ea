"""SPH fluids through SPlisHSPlasH: the scene recipe, the generated store, crash isolation and resume."""
import json
import sys
import warnings

import numpy as np
import pytest
import zarr

import dist_egnn.datasets.sph as sph
from dist_egnn.datasets.sph import SPHConfig, box_walls, generate_sph, scene_recipe, unit_cube_obj, work_folder
from dist_egnn.datasets.store import StoreError, open_store

TINY = dict(num_particles=120, train=1, val=1, test=1, duration=0.06, box=[0.8, 1.6, 0.8], retries=0)
TINY_WALLS = 19 * 35 * 19 - 15 * 31 * 15      # lattice points on the faces and one spacing beyond them

_available = None


def require_simulator():
    global _available
    if _available is None:
        _available = sph.simulator_available()
    if not _available[0]:
        pytest.skip(_available[1])


# ------------------------------------------------------------------------------------------ recipe only
def test_recipe_is_a_function_of_seed_split_and_scene():
    cfg = SPHConfig(**TINY)
    assert scene_recipe(cfg, "train", 0) == scene_recipe(cfg, "train", 0)
    assert scene_recipe(cfg, "train", 0) != scene_recipe(cfg, "val", 0)
    assert scene_recipe(cfg, "train", 0) != scene_recipe(SPHConfig(**{**TINY, "seed": 1}), "train", 0)


@pytest.mark.parametrize("scene", range(5))
def test_turned_block_lies_inside_the_box(scene):
    cfg = SPHConfig(num_particles=113_000)               # Fluid113K in the 5 x 10 x 5 box
    recipe = scene_recipe(cfg, "train", scene)
    rotation = np.asarray(recipe["rotation"])
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    counts = np.asarray(recipe["counts"])
    assert abs(np.prod(counts) - 113_000) / 113_000 < 0.05
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * counts * 0.025
    turned = corners @ rotation.T + recipe["centre"]
    assert np.all(turned.min(axis=0) >= [-2.5, 0, -2.5]) and np.all(turned.max(axis=0) <= [2.5, 10, 2.5])


def test_block_that_cannot_fit_names_the_fix():
    with pytest.raises(ValueError, match="dataset.sph.num_particles or enlarge dataset.sph.box"):
        scene_recipe(SPHConfig(num_particles=100_000, box=[1.0, 1.0, 1.0]), "train", 0)


def test_wall_cube_faces_point_outward():
    # guards the walls: inward-facing triangles put every particle inside the wall, where they barely move
    lines = unit_cube_obj().splitlines()
    vertices = np.array([[float(x) for x in line.split()[1:]] for line in lines if line.startswith("v ")])
    faces = [[int(i) - 1 for i in line.split()[1:]] for line in lines if line.startswith("f ")]
    assert len(faces) == 12
    for a, b, c in faces:
        normal = np.cross(vertices[b] - vertices[a], vertices[c] - vertices[a])
        assert np.dot(normal, (vertices[a] + vertices[b] + vertices[c]) / 3) > 0


def test_walls_are_a_lattice_shell_around_the_box():
    box, r = [0.8, 1.6, 0.8], 0.025
    walls = box_walls(box, r, 2)
    assert len(walls) == TINY_WALLS and len(np.unique(walls, axis=0)) == len(walls)
    lower, upper = np.array([-0.4, 0.0, -0.4]), np.array([0.4, 1.6, 0.4])
    depth = np.maximum(lower - walls, walls - upper).max(axis=1)       # how far beyond the nearest face
    np.testing.assert_allclose(np.unique(depth.round(6)), [0.0, 0.05])      # on the faces, one spacing out
    gaps = np.sort(np.linalg.norm(walls[:500, None] - walls[None], axis=-1), axis=1)[:, 1]
    np.testing.assert_allclose(gaps, 0.05, atol=1e-6)                 # the fluid's particle spacing
    assert len(box_walls(box, r, 1)) == 17 * 33 * 17 - 15 * 31 * 15 and len(box_walls(box, r, 0)) == 0
    with pytest.raises(ValueError, match="wall_layers=-1"):
        box_walls(box, r, -1)


def test_wall_reach_keeps_the_walls_some_fluid_particle_comes_near(tmp_path):
    """dataset.sph.wall_reach: a scene keeps the lattice points within the reach of some fluid particle in some
    frame (brute force agrees), in lattice order; None keeps the whole lattice."""
    lattice = box_walls(TINY["box"], 0.025, 2)
    rng = np.random.default_rng(0)
    frames = np.stack([rng.uniform([-0.4, 0.0, -0.4], [0.4, 0.3, 0.4], size=(40, 3)) for _ in range(5)])
    frames[4, 0] = [0.39, 1.5, 0.0]                         # one particle near a side wall and the top, once
    np.save(tmp_path / "pos.npy", frames.astype(np.float32))
    kept = sph.walls_within_reach(lattice, tmp_path, 0.075)
    gap = np.linalg.norm(lattice[:, None, :] - frames.reshape(-1, 3)[None].astype(np.float32), axis=-1).min(axis=1)
    np.testing.assert_array_equal(kept, lattice[gap <= 0.075])
    assert 0 < len(kept) < len(lattice) // 4 and (kept[:, 1] > 1.4).any()  # the floor, and the visit near the top
    assert sph.walls_within_reach(lattice, tmp_path, None) is lattice
    with pytest.raises(sph.ConfigError, match=r"dataset.sph.wall_reach=0.0: must be > 0"):
        generate_sph(tmp_path / "w.zarr", SPHConfig(**TINY, wall_reach=0.0), progress=False)
    assert not (tmp_path / "w.zarr").exists() and not work_folder(tmp_path / "w.zarr").exists()


def test_a_wall_reach_that_drops_whole_layers_says_so():
    """guards fluid_small_walls, whose walls were one particle thick with wall_layers=2: its fluid never came
    within wall_reach=0.075 m of the layer 0.05 m outside the faces, so that layer was dropped without a word.
    wall_layer_of gives the lattice's shells; a store that keeps fewer layers than asked warns, naming both keys
    and a reach that keeps them; one that keeps them all, or keeps every wall, does not."""
    cfg = SPHConfig(**TINY, wall_layers=3, wall_reach=0.075)
    lattice = box_walls(TINY["box"], 0.025, 3)
    layer = sph.wall_layer_of(lattice, TINY["box"], 0.025)
    shells = [(17 + 2 * k) * (33 + 2 * k) * (17 + 2 * k) - (15 + 2 * k) * (31 + 2 * k) * (15 + 2 * k) for k in range(3)]
    assert np.bincount(layer).tolist() == shells                    # 17 x 33 x 17 points on the faces of 0.8 x 1.6
    with pytest.warns(UserWarning, match=r"dataset.sph.wall_reach=0.075 keeps 1 of the 3 wall layers "
                                         r"\(dataset.sph.wall_layers\).*raise dataset.sph.wall_reach to about 0.175"):
        sph.warn_dropped_layers([lattice[layer == 0], lattice[layer == 0][:10]], cfg)
    with pytest.warns(UserWarning, match=r"keeps no wall particle in any scene.*set it to null"):
        sph.warn_dropped_layers([lattice[:0], lattice[:0]], cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sph.warn_dropped_layers([lattice[layer == 0], lattice[layer <= 2]], cfg)             # one scene keeps all
        sph.warn_dropped_layers([lattice], SPHConfig(**TINY, wall_layers=3))                 # no reach: every wall


# --------------------------------------------------------------------------------------- with simulator
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    require_simulator()
    path = tmp_path_factory.mktemp("sph") / "tiny.zarr"
    return generate_sph(path, SPHConfig(**TINY), dataset="tiny", progress=False, workers=2)


def test_store_is_valid_and_documented(tiny_store):
    info = open_store(tiny_store, check_values=True)
    assert info.attrs["source"] == "sph" and info.attrs["radius"] == pytest.approx(0.075)
    assert info.attrs["dt"] == pytest.approx(0.02) and info.attrs["units"]["length"] == "m"
    assert info.node_scalars == ["type"]
    cfg = SPHConfig(**TINY)
    for split in ("train", "val", "test"):
        recipe = scene_recipe(cfg, split, 0)
        meta = info.splits[split]
        assert meta.num_frames == 3 and meta.num_nodes == recipe["num_particles"] + TINY_WALLS
    assert info.attrs["generator"]["wall_particles"] == TINY_WALLS
    assert not work_folder(tiny_store).exists()                        # cleaned up once complete


def test_frame_zero_is_the_turned_moved_launched_lattice(tiny_store):
    group = zarr.open_group(str(tiny_store))["train"]
    recipe = scene_recipe(SPHConfig(**TINY), "train", 0)
    fluid = recipe["num_particles"]                                     # fluid rows first, then the walls
    pos0, vel0 = group["pos"][0, :fluid], group["vel"][0, :fluid]
    np.testing.assert_allclose(pos0.mean(axis=0), recipe["centre"], atol=1e-5)
    np.testing.assert_allclose(vel0, np.broadcast_to(recipe["velocity"], vel0.shape), atol=1e-6)
    gaps = np.sort(np.linalg.norm(pos0[:, None] - pos0[None], axis=-1), axis=1)[:, 1]
    np.testing.assert_allclose(gaps, 0.05, atol=1e-5)                 # lattice spacing: two particle radii


def test_particles_move_under_gravity_with_simulator_velocities(tiny_store):
    group = zarr.open_group(str(tiny_store))["train"]
    fluid = scene_recipe(SPHConfig(**TINY), "train", 0)["num_particles"]
    pos, vel = group["pos"][:, :fluid], group["vel"][:, :fluid]
    displacement = (pos[1:] - pos[:-1]) / 0.02
    mean_velocity = 0.5 * (vel[1:] + vel[:-1])
    assert np.abs(displacement - mean_velocity).mean() < 0.05         # velocities belong to the positions
    assert (vel[-1, :, 1] - vel[0, :, 1]).mean() < -0.2               # falling: ~ -9.81 m/s^2 x 0.04 s
    assert np.all(pos[..., 1] > 0) and np.all(np.abs(pos[..., [0, 2]]) < 0.4)


def test_a_crashing_scene_is_reported_and_the_rerun_resumes(tmp_path, monkeypatch):
    require_simulator()
    path = tmp_path / "resume.zarr"
    cfg = SPHConfig(**TINY)
    real = sph.scene_command
    crash = [sys.executable, "-c", "import os; os.abort()"]             # a segfault-like death by signal
    monkeypatch.setattr(sph, "scene_command", lambda spec, out: crash if "val-" in out else real(spec, out))
    with pytest.raises(StoreError, match=r"1 of 3 scenes failed.*same command resumes(?s:.*)val-00000: crashed"):
        generate_sph(path, cfg, progress=False, workers=2)
    work = work_folder(path)
    assert not path.exists()
    assert sorted(p.name for p in work.glob("*-0000*")) == ["test-00000", "train-00000"]
    before = np.load(work / "train-00000" / "pos.npy")

    ran = []
    monkeypatch.setattr(sph, "scene_command", lambda spec, out: ran.append(out) or real(spec, out))
    generate_sph(path, cfg, progress=False, workers=2)
    assert [p.rsplit("/", 1)[-1] for p in ran] == ["val-00000"]   # completed scenes are not run again
    open_store(path, check_values=True)
    np.testing.assert_array_equal(zarr.open_group(str(path))["train/pos"][:, :before.shape[1]], before)
    assert not work.exists()


def test_resuming_with_other_parameters_is_refused(tmp_path):
    path = tmp_path / "mixed.zarr"
    work = work_folder(path)
    sph._prepare_work(work, SPHConfig(**TINY), overwrite=False)
    with pytest.raises(StoreError, match=r"other parameters \(num_particles: 120 -> 150\).*prepare.overwrite=true"):
        sph._prepare_work(work, SPHConfig(**{**TINY, "num_particles": 150}), overwrite=False)
    sph._prepare_work(work, SPHConfig(**{**TINY, "retries": 3}), overwrite=False)   # run options may change
    sph._prepare_work(work, SPHConfig(**{**TINY, "wall_layers": 1}), overwrite=False)  # walls: added on assembly
    sph._prepare_work(work, SPHConfig(**{**TINY, "num_particles": 150}), overwrite=True)
    assert json.loads((work / "generator.json").read_text())["num_particles"] == 150


def test_existing_store_is_kept(tiny_store):
    with pytest.raises(StoreError, match="already exists"):
        generate_sph(tiny_store, SPHConfig(**TINY), progress=False)


def test_scenes_run_on_a_dask_distributed_cluster(tmp_path):
    require_simulator()
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        path = generate_sph(tmp_path / "cluster.zarr", SPHConfig(**TINY), progress=False,
                            cluster=cluster.scheduler_address)
    info = open_store(path, check_values=True)
    assert [info.splits[s].num_nodes for s in ("train", "val", "test")] == \
        [scene_recipe(SPHConfig(**TINY), s, 0)["num_particles"] + TINY_WALLS for s in ("train", "val", "test")]


def test_walls_are_static_particles_of_type_one(tiny_store):
    """Walls: the same positions in every frame, velocity 0, node scalar type 1 (fluid 0); the fluid stays
    inside the box, the walls on and outside its faces."""
    group = zarr.open_group(str(tiny_store))["val"]
    fluid = scene_recipe(SPHConfig(**TINY), "val", 0)["num_particles"]
    pos, vel, types = group["pos"][:], group["vel"][:], group["node_scalars"][:, 0]
    np.testing.assert_array_equal(types, np.r_[np.zeros(fluid), np.ones(TINY_WALLS)])
    walls = box_walls(TINY["box"], 0.025, 2)
    np.testing.assert_array_equal(pos[:, fluid:], np.broadcast_to(walls, pos[:, fluid:].shape))
    assert np.all(vel[:, fluid:] == 0) and np.all(vel[:, :fluid] != 0)
    inside = np.abs(pos[:, :fluid, [0, 2]]).max() <= 0.4 and pos[:, :fluid, 1].min() >= 0.0
    assert inside


def test_a_store_with_wall_reach_holds_the_walls_its_fluid_comes_near(tmp_path):
    """The store of a simulated scene with wall_reach: per scene the fluid rows, then exactly the lattice points
    some fluid particle of that scene came within the reach of (recomputed from the stored fluid), recorded as
    the recipe's num_walls; the whole lattice's size stays in the generator record. The tiny scenes' fluid falls
    for 0.06 s from the middle of the box, ~0.7 m above the floor: a reach of 0.75 m keeps some walls, not all."""
    require_simulator()
    reach = 0.75
    path = generate_sph(tmp_path / "near.zarr", SPHConfig(**TINY, wall_reach=reach), dataset="tiny",
                        progress=False, workers=2)
    info = open_store(path, check_values=True)
    lattice = box_walls(TINY["box"], 0.025, 2)
    assert info.attrs["generator"]["wall_reach"] == reach and info.attrs["generator"]["wall_particles"] == TINY_WALLS
    for split in ("train", "val", "test"):
        group = zarr.open_group(str(path))[split]
        fluid = scene_recipe(SPHConfig(**TINY), split, 0)["num_particles"]
        pos = group["pos"][:]
        gap = np.linalg.norm(lattice[:, None] - pos[:, :fluid].reshape(-1, 3)[None], axis=-1).min(axis=1)
        np.testing.assert_array_equal(pos[0, fluid:], lattice[gap <= reach])
        walls = pos.shape[1] - fluid
        assert 0 < group.attrs["recipes"][0]["num_walls"] == walls < TINY_WALLS
        np.testing.assert_array_equal(group["node_scalars"][:, 0], np.r_[np.zeros(fluid), np.ones(walls)])


def test_a_scene_the_scheduler_never_ran_stops_before_the_store_is_written(tmp_path, monkeypatch):
    """guards the same lost scene from the other side: whatever the scheduler does, a store is only assembled
    from every scene; the error names the missing ones and says the same command resumes."""
    monkeypatch.setattr(sph, "simulator_available", lambda: (True, ""))
    monkeypatch.setattr(sph, "map_tasks", lambda fn, tasks, **kw: iter(()))      # runs nothing, reports nothing
    with pytest.raises(StoreError, match=r"3 of 3 scenes were never simulated \(train-00000, val-00000, test-00000\)"
                                         r".*same command resumes"):
        generate_sph(tmp_path / "lost.zarr", SPHConfig(**TINY), progress=False)
    assert not (tmp_path / "lost.zarr").exists()
