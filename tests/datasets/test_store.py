"""The zarr layout: validation errors name the path and the fix; writes are atomic."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import SCHEMA_VERSION, StoreError, atomic_store, open_store, preparation_lock


@pytest.fixture()
def store(tmp_path):
    return generate_nbody(tmp_path / "nb.zarr", NBodyConfig(num_particles=6, train=3, val=2, test=2, steps=300),
                          progress=False)


def test_missing_store_says_how_to_create_it(tmp_path):
    with pytest.raises(StoreError, match="prepare.py"):
        open_store(tmp_path / "nope.zarr")


def test_folder_that_is_not_a_store(tmp_path):
    (tmp_path / "junk.zarr").mkdir()
    (tmp_path / "junk.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match="junk.zarr"):
        open_store(tmp_path / "junk.zarr")


def test_newer_schema_is_refused(store):
    zarr.open_group(str(store)).attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="newer"):
        open_store(store)


def test_missing_array_is_named(store):
    import shutil
    shutil.rmtree(store / "val" / "vel")
    with pytest.raises(StoreError, match=r"val.*'vel' is missing"):
        open_store(store)


def test_nan_positions_are_found_with_their_frame(store):
    zarr.open_group(str(store))["test/pos"][2, 1, 0] = np.nan
    open_store(store)                                    # structure alone is fine
    with pytest.raises(StoreError, match=r"test/pos: NaN or Inf values, first at index 2"):
        open_store(store, check_values=True)


def test_arrays_that_disagree_on_shape(store):
    root = zarr.open_group(str(store))
    del root["train/vel"]
    root["train"].create_array("vel", shape=(3, 5, 3), dtype="float32")
    with pytest.raises(StoreError, match="disagrees with pos"):
        open_store(store)


def test_truncated_chunk_is_reported(store):
    chunk = next(p for p in (store / "train" / "pos" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match="cannot be read"):
        open_store(store, check_values=True)


def test_failed_write_keeps_the_old_store(store):
    before = json.loads((store / "zarr.json").read_text())
    with pytest.raises(RuntimeError):
        with atomic_store(store, overwrite=True) as root:
            root.attrs["partial"] = True
            raise RuntimeError("simulated crash while writing")
    assert json.loads((store / "zarr.json").read_text()) == before
    assert not [p for p in store.parent.iterdir() if p.name.startswith(".")]   # no temporary left behind
    open_store(store, check_values=True)


def test_overwrite_replaces_a_store_or_an_empty_folder_and_refuses_anything_else(store, tmp_path):
    """prepare.overwrite=true on a dataset.store that names a folder of the user's (a source folder, the repo)
    replaced and deleted it; only a zarr store or an empty folder is replaced now, and the folder keeps its files."""
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match=r"theirs is not a zarr store .* give dataset.store .* a path of its own"):
        with atomic_store(theirs, overwrite=True, validate=False) as root:     # as stored partitions are written
            root.attrs["new"] = True
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "sub").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_store(empty, overwrite=True, validate=False) as root:
        root.attrs["new"] = True
    with atomic_store(empty, overwrite=True, validate=False) as root:          # now a zarr group: replaced again
        root.attrs["again"] = True
    assert zarr.open_group(str(empty), mode="r").attrs["again"] is True


def test_prepare_refuses_to_overwrite_a_folder_of_the_users_before_generating(tmp_path):
    """`python launch/prepare.py dataset.store=FOLDER prepare.overwrite=true` (in process, through Hydra's compose):
    refused at once, the folder untouched."""
    from hydra import compose, initialize_config_dir

    from runs import ROOT, prepare_cli

    cli = prepare_cli()
    cli.prepare_dataset = lambda *args, **kwargs: pytest.fail("generated before refusing")
    (tmp_path / "notes.txt").write_text("mine")
    overrides = [f"dataset.store={tmp_path}", "prepare.overwrite=true", "trainer.progress=false"]
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        with pytest.raises(StoreError, match="not a zarr store"):
            cli.prepare(compose(config_name="prepare", overrides=overrides))
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_existing_store_is_not_overwritten_by_accident(store):
    with pytest.raises(StoreError, match="already exists"):
        with atomic_store(store):
            pass


@pytest.mark.parametrize("source, extra", [("sph", ""), ("gns", " (with dataset.gns.path=FOLDER)")])
def test_store_of_the_old_schema_without_walls_names_the_rebuild_command(store, source, extra):
    """SPH and converted stores of schema 1 have no walls: refused with the command that rebuilds them."""
    attrs = zarr.open_group(str(store)).attrs
    attrs.update(source=source, dataset="fluid_small", schema_version=1, node_scalars=["type"])
    command = f"`python launch/prepare.py dataset=fluid_small prepare.overwrite=true`{extra}"
    with pytest.raises(StoreError, match=rf"{source} store written with store schema 1; .*node scalar 'type' "
                                         rf"\(0 fluid, 1 wall\): rebuild it with {re.escape(command)}"):
        open_store(store)
    attrs.update(schema_version=SCHEMA_VERSION, node_scalars=["charge"])          # new schema, but no type
    with pytest.raises(StoreError, match=r"without the node scalar 'type'.*prepare.overwrite=true"):
        open_store(store)


def test_other_sources_of_the_old_schema_still_open(store):
    """N-body, MD and synthetic stores gained nothing in schema 2: their schema-1 stores are read as before."""
    zarr.open_group(str(store)).attrs["schema_version"] = 1
    assert open_store(store).node_scalars == ["charge"]


# -- a store and the configuration that made it (issue 18 item 4) ------------------------------------------
def nbody_config(store_path, **changes):
    from dataclasses import asdict
    params = dict(asdict(NBodyConfig(num_particles=6, train=3, val=2, test=2, steps=300)), **changes)
    return dict(name="nb", source="nbody", nbody=params)


def test_generator_parameters_that_differ_are_named(store):
    from dist_egnn.datasets.prepare import check_store_matches, store_differences
    info = open_store(store)
    assert store_differences(nbody_config(store), info.attrs) == []
    changed = nbody_config(store, num_particles=7, seed=1)
    assert store_differences(changed, info.attrs) == ["dataset.nbody.num_particles: store 6, configured 7",
                                                      "dataset.nbody.seed: store 0, configured 1"]
    with pytest.raises(StoreError, match=r"nb.zarr was made with other generator parameters .*"
                                         r"num_particles: store 6, configured 7.*prepare.overwrite=true"):
        check_store_matches(changed, info)


def test_keys_that_do_not_change_the_data_do_not_count(store):
    """Run options (scenes per batch, workers, retries, timeouts, write batching), the radius graphs are built
    with, the store's folder and name: none makes another store."""
    import shutil

    from dist_egnn.datasets.prepare import store_differences, store_identity
    info = open_store(store)
    config = nbody_config(store, scenes_per_batch=1)
    config.update(radius=2.0, auto_prepare=False, prefetch=0)
    assert store_differences(config, info.attrs) == []
    copy = shutil.copytree(store, store.parent / "elsewhere" / "renamed.zarr")
    zarr.open_group(str(copy), mode="r+").attrs["generator"] = dict(info.attrs["generator"], scenes_per_batch=7)
    assert store_identity(open_store(copy))["hash"] == store_identity(info)["hash"]
    zarr.open_group(str(copy), mode="r+").attrs["dt"] = 0.5
    assert store_identity(open_store(copy))["hash"] != store_identity(info)["hash"]


def test_run_options_of_other_sources_do_not_count():
    from dist_egnn.datasets.prepare import store_differences
    sph = dict(source="sph", sph=dict(num_particles=100, retries=3, timeout_s=60.0, threads_per_scene=2))
    recorded = dict(source="sph", generator=dict(num_particles=100, retries=1, timeout_s=None, threads_per_scene=None))
    assert store_differences(sph, recorded) == []
    md = dict(source="md", md=dict(topology="/here/adk.psf", trajectories=["/here/a.dcd"], frames_per_write=8,
                                   dt=None))
    recorded = dict(source="md", generator=dict(topology=["/there/adk.psf"], trajectories=["/there/a.dcd"],
                                                frames_per_write=64, dt=None))
    assert store_differences(md, recorded) == []              # files compared by name: a moved store matches
    md["md"]["trajectories"] = ["/here/b.dcd"]
    assert store_differences(md, recorded) == ["dataset.md.trajectories: store ['/there/a.dcd'], configured "
                                               "['/here/b.dcd']"]


def test_a_generated_store_failing_validation_is_not_put_in_place(tmp_path):
    with pytest.raises(StoreError, match=r"failed validation.*nothing is left behind.*'val' holds no scenes"):
        generate_nbody(tmp_path / "e.zarr", NBodyConfig(num_particles=6, train=2, val=0, test=1, steps=300),
                       progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["nowhere.zarr", "link.zarr"])          # dangling, looping
def test_a_broken_link_is_refused_before_anything_is_made(tmp_path, target):
    (tmp_path / "link.zarr").symlink_to(target)
    with pytest.raises(StoreError, match="link.zarr.*(dangling|loops)"):
        generate_nbody(tmp_path / "link.zarr", NBodyConfig(num_particles=6, train=1, val=1, test=1, steps=300),
                       progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["link.zarr"] and (tmp_path / "link.zarr").is_symlink()


def test_a_garbled_array_metadata_file_is_named(store):
    (store / "train" / "vel" / "zarr.json").write_text('{"zarr_format": 3, "sha')
    with pytest.raises(StoreError, match=r"train/vel/zarr.json: cannot be read as JSON"):
        open_store(store)


def test_a_store_another_process_put_in_place_meanwhile_is_kept(tmp_path, capsys):
    # two runs of a study (jobs=2) that both found no store and both made it: the second rename must not fail
    path = tmp_path / "nb.zarr"
    with atomic_store(path, validate=False) as root:
        root.attrs["mine"] = True
        generate_nbody(path, NBodyConfig(num_particles=6, train=3, val=2, test=2, steps=300), progress=False)
    assert "another process" in capsys.readouterr().err
    assert "mine" not in zarr.open_group(str(path)).attrs                   # the first one in place is kept
    open_store(path, check_values=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # this copy is gone


AUTO_PREPARE = """import sys
from runs import config
from dist_egnn.training.setup import open_dataset_store
open_dataset_store(config(sys.argv[1]).dataset, progress=False)
"""


def test_two_processes_that_find_the_store_missing_prepare_it_once(tmp_path):
    # two runs of a study (jobs=2) started together: the second waits for the first's store instead of making
    # another. The test holds the lock until both are waiting, so they surely overlap.
    data = tmp_path / "data"
    store = data / "nbody_small.zarr"
    env_path = str(Path(__file__).resolve().parents[1])
    waiting = "is preparing it; waiting for it to finish"
    with preparation_lock(store):
        procs, errs = [], []
        for i in range(2):
            errs.append(tmp_path / f"err{i}")
            with errs[-1].open("w") as err:
                procs.append(subprocess.Popen([sys.executable, "-c", AUTO_PREPARE, str(data)], cwd=env_path,
                                              env={**os.environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"},
                                              stdout=subprocess.PIPE, stderr=err, text=True))
        deadline = time.monotonic() + 120
        while not all(waiting in e.read_text() for e in errs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [e.read_text()[-2000:] for e in errs]
            time.sleep(0.2)
        assert not store.exists()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e.read_text()[-2000:] for e in errs]
    assert sum("preparing it now" in out for out in outs) == 1, outs
    assert not any("discarded" in e.read_text() for e in errs)          # no second copy was made
    open_store(store, check_values=True)
    assert not [p.name for p in data.iterdir() if p.name.startswith(".")]   # no lock file or partial copy left


def test_training_creates_a_missing_store_with_the_runs_prepare_options(tmp_path):
    """A training that finds its store missing makes it as launch/prepare.py would, with the run's prepare.scheduler,
    workers and cluster (they were dropped: every local core whatever the user set)."""
    from omegaconf import OmegaConf

    from dist_egnn.errors import ConfigError
    from dist_egnn.training.setup import open_dataset_store

    dataset = OmegaConf.create(dict(name="nb", source="nbody", store=str(tmp_path / "nb.zarr"), auto_prepare=True,
                                    check_values=False, nbody=dict(num_particles=5, train=2, val=1, test=1, steps=200)))
    with pytest.raises(ConfigError, match=r"scheduler='nowhere'.*prepare.scheduler"):
        open_dataset_store(dataset, progress=False, prepare=OmegaConf.create(dict(scheduler="nowhere", workers=None,
                                                                                  cluster=None)))
    assert not (tmp_path / "nb.zarr").exists()
    info = open_dataset_store(dataset, progress=False, prepare=OmegaConf.create(dict(scheduler="sync", workers=1,
                                                                                     cluster=None)))
    assert info.splits["train"].num_scenes == 2
