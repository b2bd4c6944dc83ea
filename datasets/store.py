"""The zarr layout for trajectories of geometric graphs (schema version 2): writing, opening, validating.

Layout of one store (a zarr v3 group, ``<paths.data>/<dataset name>.zarr``)::

    /                         attrs: schema_version, dataset, source, dt, units, radius, node_scalars, generator
    /train /val /test         one group per split; attrs: num_scenes, num_frames
        pos          (T, N_total, 3) float32   positions of every node of every scene, frame by frame
        vel          (T, N_total, 3) float32   velocities, same layout
        node_scalars (N_total, K)    float32   static per-node scalars, named by the root attr node_scalars
        scene_ptr    (S + 1,)        int64     scene s owns node columns [scene_ptr[s], scene_ptr[s + 1])

Scenes (trajectories) of one split share the frame count T and may differ in node count: their nodes are
concatenated along axis 1, so a scene's frame is one contiguous slice ``pos[t, a:b]``.

Chunking: (1, ``chunk_nodes``, 3), one frame per chunk, because a training sample reads two frames (t and
t + Δt) that are never adjacent; ``chunk_nodes`` defaults to 32,768 nodes (384 KiB of float32 coordinates),
large enough that a 10^5-node scene is a handful of chunks, small enough that reading one small scene
decompresses little and a rank reading only its partition touches only the chunks it needs.

Node scalar ``type`` (schema 2): 0 = fluid (moved by the model, in the loss and the metrics), 1 = wall (a
static particle: constant position in every frame, velocity 0; it sends messages but is never moved and
never scored). SPH and converted (GNS/LagrangeBench) stores must hold it; a store without it (N-body,
proteins) has no walls. Schema 1 stores of those two sources predate walls and are refused with the
command that rebuilds them; schema 1 stores of the other sources are read as before.

Units: ``dt`` is the physical time between two stored frames, in ``units["time"]``; positions are in
``units["length"]``. ``radius`` is the default radius-graph cutoff (null: complete graph).

Stores are written into a temporary sibling folder and renamed into place only when complete, so a failed
or interrupted write never leaves a half-written store under the final name.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import dask.array as da
import numpy as np
import zarr

from dist_egnn.errors import BadInput
from dist_egnn.keys import SPLITS

SCHEMA_VERSION = 2
FLUID, WALL = 0, 1                 # values of the node scalar "type"
WALL_SOURCES = ("sph", "gns")      # sources whose stores carry walls and the node scalar "type" since schema 2
DEFAULT_CHUNK_NODES = 32_768
FRAME_ARRAYS = ("pos", "vel")
COMPRESSORS = (zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),)
# Write every chunk, even one that is all zeros (zarr skips those by default): then a chunk file that is
# missing always means damage, and the validator can count them. Set for the whole process (every process
# that writes a store imports this module), because an array re-opened by name forgets its own config.
ALL_CHUNKS = {"write_empty_chunks": True}
zarr.config.set({"array.write_empty_chunks": True})


class StoreError(BadInput):
    """A store that cannot be used: the message names the path, the field and the fix."""


# ----------------------------------------------------------------------------------------------- writing
@contextmanager
def atomic_store(path: str | os.PathLike, overwrite: bool = False, validate: bool = True) -> Iterator[zarr.Group]:
    """Open a new store in a temporary sibling folder; rename it to ``path`` only if the block succeeds.

    An existing store at ``path`` is replaced only when ``overwrite`` is true and the new one is complete; an
    existing path that is not a zarr store or an empty folder is never replaced (:func:`check_replaceable`).
    A dataset store is validated (:func:`open_store`, structure only; ``validate=False`` for other layouts,
    e.g. stored partitions) before the rename: one that fails (e.g. a split without scenes) raises
    :class:`StoreError` and leaves nothing behind. A ``path`` that is a dangling
    or looping symbolic link is refused before anything is made (:func:`check_store_path`).
    """
    path = Path(path)
    check_store_path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; delete it or pass overwrite=True to replace it")
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        yield zarr.open_group(str(tmp), mode="w")
        try:
            if validate:
                open_store(tmp)
        except StoreError as err:
            raise StoreError(f"the new store for {path} failed validation, so it was not put in place (nothing "
                             f"is left behind): {str(err).replace(str(tmp), str(path))}") from None
        if path.exists() and overwrite:
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, path)           # refuses (ENOTEMPTY) a store that appeared meanwhile
            except OSError:
                if not path.exists():
                    raise
                # Another process made the same store meanwhile (two runs of a study that both found none):
                # keep the one in place; the caller's checks of the store against its settings still apply.
                print(f"{path} was put in place by another process while this one was writing it: using that "
                      f"one (this copy is discarded)", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def preparation_lock(path: str | os.PathLike) -> Iterator[None]:
    """Held while this process prepares the missing store ``path``: a second process that finds the same store
    missing (two runs of a study started together, two trainings started by hand) waits here, told who holds it,
    then finds the store in place instead of generating it again. :func:`atomic_store` alone keeps such a race
    safe but not cheap: both processes would generate the whole dataset and one copy would be discarded.

    ``fcntl.flock`` on the hidden sibling ``.NAME.prepare-lock``, which the kernel releases however the holder
    exits (a crash leaves no stale lock). The holder removes the file before it lets go; a process that opened
    it before the removal then holds a lock on a file no longer in place, as may one that opens a new file: at
    worst, after a failed preparation, two processes both prepare, which :func:`atomic_store` keeps safe."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.prepare-lock")
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            print(f"{path}: {holder} is preparing it; waiting for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def check_replaceable(path: Path) -> None:
    """An existing ``path`` that overwriting may replace is a zarr group or array (its ``zarr.json``, or v2's
    ``.zgroup``/``.zarray``) or an empty folder: anything else is refused, since replacing it deletes it."""
    if not path.exists():
        return
    if path.is_dir() and (any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray"))
                          or not any(path.iterdir())):
        return
    raise StoreError(f"{path} is not a zarr store (no zarr.json) and not an empty folder, so overwriting "
                     f"(prepare.overwrite=true) will not replace it: that would delete what it holds; give "
                     f"dataset.store (or dataset.name) a path of its own")


def check_store_path(path: str | os.PathLike) -> None:
    """Refuse a store path that is, or lies under, a dangling or looping symbolic link: checked before a store
    is made (a whole dataset would be generated, then the rename would fail or silently replace the link)."""
    path = Path(path)
    for link in (path, *path.parents):
        if not link.is_symlink():
            continue
        try:
            link.resolve(strict=True)
        except FileNotFoundError:
            raise StoreError(f"dataset store path {path}: {link} is a symbolic link to {os.readlink(link)}, which "
                             f"does not exist (a dangling link): remove the link or point it at an existing store, "
                             f"or set paths.data to another folder") from None
        except (RuntimeError, OSError):       # RuntimeError: "Symlink loop" (Python < 3.13), OSError ELOOP
            raise StoreError(f"dataset store path {path}: {link} is a symbolic link that loops ({link} -> "
                             f"{os.readlink(link)} -> ...): remove the link, or set paths.data to another "
                             f"folder") from None


def write_root_attrs(root: zarr.Group, *, dataset: str, source: str, dt: float, units: dict[str, str],
                     radius: float | None, node_scalars: list[str], generator: dict[str, Any]) -> None:
    """Write the store-level metadata every reader relies on."""
    root.attrs.update(dict(schema_version=SCHEMA_VERSION, dataset=dataset, source=source, dt=float(dt),
                           units=dict(units), radius=None if radius is None else float(radius),
                           node_scalars=list(node_scalars), generator=dict(generator)))


def create_split(root: zarr.Group, split: str, scene_sizes: list[int] | np.ndarray, num_frames: int,
                 num_scalars: int, chunk_nodes: int = DEFAULT_CHUNK_NODES) -> zarr.Group:
    """Create the empty arrays of one split; fill them with :func:`write_scenes`."""
    if split not in SPLITS:
        raise StoreError(f"unknown split {split!r}: use one of {SPLITS}")
    sizes = np.asarray(scene_sizes, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(sizes)])
    total = int(ptr[-1])
    group = root.create_group(split)
    group.attrs.update(dict(num_scenes=len(sizes), num_frames=int(num_frames)))
    chunk = max(1, min(chunk_nodes, total))
    for name in FRAME_ARRAYS:
        group.create_array(name, shape=(num_frames, total, 3), chunks=(1, chunk, 3), dtype="float32",
                           compressors=COMPRESSORS, config=ALL_CHUNKS)
    group.create_array("node_scalars", shape=(total, num_scalars), chunks=(chunk, max(1, num_scalars)),
                       dtype="float32", compressors=COMPRESSORS, config=ALL_CHUNKS)
    group.create_array("scene_ptr", data=ptr)
    return group


def write_scenes(group: zarr.Group, first_scene: int, pos: np.ndarray, vel: np.ndarray,
                 node_scalars: np.ndarray) -> None:
    """Write consecutive scenes of equal node count: pos/vel (S, T, n, 3), node_scalars (S, n, K)."""
    ptr = group["scene_ptr"][:]
    count, frames, n = pos.shape[:3]
    start, stop = int(ptr[first_scene]), int(ptr[first_scene + count])
    if stop - start != count * n:
        raise StoreError(f"scenes {first_scene}..{first_scene + count - 1} of {group.path} hold "
                         f"{stop - start} nodes in scene_ptr, but {count} x {n} were given")
    for name, values in (("pos", pos), ("vel", vel)):
        group[name][:, start:stop] = values.transpose(1, 0, 2, 3).reshape(frames, count * n, 3)
    group["node_scalars"][start:stop] = node_scalars.reshape(count * n, -1)


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class SplitInfo:
    """Shape facts of one split of a validated store."""

    num_scenes: int
    num_frames: int
    num_nodes: int
    scene_ptr: np.ndarray

    def scene_nodes(self, scene: int) -> slice:
        return slice(int(self.scene_ptr[scene]), int(self.scene_ptr[scene + 1]))


@dataclass(frozen=True)
class StoreInfo:
    """Metadata of a validated store."""

    path: Path
    attrs: dict[str, Any]
    splits: dict[str, SplitInfo]

    @property
    def node_scalars(self) -> list[str]:
        return list(self.attrs["node_scalars"])


def open_store(path: str | os.PathLike, check_values: bool = False) -> StoreInfo:
    """Open and validate a store; raise :class:`StoreError` naming the path and the problem.

    Structure and metadata are always checked (cheap). ``check_values`` also scans every position and
    velocity for NaN/Inf through dask, chunk by chunk, so memory stays bounded by a few chunks.
    """
    path = Path(path)
    check_store_path(path)
    if not path.exists():
        raise StoreError(f"dataset store {path} does not exist: create it with "
                         f"`python launch/prepare.py dataset=<name>` or set paths.data to the folder holding it")
    _check_metadata_files(path)
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as err:  # zarr raises several types for a folder that is not a group
        raise StoreError(f"{path} is not a readable zarr group ({err}); "
                         f"delete it and prepare the dataset again") from err
    attrs = dict(root.attrs)
    version = attrs.get("schema_version")
    if version is None:
        raise StoreError(f"{path}: attribute 'schema_version' is missing; this is not a dist-egnn store")
    if not isinstance(version, int):
        raise StoreError(f"{path}: attribute 'schema_version' must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise StoreError(f"{path}: schema_version {version} is newer than this dist-egnn understands "
                         f"({SCHEMA_VERSION}); upgrade dist-egnn")
    for key in ("dataset", "source", "dt", "units", "radius", "node_scalars"):
        if key not in attrs:
            raise StoreError(f"{path}: root attribute {key!r} is missing; prepare the dataset again")
    if not (isinstance(attrs["dt"], (int, float)) and attrs["dt"] > 0):
        raise StoreError(f"{path}: attribute 'dt' must be a positive number, got {attrs['dt']!r}")
    radius = attrs["radius"]
    if radius is not None and not (isinstance(radius, (int, float)) and radius > 0):
        raise StoreError(f"{path}: attribute 'radius' must be a positive number or null (complete graph), "
                         f"got {radius!r}")
    if not isinstance(attrs["units"], dict):
        raise StoreError(f"{path}: attribute 'units' must map quantities to units, e.g. "
                         f"{{'length': 'm', 'time': 's'}}, got {attrs['units']!r}")
    if not (isinstance(attrs["node_scalars"], list) and all(isinstance(n, str) for n in attrs["node_scalars"])):
        raise StoreError(f"{path}: attribute 'node_scalars' must be a list of names, got {attrs['node_scalars']!r}")
    if attrs["source"] in WALL_SOURCES and (version < 2 or "type" not in attrs["node_scalars"]):
        what = f"written with store schema {version}" if version < 2 else "without the node scalar 'type'"
        raise StoreError(f"{path}: {attrs['source']} store {what}; {attrs['source']} stores now carry the walls as "
                         f"static particles marked by the node scalar 'type' (0 fluid, 1 wall): rebuild it with "
                         f"`python launch/prepare.py dataset={attrs['dataset']} prepare.overwrite=true`"
                         + (" (with dataset.gns.path=FOLDER)" if attrs["source"] == "gns" else ""))

    splits = {}
    for split in SPLITS:
        try:
            if split not in root:
                raise StoreError(f"{path}: split group {split!r} is missing")
            splits[split] = _check_split(path, root[split], len(attrs["node_scalars"]), check_values,
                                         source=attrs["source"])
        except StoreError:
            raise
        except Exception as err:  # metadata zarr cannot interpret (valid JSON, wrong content): name the split
            raise StoreError(f"{path}/{split}: cannot be read ({type(err).__name__}: {str(err)[:300]}); the "
                             f"store's metadata is damaged: prepare the dataset again with prepare.overwrite=true"
                             ) from err
    return StoreInfo(path=path, attrs=attrs, splits=splits)


METADATA = "zarr.json"


def _check_metadata_files(path: Path) -> None:
    """Every metadata file of the layout that exists must be JSON: zarr would fail on a garbled one with a
    bare JSONDecodeError naming no file. Only the layout's own files are read (the root, the splits and
    their arrays: a few dozen small files), never the chunk folders."""
    files = [path / METADATA]
    for split in SPLITS:
        files.append(path / split / METADATA)
        files += [path / split / name / METADATA for name in (*FRAME_ARRAYS, "node_scalars", "scene_ptr")]
    problem = unreadable_metadata(files)
    if problem:
        raise StoreError(f"{problem}; the store's metadata is damaged: restore the file, or prepare the dataset "
                         f"again with prepare.overwrite=true")


def unreadable_metadata(files) -> str | None:
    """``"<file>: cannot be read as JSON (...)"`` for the first of ``files`` (zarr.json files) that exists but
    is not a JSON object, else None; absent files are left to the caller (a missing group or array)."""
    for file in files:
        if not Path(file).is_file():
            continue
        try:
            meta = json.loads(Path(file).read_bytes())
        except (OSError, ValueError) as err:    # UnicodeDecodeError and JSONDecodeError are ValueErrors
            return f"{file}: cannot be read as JSON ({type(err).__name__}: {err})"
        if not isinstance(meta, dict):
            return f"{file}: cannot be read as JSON zarr metadata (holds {type(meta).__name__}, not an object)"
    return None


def _check_split(path: Path, group: zarr.Group, num_scalars: int, check_values: bool,
                 source: str = "<source>") -> SplitInfo:
    where = f"{path}/{group.basename}"
    for name in (*FRAME_ARRAYS, "node_scalars", "scene_ptr"):
        if name not in group:
            raise StoreError(f"{where}: array {name!r} is missing; prepare the dataset again")
    pos, vel = group["pos"], group["vel"]
    if pos.ndim != 3 or pos.shape[2] != 3:
        raise StoreError(f"{where}/pos: shape {pos.shape} is not (T, N, 3)")
    if vel.shape != pos.shape:
        raise StoreError(f"{where}/vel: shape {vel.shape} disagrees with pos {pos.shape} (T and N must match)")
    for name in (*FRAME_ARRAYS, "node_scalars"):
        if group[name].dtype != np.float32:
            raise StoreError(f"{where}/{name}: dtype {group[name].dtype}, expected float32")
    scalars = group["node_scalars"]
    if scalars.shape != (pos.shape[1], num_scalars):
        raise StoreError(f"{where}/node_scalars: shape {scalars.shape}, expected ({pos.shape[1]}, {num_scalars}) "
                         f"from N and the root attribute node_scalars")
    ptr = np.asarray(group["scene_ptr"][:])
    if ptr.ndim == 1 and len(ptr) == 1:
        raise StoreError(f"{where}: split {group.basename!r} holds no scenes; every split needs at least one scene "
                         f"(e.g. dataset.{source}.{group.basename} >= 1 for a generated "
                         f"store, or more frames or files for a converted one)")
    if ptr.ndim != 1 or len(ptr) < 2 or ptr[0] != 0 or ptr[-1] != pos.shape[1] or np.any(np.diff(ptr) <= 0):
        raise StoreError(f"{where}/scene_ptr: must rise strictly from 0 to N={pos.shape[1]}; got "
                         f"{ptr[:5]}...{ptr[-2:]} (len {len(ptr)})")
    for name, key in (("num_scenes", len(ptr) - 1), ("num_frames", pos.shape[0])):
        if name in group.attrs and group.attrs[name] != key:
            raise StoreError(f"{where}: attribute {name}={group.attrs[name]} disagrees with the arrays ({key}); "
                             f"the store is damaged, prepare the dataset again")
    for name in (*FRAME_ARRAYS, "node_scalars"):
        _check_chunks(f"{where}/{name}", group[name])
    if check_values:
        for name in FRAME_ARRAYS:
            _check_finite(f"{where}/{name}", group[name])
        _check_finite(f"{where}/node_scalars", scalars)
    return SplitInfo(num_scenes=len(ptr) - 1, num_frames=pos.shape[0], num_nodes=pos.shape[1], scene_ptr=ptr)


def missing_chunks(array: zarr.Array) -> tuple[int, int]:
    """(missing, expected): how many of an array's chunk files are absent. zarr reads a missing chunk as the
    fill value without a word, so every array written with :data:`ALL_CHUNKS` must have all of them
    (stores here, and the stored partitions of ``partitioners.artifacts``)."""
    expected = array.nchunks
    return expected - array.nchunks_initialized, expected


def _check_chunks(where: str, array: zarr.Array) -> None:
    """Every chunk must exist: zarr would silently read a missing one as zeros."""
    missing, expected = missing_chunks(array)
    if missing:
        raise StoreError(f"{where}: {missing} of {expected} chunks are missing (zarr would read them "
                         f"as zeros); the store is damaged or was not written completely, prepare the dataset "
                         f"again with prepare.overwrite=true")


def _check_finite(where: str, array: zarr.Array) -> None:
    """Scan an array chunk by chunk (dask) and report the first frame holding NaN or Inf."""
    lazy = da.from_zarr(array)
    try:
        bad = ~da.isfinite(lazy).all(axis=tuple(range(1, lazy.ndim))).compute()
    except Exception as err:  # a missing or truncated chunk surfaces here
        raise StoreError(f"{where}: cannot be read ({type(err).__name__}: {err}); the store is damaged, "
                         f"prepare the dataset again") from err
    if np.any(bad):
        first = int(np.flatnonzero(bad)[0])
        raise StoreError(f"{where}: NaN or Inf values, first at index {first} of axis 0 "
                         f"({int(bad.sum())} of {len(bad)} affected); fix or regenerate the data")
