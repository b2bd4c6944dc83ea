"""Converter for the GNS / LagrangeBench HDF5 particle datasets (e.g. DeepMind's Water-3D as converted by
LagrangeBench) into a store.

Supported layout (LagrangeBench's, also what its ``tfrecord_to_h5`` script makes from the DeepMind GNS files)::

    <folder>/
        metadata.json      needs "dt" (time between stored frames); uses "default_connectivity_radius"
                           (the store's radius) and "dim" when present; everything else is kept as is
        train.h5           one group per trajectory ("00000", "00001", ...), each holding
        valid.h5               position       (T, N, D) float   particle positions, D = 2 or 3
        test.h5                particle_type  (N,) int          particle type (e.g. GNS: 5 water, 3 boundary)

``valid.h5`` becomes the ``val`` split. Trajectories of one split may differ in particle count; they share
the frame count in the store, so longer ones are cut to the shortest (recorded in the generator
attributes). 2-D datasets get z = 0 (the models are 3-D; a planar system stays planar under their updates).

Velocities: positions only are stored in these files; velocities are backward differences
v(t) = (x(t) − x(t − 1)) / dt (the GNS convention), so frame 0, which has no predecessor, is dropped.
Node scalar ``type``: the file's particle_type as a number. Units are the file's (LagrangeBench and GNS
normalise lengths to their domain; Water-3D's radius 0.035 is in those units).

Files are read one trajectory and ``frames_per_write`` frames at a time, so memory does not grow with the
dataset. Anything else (another group or dataset naming, a missing metadata.json) stops with an error that
names the file and the layout expected above.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_egnn.datasets.store import StoreError, atomic_store, create_split, write_root_attrs
from dist_egnn.errors import ConfigError

SPLIT_FILES = {"train": "train.h5", "val": "valid.h5", "test": "test.h5"}
NODE_SCALARS = ["type"]
EXPECTED = ("a folder with metadata.json and train.h5, valid.h5, test.h5, each holding one group per trajectory "
            "with datasets 'position' (T, N, 2 or 3) and 'particle_type' (N,) (the LagrangeBench HDF5 layout)")


@dataclass
class GNSConfig:
    """Where the files are; ``path`` is required (``dataset.gns.path=/data/Water-3D``).

    Also the ``dataset.gns`` section of the Hydra schema (dist_egnn/config.py): the one definition of these keys.
    """

    path: str | None = None            # folder with metadata.json, train.h5, valid.h5, test.h5
    frames_per_write: int = 64         # frames read and written at a time (memory vs. write count)


@dataclass
class _Trajectory:
    file: Path
    key: str
    frames: int          # stored frames (file frames - 1)
    nodes: int
    dim: int


def _metadata(folder: Path) -> dict[str, Any]:
    meta_path = folder / "metadata.json"
    if not meta_path.exists():
        raise StoreError(f"{meta_path} is missing; expected {EXPECTED}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise StoreError(f"{meta_path} is not valid JSON ({err})") from err
    dt = meta.get("dt")
    if not isinstance(dt, (int, float)) or dt <= 0:
        raise StoreError(f"{meta_path}: 'dt' must be a positive number (time between stored frames), got {dt!r}")
    return meta


def _scan(file: Path) -> list[_Trajectory]:
    """Check the layout of one split file and list its trajectories."""
    import h5py

    if not file.exists():
        raise StoreError(f"{file} is missing; expected {EXPECTED}")
    try:
        handle = h5py.File(file, "r")
    except OSError as err:
        raise StoreError(f"{file} is not a readable HDF5 file ({err}); expected {EXPECTED}") from err
    out = []
    with handle:
        keys = sorted(handle.keys())
        if not keys:
            raise StoreError(f"{file} holds no trajectory group; expected {EXPECTED}")
        for key in keys:
            group = handle[key]
            if not isinstance(group, h5py.Group) or "position" not in group or "particle_type" not in group:
                found = list(group.keys()) if isinstance(group, h5py.Group) else "a dataset"
                raise StoreError(f"{file}/{key}: expected a group with datasets 'position' and 'particle_type', "
                                 f"found {found}; expected {EXPECTED}")
            pos, ptype = group["position"], group["particle_type"]
            if pos.ndim != 3 or pos.shape[2] not in (2, 3):
                raise StoreError(f"{file}/{key}/position: shape {pos.shape}, expected (T, N, 2 or 3)")
            if ptype.shape != (pos.shape[1],):
                raise StoreError(f"{file}/{key}/particle_type: shape {ptype.shape} disagrees with position "
                                 f"{pos.shape} (expected ({pos.shape[1]},), one type per particle)")
            if pos.shape[0] < 3:
                raise StoreError(f"{file}/{key}/position: {pos.shape[0]} frames; need at least 3 "
                                 f"(one is used up by the velocity differences)")
            out.append(_Trajectory(file, key, pos.shape[0] - 1, pos.shape[1], pos.shape[2]))
    return out


def convert_gns(path: str | Path, cfg: GNSConfig, dataset: str = "water3d", overwrite: bool = False,
                progress: bool = True, radius: float | None = None) -> Path:
    """Convert the folder ``cfg.path`` into a store at ``path`` (atomically); see the module docstring.

    ``radius`` None takes metadata.json's ``default_connectivity_radius``.
    """
    import h5py
    from tqdm.auto import tqdm

    if not cfg.path:
        raise ConfigError(f"dataset.gns.path is not set: give the folder holding metadata.json and train/valid/"
                         f"test.h5, e.g. python launch/prepare.py dataset={dataset} dataset.gns.path=/data/Water-3D")
    folder = Path(cfg.path)
    if not folder.is_dir():
        raise StoreError(f"{folder} is not a folder; expected {EXPECTED}")
    meta = _metadata(folder)
    splits = {split: _scan(folder / name) for split, name in SPLIT_FILES.items()}
    dims = {t.dim for trajs in splits.values() for t in trajs}
    if len(dims) > 1:
        raise StoreError(f"{folder}: trajectories mix 2-D and 3-D positions")
    notes = []
    frames = {}
    for split, trajs in splits.items():
        frames[split] = min(t.frames for t in trajs)
        notes += [f"{split}: {t.file.name}/{t.key} cut from {t.frames} to {frames[split]} frames"
                  for t in trajs if t.frames > frames[split]]
    if radius is None:
        radius = meta.get("default_connectivity_radius")
    dt = float(meta["dt"])
    bar = tqdm(total=sum(frames[s] * len(t) for s, t in splits.items()), desc=f"converting {dataset}",
               unit="frame", disable=not progress)
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="gns", dt=dt,
                         units={"length": "as in the source files", "time": "as in the source files"},
                         radius=radius, node_scalars=NODE_SCALARS,
                         generator=dict(asdict(cfg), path=str(folder.resolve()), metadata=meta, notes=notes,
                                        dim=dims.pop(), converter="datasets.gns",
                                        velocities="backward differences (x(t) - x(t-1)) / dt"))
        for split, trajs in splits.items():
            group = create_split(root, split, [t.nodes for t in trajs], frames[split], num_scalars=1)
            group.attrs["trajectories"] = [f"{t.file.name}/{t.key}" for t in trajs]
            ptr = group["scene_ptr"][:]
            with h5py.File(trajs[0].file, "r") as handle:
                for s, t in enumerate(trajs):
                    nodes = slice(int(ptr[s]), int(ptr[s + 1]))
                    source = handle[t.key]
                    group["node_scalars"][nodes] = np.asarray(source["particle_type"][:], np.float32)[:, None]
                    _copy(source["position"], group, nodes, frames[split], dt, cfg.frames_per_write,
                          f"{t.file}/{t.key}", bar)
    bar.close()
    return Path(path)


def _copy(position, group, nodes: slice, frames: int, dt: float, per_write: int, where: str, bar) -> None:
    """Stored frame k = file frame k + 1, with velocity (x(k + 1) − x(k)) / dt; blocks of ``per_write``."""
    for first in range(0, frames, per_write):
        last = min(first + per_write, frames)
        block = np.asarray(position[first:last + 1], dtype=np.float64)      # file frames first .. last
        if not np.all(np.isfinite(block)):
            bad = first + int(np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))[0])
            raise StoreError(f"{where}/position: NaN or Inf at frame {bad}; the source file is damaged")
        if block.shape[2] == 2:
            block = np.concatenate([block, np.zeros(block.shape[:2] + (1,))], axis=2)
        group["pos"][first:last, nodes] = block[1:].astype(np.float32)
        group["vel"][first:last, nodes] = ((block[1:] - block[:-1]) / dt).astype(np.float32)
        bar.update(last - first)
