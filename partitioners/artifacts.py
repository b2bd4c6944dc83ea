"""Stored partitions: the node-to-part assignment of every sample, kept beside its dataset store (layout v1).

A sample is one (scene, input frame t) of a split (``datasets.loader.TrajectoryDataset``). Particles move,
so every sample is partitioned on its own graph at frame t, and the assignments are stored once rather
than recomputed by every rank of every run: METIS is also only deterministic for a seed on one platform
and METIS version, so the stored assignment is the reference.

Layout of one artifact (a zarr v3 group)::

    <paths.data>/<dataset>.partitions/<method>-p<P>-s<seed>[-w<hash of the part weights>].zarr
    /                     attrs: schema_version, method, num_parts, seed, radius, max_neighbors, weights,
                                 inputs (everything that determined the assignments), inputs_hash,
                                 metrics (per split: mean and max over samples of each quality number)
    /train /val /test     attrs: frames (input frames used, one per row), num_scenes
        assignment        (F, N_total) int32   part of every node at input frame frames[k]; scene s owns
                                               columns scene_ptr[s]:scene_ptr[s + 1], as in the dataset store
        halo_mask         (F, N_total) uintB   bit p set: part p receives an edge from this node (the node is
                                               in p's 1-hop halo); B = 8, 16, 32 or 64 bits, the fewest >= P
        scene_ptr         (S + 1,) int64       copied from the dataset store
        cut_fraction      (F, S) float32       per sample (row k, scene s); see partitioners.metrics
        boundary_fraction (F, S) float32
        imbalance         (F, S) float32
        work_imbalance    (F, S) float32       the same with each node weighing 1 + the edges it receives
        num_edges         (F, S) int64
        part_size         (F, S, P) int32
        halo_size         (F, S, P) int32

Sample index i of a TrajectoryDataset is (scene, row) = divmod(i, F), the same order as its ``locate``.
``assignment`` and ``halo_mask`` are chunked (1, chunk_nodes) like the store's frames, so reading one
sample's assignment (:func:`load_assignments`) touches only the chunks of its scene, never the whole
artifact. With both, a rank finds its owned nodes, its halo and what it sends to every other rank
(``partitioners.subgraphs.part_nodes``) without reading any position it does not need.

Graph and seed per sample: the radius graph of the positions at t with the dataset's radius and
max_neighbors (complete when the radius is None), before any edge dropping (``model.cutoff_rate``), and
without wall -> wall edges (walls: node scalar ``type`` 1; ``datasets.graphs.graph_edges``) and with the
nearest-wall edges of ``dataset.wall_neighbors``, the graph the model trains on, so that no such edge makes
a halo row and every nearest wall is in one; with walls the parts balance work, not nodes
(``partitioners.strategies.work_weights``); the
strategy's seed is derived from (seed, split, scene, frame), so samples are independent draws and a
sample's parts do not depend on which worker computed it.

Reuse: ``inputs`` records what determines the assignments: the partitioner version, method, P, seed,
the part weights when they are not uniform (``distributed.part_weights``; they also name the artifact, so
partitions for other rank speeds sit beside the uniform one), radius, max_neighbors, ``graph`` (stores with
walls: "no wall-wall edges"; their artifacts built before that rule are stale), ``balance`` (stores with
walls: "work"), ``wall_neighbors`` (when > 0) and ``wall_neighbors_reach`` (when set), the frames of every
split, and the dataset store's identity (a SHA-256 of its root attributes, which hold the generator and its
seed, less the normalisation statistics added to the same data later; and per split of its shape, scene_ptr
and the positions at the first and last frame used). When the stored ``inputs_hash`` matches, the artifact
is reused; otherwise :func:`prepare_partitions` says which inputs changed and rebuilds it. An edit of a
middle frame in place would go unnoticed: hashing every frame would read the whole dataset at every start.
The folder's name holds only method, P, seed and weights, so two runs on one store with other graph settings
rebuild one artifact in turn; a run reading an artifact that was rebuilt under it stops at its next read
(:class:`SplitAssignments` compares the root's inode and mtime) instead of taking another graph's parts.

Artifacts are written into a temporary sibling and renamed into place when complete
(``datasets.store.atomic_store``): a failed build keeps the previous artifact.

Work runs in parallel over samples through dask, a task per run of scenes of one frame (about
``TASK_NODES`` nodes), with a tqdm progress bar. pymetis holds the GIL for the whole METIS call (a Python
thread spinning beside it ran at 2 % of its idle speed; beside cKDTree's pair search at 64 %), so threads
cannot run two METIS calls at once: large jobs use dask's ``processes`` scheduler (spawned workers, one
pool for the whole build); small ones stay in threads, where starting processes costs more than it saves.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import dask
import numpy as np
import zarr
from dask.callbacks import Callback
from tqdm.auto import tqdm

from dist_egnn.datasets.statistics import STATISTICS_ATTR
from dist_egnn.datasets.store import (
    COMPRESSORS,
    DEFAULT_CHUNK_NODES,
    WALL,
    atomic_store,
    missing_chunks,
    preparation_lock,
    unreadable_metadata,
)
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.partitioners.strategies import METHODS, check_weights, partition
from dist_egnn.partitioners.subgraphs import halo_mask, mask_dtype

SCHEMA_VERSION = 2
PARTITIONER_VERSION = 3          # bump when a strategy's output or the arrays change: stored artifacts become stale
                                 # (3: work_imbalance per sample)
TASK_NODES = 250_000             # nodes partitioned by one dask task
PROCESSES_MIN_NODES = 2_000_000  # "auto" starts worker processes only for jobs at least this big
SCHEDULERS = ("auto", "processes", "threads", "sync")
SPLIT_KEYS = ("train", "val", "test")
WALL_SCALAR = "type"             # the node scalar marking walls (datasets.store)
WALL_GRAPH = "no wall-wall edges"  # inputs["graph"] of stores with walls (datasets.graphs.graph_edges)
WALL_BALANCE = "work"              # inputs["balance"] of stores with walls (partitioners.strategies.work_weights)
PER_SAMPLE = ("cut_fraction", "boundary_fraction", "imbalance", "work_imbalance", "num_edges", "part_size",
              "halo_size")
SPLIT_ARRAYS = ("assignment", "halo_mask", "scene_ptr", *PER_SAMPLE)


class StalePartitionError(BadInput):
    """A stored partition that is missing or does not match the inputs it is asked for."""


def artifact_path(store: str | os.PathLike, method: str, num_parts: int, seed: int, weights=None) -> Path:
    """``<data>/<name>.zarr`` -> ``<data>/<name>.partitions/<method>-p<P>-s<seed>.zarr``; with non-uniform part
    ``weights``, ``...-s<seed>-w<8 hex digits of their hash>.zarr``."""
    store = Path(store)
    weights = canonical_weights(weights, num_parts)
    suffix = "" if weights is None else f"-w{_sha(weights)[:8]}"
    return store.with_name(f"{store.stem}.partitions") / f"{method}-p{num_parts}-s{seed}{suffix}.zarr"


def canonical_weights(weights, num_parts: int) -> list[float] | None:
    """Part weights as stored and hashed: P shares rounded to 6 decimals, or None when uniform (or None)."""
    shares = check_weights(weights, num_parts)
    return None if shares is None else [round(float(w), 6) for w in shares]


# ----------------------------------------------------------------------------------------- preparing
def prepare_partitions(splits: Mapping[str, Any], method: str, num_parts: int, seed: int = 0, *,
                       rebuild: bool = True, scheduler: str = "auto", workers: int | None = None,
                       progress: bool = True, weights=None) -> Path:
    """Build the artifact for every sample of ``splits``, or reuse it when its inputs are unchanged.

    Args:
        splits: split name -> ``datasets.loader.TrajectoryDataset`` (store, frames, radius, max_neighbors).
        method, num_parts, seed: as in :func:`partitioners.partition`.
        rebuild: rebuild a missing or stale artifact; False raises :class:`StalePartitionError` instead.
        scheduler: dask scheduler: ``auto``, ``processes``, ``threads`` or ``sync``.
        workers: dask workers; None: every core.
        weights: P shares of every graph's nodes summing to 1 (``partitioners.partition``); None: equal parts.
    Returns:
        The artifact's path.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown partition method {method!r}: choose one of {METHODS}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={scheduler!r}: choose one of {SCHEDULERS}")
    smallest = min(int(np.diff(data.meta.scene_ptr).min()) for data in splits.values())
    if not 1 <= num_parts <= smallest:
        raise ConfigError(f"num_parts={num_parts} (distributed.parts): every scene must give each part a node, and "
                         f"the smallest scene has {smallest} nodes; use 1..{smallest} parts")
    first = next(iter(splits.values()))
    path = artifact_path(first.info.path, method, num_parts, seed, weights)
    inputs = describe_inputs(splits, method, num_parts, seed, weights)
    digest = inputs_hash(inputs)
    stale = _why_stale_or_broken(path, splits, inputs, digest)
    if stale is None:
        print(f"{path}: up to date, reused")
        return path
    if not rebuild:
        raise StalePartitionError(f"{path}: {stale}; build it with `python launch/prepare.py "
                                  f"distributed.parts={num_parts} distributed.partition={method} "
                                  f"distributed.seed={seed}{_weights_override(inputs)}` (plus your dataset overrides)")
    # One builder: a second run that found the same artifact stale (a study's jobs=2) waits, then reuses it.
    with preparation_lock(path):
        stale = _why_stale_or_broken(path, splits, inputs, digest)
        if stale is None:
            print(f"{path}: up to date, built by another process meanwhile; reused")
            return path
        print(f"{path}: {stale}; building it")
        _build(path, splits, inputs, digest, scheduler, workers, progress)
    return path


def _why_stale_or_broken(path: Path, splits: Mapping[str, Any], inputs: dict, digest: str) -> str | None:
    """Why the artifact at ``path`` cannot be used as it is (stale, damaged, unreadable), or None."""
    return _why_stale(path, inputs, digest) or _why_damaged(path, splits) or _why_unreadable(path, splits)


def partition_status(splits: Mapping[str, Any], method: str, num_parts: int,
                     seed: int = 0, weights=None) -> tuple[Path, str, str | None]:
    """(artifact path, inputs hash, None if the stored artifact matches ``splits`` else why not, in words).

    Cheap (reads two frames per split, the artifact's attributes and its chunk listing): every rank of a run
    can ask before deciding together whether to build, without anyone waiting for a build that will never
    come. A matching artifact with chunk files missing (zarr would read them as part 0: partitioning
    silently off) raises :class:`StalePartitionError` naming them and the fix; it is not rebuilt behind the
    user's back, as a damaged dataset store is not.
    """
    first = next(iter(splits.values()))
    path = artifact_path(first.info.path, method, num_parts, seed, weights)
    inputs = describe_inputs(splits, method, num_parts, seed, weights)
    digest = inputs_hash(inputs)
    stale = _why_stale(path, inputs, digest)
    if stale is None:
        damage = _why_damaged(path, splits)
        if damage is not None:
            raise StalePartitionError(f"{path}: {damage}; {rebuild_hint(path, method, num_parts, seed, weights)}")
    return path, digest, stale


def describe_inputs(splits: Mapping[str, Any], method: str, num_parts: int, seed: int,
                    weights=None) -> dict[str, Any]:
    """Everything that determines the stored assignments, as JSON-able data (``weights`` only when not uniform,
    so the inputs, and the hash, of unweighted partitions are what they were before weights existed)."""
    first = next(iter(splits.values()))
    root = zarr.open_group(str(first.info.path), mode="r")
    store_splits = {}
    for name, data in splits.items():
        pos = root[name]["pos"]
        digest = hashlib.sha256(json.dumps(list(pos.shape)).encode())
        digest.update(np.ascontiguousarray(data.meta.scene_ptr, dtype=np.int64).tobytes())
        for frame in sorted({int(data.frames[0]), int(data.frames[-1])}) if len(data.frames) else ():
            digest.update(np.ascontiguousarray(pos[frame]).tobytes())
        store_splits[name] = digest.hexdigest()[:16]
    radius = first.radius
    shares = canonical_weights(weights, num_parts)
    return dict(partitioner_version=PARTITIONER_VERSION, method=method, num_parts=int(num_parts), seed=int(seed),
                **({} if shares is None else {"weights": shares}),
                radius=None if radius is None else float(radius), max_neighbors=first.max_neighbors,
                **({"graph": WALL_GRAPH, "balance": WALL_BALANCE} if _has_walls(splits) else {}),
                **({"wall_neighbors": first.wall_neighbors} if getattr(first, "wall_neighbors", 0) else {}),
                **({"wall_neighbors_reach": first.wall_neighbors_reach}
                   if getattr(first, "wall_neighbors_reach", None) is not None else {}),
                frames={name: [int(f) for f in data.frames] for name, data in splits.items()},
                store_attrs=_sha(_identity_attrs(first.info.attrs))[:16], store_splits=store_splits)


def _identity_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The store's root attributes that identify its data: all but the normalisation statistics, which
    ``launch/prepare.py`` or a training adds later to the same data (``datasets.statistics``)."""
    return {key: value for key, value in attrs.items() if key != STATISTICS_ATTR}


def _has_walls(splits: Mapping[str, Any]) -> bool:
    """Whether any scene of ``splits`` holds a wall: only then is the graph other than before walls existed,
    so wall-free stores (N-body, synthetic, a fluid with ``wall_layers: 0``) keep their artifacts."""
    first = next(iter(splits.values()))
    if WALL_SCALAR not in first.info.node_scalars:
        return False
    return any(int(data.scene_moving().sum()) < int(data.meta.scene_ptr[-1]) for data in splits.values())


def inputs_hash(inputs: Mapping[str, Any]) -> str:
    return _sha(inputs)


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def _why_stale(path: Path, inputs: dict[str, Any], digest: str) -> str | None:
    """None if the artifact at path was built from ``inputs``; else the reason, in words."""
    if not path.exists():
        return "no stored partition yet"
    try:
        attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception as err:  # zarr raises several types for a folder that is not a group
        return f"unreadable ({type(err).__name__}: {err})"
    if attrs.get("inputs_hash") == digest:
        return None
    old = attrs.get("inputs", {})
    changes = []
    for key in inputs:
        before, after = old.get(key), inputs[key]
        if before == after:
            continue
        if isinstance(after, dict) and isinstance(before, dict):
            changes += [f"{key}.{sub}" + _change(before.get(sub), after.get(sub))
                        for sub in after if before.get(sub) != after.get(sub)]
        else:
            changes.append(key + _change(before, after))
    return "stale, built from other inputs (" + (", ".join(changes) or "unknown difference") + ")"


def _why_damaged(path: Path, splits: Any) -> str | None:
    """None if every array of the artifact's ``splits`` has readable metadata and all its chunk files; else what
    is wrong, in words (a garbled ``zarr.json`` is named: zarr would raise a bare JSONDecodeError)."""
    garbled = unreadable_metadata([path / "zarr.json"] + [path / split / sub / "zarr.json" for split in splits
                                                          for sub in ("", *SPLIT_ARRAYS)])
    if garbled:
        return f"metadata file {garbled}: the stored partition is damaged"
    root = zarr.open_group(str(path), mode="r")
    for split in splits:
        if split not in root:
            return f"split {split!r} is missing (damaged)"
        damage = _split_damage(path, root[split])
        if damage is not None:
            return damage
    return None


def _why_unreadable(path: Path, splits: Any) -> str | None:
    """None if every chunk of the artifact's ``splits`` decodes; else the first chunk file that does not.
    Reads the whole artifact, one frame row at a time: only :func:`prepare_partitions` asks, before reusing."""
    root = zarr.open_group(str(path), mode="r")
    for split in splits:
        for name in SPLIT_ARRAYS:
            array = root[split][name]
            rows = range(array.shape[0]) if name in ("assignment", "halo_mask") else [Ellipsis]
            for row in rows:
                try:
                    array[row]
                except Exception as err:  # noqa: BLE001 - blosc, zarr and numpy raise several types
                    file = _bad_chunk_file(Path(split, name), array, (row,))
                    return (f"chunk file {file or Path(split, name)} cannot be read ({type(err).__name__}: {err}): "
                            f"the stored partition is damaged")
    return None


def _split_damage(path: Path, group: zarr.Group) -> str | None:
    """The first array of a split group that is missing or lacks chunk files (``datasets.store.missing_chunks``)."""
    for name in SPLIT_ARRAYS:
        where = f"{group.basename}/{name}"
        if name not in group:
            return f"array {where} is missing: the stored partition is damaged"
        array = group[name]
        missing, expected = missing_chunks(array)
        if missing:
            absent = [f"{where}/{key}" for key in _absent_chunk_keys(path / where, array)]
            return (f"{missing} of {expected} chunk files of {where} are missing ({', '.join(absent[:3])}"
                    f"{', ...' if len(absent) > 3 else ''}; zarr would read them as zeros, every node on part 0): "
                    f"the stored partition is damaged")
    return None


def _absent_chunk_keys(directory: Path, array: zarr.Array) -> list[str]:
    """The chunk keys of a local array whose files do not exist (only asked once some are known to be missing)."""
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, array.chunks)]
    keys = (array.metadata.encode_chunk_key(index) for index in itertools.product(*grid))
    return [key for key in keys if not (directory / key).exists()]


def rebuild_hint(path: Path, method: str, num_parts: int, seed: int, weights=None) -> str:
    """The fix for a damaged artifact, in words: rebuild it with prepare.py, or delete it."""
    dataset = path.parent.name.removesuffix(".partitions")
    shares = canonical_weights(weights, num_parts)
    return (f"rebuild it with `python launch/prepare.py dataset={dataset} distributed.parts={num_parts} "
            f"distributed.partition={method} distributed.seed={seed}"
            f"{_weights_override({'weights': shares} if shares else {})}` (plus your dataset overrides), or delete "
            f"the folder {path} (a run with dataset.auto_prepare=true then builds it again)")


def _artifact_identity(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of the artifact's root ``zarr.json``: a rebuild puts a new folder in place (atomic_store), so
    a reader that opened the old one sees it change before it reads another graph's assignments; one stat per
    sample read."""
    try:
        stat = (path / "zarr.json").stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _weights_override(inputs: Mapping[str, Any]) -> str:
    """`` distributed.part_weights=[...]`` for a command line when the inputs have weights, else ``""``."""
    shares = inputs.get("weights")
    return "" if not shares else " distributed.part_weights=[" + ",".join(f"{w:g}" for w in shares) + "]"


def _change(before: Any, after: Any) -> str:
    text = f" {json.dumps(before)} -> {json.dumps(after)}"
    return text if len(text) <= 60 else " changed"


# ------------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class _Task:
    """Scenes [first_scene, stop_scene) of one split at input-frame row ``row``."""

    split: str
    row: int
    frame: int
    first_scene: int
    stop_scene: int


def _build(path: Path, splits: Mapping[str, Any], inputs: dict[str, Any], digest: str, scheduler: str,
           workers: int | None, progress: bool) -> None:
    first = next(iter(splits.values()))
    store, num_parts = str(first.info.path), inputs["num_parts"]
    tasks = [task for name, data in splits.items() for task in _tasks(name, data)]
    total_nodes = sum(_nodes(splits[t.split], t) for t in tasks)
    if scheduler == "auto":
        scheduler = "processes" if total_nodes >= PROCESSES_MIN_NODES and (os.cpu_count() or 1) > 1 else "threads"
    workers = workers or os.cpu_count() or 1
    with atomic_store(path, overwrite=True, validate=False) as root:      # not a dataset store: checked on load
        root.attrs.update(dict(schema_version=SCHEMA_VERSION, method=inputs["method"], num_parts=num_parts,
                               seed=inputs["seed"], weights=inputs.get("weights"), radius=inputs["radius"],
                               max_neighbors=inputs["max_neighbors"],
                               store=store, inputs=inputs))
        per_sample = {name: _create_split(root, name, data, num_parts) for name, data in splits.items()}
        samples = {t: t.stop_scene - t.first_scene for t in tasks}
        bar = tqdm(total=sum(samples.values()), desc=f"partitions {inputs['method']} P={num_parts}",
                   unit="sample", disable=not progress)
        options = {key: inputs[key] for key in ("method", "num_parts", "seed", "radius", "max_neighbors")}
        options["weights"] = inputs.get("weights")
        options["wall_neighbors"] = inputs.get("wall_neighbors", 0)
        options["wall_reach"] = inputs.get("wall_neighbors_reach")
        scalars = first.info.node_scalars
        options["wall_column"] = scalars.index(WALL_SCALAR) if inputs.get("graph") == WALL_GRAPH else None
        pool = (ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                if scheduler == "processes" else None)
        try:
            wave = 4 * workers                                  # results held in memory at once: one wave
            for start in range(0, len(tasks), wave):
                chunk = tasks[start:start + wave]
                lazy = [dask.delayed(_partition_scenes, pure=False)(store, t, _ptr(splits[t.split], t), options,
                                                                    dask_key_name=f"part-{start + i}")
                        for i, t in enumerate(chunk)]
                keys = {f"part-{start + i}": samples[t] for i, t in enumerate(chunk)}
                with Callback(posttask=lambda key, *_: bar.update(keys.get(key, 0))):
                    results = dask.compute(*lazy, scheduler=scheduler, num_workers=workers,
                                           **({"pool": pool} if pool else {}))
                for task, result in zip(chunk, results):
                    _write(root[task.split], per_sample[task.split], task, _ptr(splits[task.split], task), result)
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown()
        summary = {}
        for name, arrays in per_sample.items():
            for key, values in arrays.items():
                root[name][key][...] = values
            summary[name] = _summarize(arrays)
        root.attrs.update(dict(metrics=summary, inputs_hash=digest))
    for name, numbers in summary.items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers.items()))


def _ptr(data: Any, task: _Task) -> np.ndarray:
    """The task's slice of scene_ptr: its scenes' node ranges, in the split's global node ids."""
    return np.asarray(data.meta.scene_ptr[task.first_scene:task.stop_scene + 1], dtype=np.int64)


def _nodes(data: Any, task: _Task) -> int:
    ptr = _ptr(data, task)
    return int(ptr[-1] - ptr[0])


def _tasks(split: str, data: Any) -> list[_Task]:
    """Runs of consecutive scenes of about TASK_NODES nodes (at least one scene), for every frame."""
    ptr = data.meta.scene_ptr
    runs, first = [], 0
    for scene in range(1, len(ptr)):
        if ptr[scene] - ptr[first] >= TASK_NODES or scene == len(ptr) - 1:
            runs.append((first, scene))
            first = scene
    return [_Task(split, row, int(frame), a, b) for row, frame in enumerate(data.frames) for a, b in runs]


def _create_split(root: zarr.Group, name: str, data: Any, num_parts: int) -> dict[str, np.ndarray]:
    """Create a split's arrays; return the per-sample metric arrays to fill in memory."""
    frames, ptr = len(data.frames), data.meta.scene_ptr
    scenes, total = len(ptr) - 1, int(ptr[-1])
    group = root.create_group(name)
    group.attrs.update(dict(frames=[int(f) for f in data.frames], num_scenes=scenes))
    group.create_array("assignment", shape=(frames, total), chunks=(1, max(1, min(DEFAULT_CHUNK_NODES, total))),
                       dtype="int32", compressors=COMPRESSORS)
    group.create_array("halo_mask", shape=(frames, total), chunks=(1, max(1, min(DEFAULT_CHUNK_NODES, total))),
                       dtype=mask_dtype(num_parts), compressors=COMPRESSORS)
    group.create_array("scene_ptr", data=np.asarray(ptr, dtype=np.int64))
    arrays = dict(cut_fraction=np.zeros((frames, scenes), np.float32),
                  boundary_fraction=np.zeros((frames, scenes), np.float32),
                  imbalance=np.zeros((frames, scenes), np.float32),
                  work_imbalance=np.zeros((frames, scenes), np.float32),
                  num_edges=np.zeros((frames, scenes), np.int64),
                  part_size=np.zeros((frames, scenes, num_parts), np.int32),
                  halo_size=np.zeros((frames, scenes, num_parts), np.int32))
    for key, values in arrays.items():
        group.create_array(key, shape=values.shape, dtype=values.dtype)
    return arrays


def _partition_scenes(store: str, task: _Task, ptr: np.ndarray, options: dict[str, Any]) -> dict[str, np.ndarray]:
    """One dask task: read the positions of a run of scenes at one frame and partition each scene."""
    group = zarr.open_group(store, mode="r")[task.split]
    pos = group["pos"][task.frame, ptr[0]:ptr[-1]]
    column = options.get("wall_column")
    walls = None if column is None else group["node_scalars"][ptr[0]:ptr[-1], column] == WALL
    assignment = np.empty(ptr[-1] - ptr[0], dtype=np.int32)
    mask = np.zeros(ptr[-1] - ptr[0], dtype=mask_dtype(options["num_parts"]))
    metrics = []
    for k, scene in enumerate(range(task.first_scene, task.stop_scene)):
        lo, hi = ptr[k] - ptr[0], ptr[k + 1] - ptr[0]
        seed = sample_seed(options["seed"], task.split, scene, task.frame)
        try:
            part = partition(pos[lo:hi], options["num_parts"], options["method"], radius=options["radius"],
                             seed=seed, max_neighbors=options["max_neighbors"], weights=options.get("weights"),
                             walls=None if walls is None else walls[lo:hi],
                             wall_neighbors=options.get("wall_neighbors", 0), wall_reach=options.get("wall_reach"))
        except ValueError as err:
            raise BadInput(f"{store}/{task.split}: scene {scene} at frame {task.frame}: {err}") from err
        assignment[lo:hi] = part.assignment
        mask[lo:hi] = halo_mask(part.edge_index, part.assignment, options["num_parts"])
        metrics.append(part.metrics)
    return dict(assignment=assignment, halo_mask=mask,
                cut_fraction=np.array([m.cut_fraction for m in metrics]),
                boundary_fraction=np.array([m.boundary_fraction for m in metrics]),
                imbalance=np.array([m.imbalance for m in metrics]),
                work_imbalance=np.array([m.work_imbalance for m in metrics]),
                num_edges=np.array([m.num_edges for m in metrics]),
                part_size=np.stack([m.part_sizes for m in metrics]),
                halo_size=np.stack([m.halo_sizes for m in metrics]))


def sample_seed(seed: int, split: str, scene: int, frame: int) -> int:
    """The strategy's seed for one sample: independent across samples, fixed by (seed, split, scene, frame)."""
    entropy = [int(seed), SPLIT_KEYS.index(split) if split in SPLIT_KEYS else 3, int(scene), int(frame)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)


def _write(group: zarr.Group, per_sample: dict[str, np.ndarray], task: _Task, ptr: np.ndarray,
           result: dict[str, np.ndarray]) -> None:
    group["assignment"][task.row, ptr[0]:ptr[-1]] = result["assignment"]
    group["halo_mask"][task.row, ptr[0]:ptr[-1]] = result["halo_mask"]
    for key in PER_SAMPLE:
        per_sample[key][task.row, task.first_scene:task.stop_scene] = result[key]


def _summarize(arrays: dict[str, np.ndarray]) -> dict[str, float]:
    if arrays["cut_fraction"].size == 0:
        return {}
    halo_fraction = arrays["halo_size"] / np.maximum(arrays["part_size"], 1)
    return dict(cut_fraction_mean=float(arrays["cut_fraction"].mean()),
                cut_fraction_max=float(arrays["cut_fraction"].max()),
                boundary_fraction_mean=float(arrays["boundary_fraction"].mean()),
                imbalance_max=float(arrays["imbalance"].max()),
                work_imbalance_max=float(arrays["work_imbalance"].max()),
                max_halo_fraction_max=float(halo_fraction.max()))


# -------------------------------------------------------------------------------------------- reading
class SplitAssignments:
    """The stored assignments of one split, read lazily: one sample's row slice at a time.

    ``assignments.of(scene, frame)`` or ``assignments[i]`` (sample index, TrajectoryDataset order) is the
    (n_scene,) int64 part of every node of that sample, global ids within the scene.
    """

    def __init__(self, path: Path, split: str, identity: tuple[int, int] | None = None):
        """``identity``: the artifact's (:func:`_artifact_identity`) when its inputs were checked; default now."""
        identity = _artifact_identity(path) if identity is None else identity
        root = zarr.open_group(str(path), mode="r")
        if split not in root:
            raise StalePartitionError(f"{path}: split {split!r} is missing; prepare the partitions again")
        group = root[split]
        self.path, self.split = path, split
        self.num_parts, self.method, self.seed = int(root.attrs["num_parts"]), root.attrs["method"], root.attrs["seed"]
        self.weights = root.attrs.get("weights")             # None: equal parts
        damage = _split_damage(path, group)
        if damage is not None:
            raise StalePartitionError(f"{path}: {damage}; {self.hint()}")
        self.frames = np.asarray(group.attrs["frames"], dtype=np.int64)
        self._group = group
        self._identity = identity
        self.scene_ptr = np.asarray(self._read("scene_ptr", slice(None)))
        self._row = {int(f): k for k, f in enumerate(self.frames)}

    def hint(self) -> str:
        return rebuild_hint(self.path, self.method, self.num_parts, self.seed, self.weights)

    def _read(self, name: str, *where: Any) -> np.ndarray:
        """``group[name][where]``; a chunk that cannot be decoded (truncated, overwritten) raises
        :class:`StalePartitionError` naming its file instead of the codec's bare error."""
        if _artifact_identity(self.path) != self._identity:
            raise StalePartitionError(
                f"{self.path} was replaced while this run read it: another run or launch/prepare.py rebuilt it, "
                f"e.g. for another dataset.radius, max_neighbors or frames (the folder's name holds only the method, "
                f"P, seed and part weights), so its assignments belong to another graph now. Give runs with other "
                f"graph settings data folders of their own (paths.data=...), then start this one again (resume=auto)")
        array = self._group[name]
        try:
            return array[where if len(where) != 1 else where[0]]
        except Exception as err:  # blosc, zarr and numpy raise several types for a damaged chunk
            file = _bad_chunk_file(self.path / self.split / name, array, where) or self.path / self.split / name
            raise StalePartitionError(f"{file} cannot be read ({type(err).__name__}: {err}): the stored partition "
                                      f"is damaged; {self.hint()}") from err

    def __len__(self) -> int:
        return (len(self.scene_ptr) - 1) * len(self.frames)

    def locate(self, index: int) -> tuple[int, int]:
        """Sample index -> (scene, input frame), as ``TrajectoryDataset.locate``."""
        scene, k = divmod(int(index), len(self.frames))
        return scene, int(self.frames[k])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.of(*self.locate(index))

    def of(self, scene: int, frame: int) -> np.ndarray:
        """(n_scene,) int64: the part of every node of the scene at input frame ``frame``."""
        parts = np.asarray(self._read("assignment", *self._where(scene, frame)), dtype=np.int64)
        if parts.size and (parts.min() < 0 or parts.max() >= self.num_parts):
            raise StalePartitionError(f"{self.path}/{self.split}/assignment: scene {scene} at frame {frame} holds "
                                      f"part {int(parts.min() if parts.min() < 0 else parts.max())}, outside "
                                      f"0..{self.num_parts - 1}: the stored partition is damaged; {self.hint()}")
        return parts

    def halo_mask_of(self, scene: int, frame: int) -> np.ndarray:
        """(n_scene,) unsigned: bit p set for the nodes in part p's halo (``partitioners.subgraphs.halo_mask``)."""
        return np.asarray(self._read("halo_mask", *self._where(scene, frame)))

    def num_edges_of(self, scene: int, frame: int) -> int:
        """Edges of the whole graph that was partitioned (before edge dropping)."""
        row, _ = self._where(scene, frame)
        return int(self._read("num_edges", row, scene))

    def _where(self, scene: int, frame: int) -> tuple[int, slice]:
        if frame not in self._row or not 0 <= scene < len(self.scene_ptr) - 1:
            raise StalePartitionError(f"{self.path}/{self.split}: no stored sample (scene {scene}, frame {frame}); "
                                      f"it holds scenes 0..{len(self.scene_ptr) - 2} at frames "
                                      f"{self.frames[:5].tolist()}{'...' if len(self.frames) > 5 else ''}; "
                                      f"prepare the partitions again for this dataset configuration")
        return self._row[frame], slice(int(self.scene_ptr[scene]), int(self.scene_ptr[scene + 1]))

    def metrics(self) -> dict[str, np.ndarray]:
        """Per-sample quality: (F, S) fractions and edge counts, (F, S, P) part and halo sizes."""
        return {key: self._read(key, Ellipsis) for key in PER_SAMPLE}


def _bad_chunk_file(where: Path, array: zarr.Array, selection: tuple) -> Path | None:
    """The first chunk file under the (basic) ``selection`` that cannot be decoded on its own, if any."""
    selection = tuple(selection) + (slice(None),) * (array.ndim - len(selection))
    if Ellipsis in selection:
        selection = (slice(None),) * array.ndim
    ranges = []
    for key, size, chunk in zip(selection, array.shape, array.chunks):
        if isinstance(key, slice):
            start, stop, _ = key.indices(size)
            ranges.append(range(start // chunk, max(start, stop - 1) // chunk + 1) if stop > start else range(0))
        else:
            ranges.append(range(int(key) % max(size, 1) // chunk, int(key) % max(size, 1) // chunk + 1))
    for index in itertools.product(*ranges):
        try:
            array[tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, array.chunks, array.shape))]
        except Exception:  # noqa: BLE001 - this is the chunk that fails
            return where / array.metadata.encode_chunk_key(index)
    return None


def load_assignments(path: str | os.PathLike, split: str, *, expected_hash: str | None = None) -> SplitAssignments:
    """Open a stored artifact's split for reading; with ``expected_hash`` refuse one built from other inputs.

    Every array of the split must have all its chunk files (``datasets.store.missing_chunks``): zarr would
    read a missing one as zeros, every node on part 0, and partitioning would be silently off. A chunk that
    is present but cannot be decoded is named when a sample reading it is asked for."""
    path = Path(path)
    if not path.exists():
        raise StalePartitionError(f"no stored partition at {path}: build it with `python launch/prepare.py "
                                  f"distributed.parts=P distributed.partition=METHOD` (plus your dataset overrides)")
    identity = _artifact_identity(path)       # before the hash is read: a rebuild after it is seen at the first read
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    if attrs.get("schema_version") != SCHEMA_VERSION or "inputs_hash" not in attrs:
        raise StalePartitionError(f"{path}: not a partition artifact this dist-egnn can read (schema_version "
                                  f"{attrs.get('schema_version')}, this version reads {SCHEMA_VERSION}); prepare "
                                  f"the partitions again (`python launch/prepare.py distributed.parts=P ...`)")
    if expected_hash is not None and attrs["inputs_hash"] != expected_hash:
        raise StalePartitionError(f"{path} was built from other inputs (hash {attrs['inputs_hash'][:12]}, "
                                  f"expected {expected_hash[:12]}); prepare the partitions again")
    return SplitAssignments(path, split, identity)
