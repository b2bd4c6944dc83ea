"""The zarr layout: validation errors name the path and the fix; writes are atomic."""
import json

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.nbody import NBodyConfig, generate_nbody
from dist_egnn.datasets.store import SCHEMA_VERSION, StoreError, atomic_store, open_store


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


def test_existing_store_is_not_overwritten_by_accident(store):
    with pytest.raises(StoreError, match="already exists"):
        with atomic_store(store):
            pass
