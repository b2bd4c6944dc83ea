"""Converter for the GNS / LagrangeBench HDF5 particle datasets (e.g. DeepMind's Water-3D as converted by
LagrangeBench) into a store.

Supported layout (LagrangeBench's, also what its ``tfrecord_to_h5`` script makes from the DeepMind GNS files)::

    <folder>/
        metadata.json      needs "dt"; uses "write_every" (LagrangeBench: solver steps per stored frame, so
                           frames are dt · write_every apart; absent in GNS files: 1),
                           "default_connectivity_radius" (the store's radius unless dataset.radius is
                           given), "periodic_boundary_conditions" (any true: refused, see below) and "dim";
                           everything else is kept as is
        train.h5           one group per trajectory ("00000", "00001", ...), each holding
        valid.h5               position       (T, N, D) float   particle positions, D = 2 or 3
        test.h5                particle_type  (N,) int          particle type (e.g. GNS: 5 water, 3 boundary)

``valid.h5`` becomes the ``val`` split. Trajectories of one split may differ in particle count; they share
the frame count in the store, so longer ones are cut to the shortest (recorded in the generator
attributes). 2-D datasets get z = 0 (the models are 3-D; a planar system stays planar under their updates).

Velocities: positions only are stored in these files; velocities are backward differences
v(t) = (x(t) − x(t − 1)) / Δt over stored frames, Δt = dt · write_every (the GNS convention), so frame 0,
which has no predecessor, is dropped. Units are the file's (LagrangeBench and GNS normalise lengths to their
domain; Water-3D's radius 0.035 is in those units).

Particle types. Node scalar ``type`` follows the store convention (0 fluid/moving, 1 wall: static, never
moved or scored; ``datasets.store``); ``source_type`` keeps the file's own id (e.g. to tell materials
apart as a node feature). Which file ids are walls (``dataset.gns.wall_types``, default by convention):

    convention      recognised by                          wall ids   other ids (-> type 0)
    LagrangeBench   metadata has "write_every"             1, 2       0 fluid, 3 rigid body
                                                                      (lagrangebench/utils.py NodeType:
                                                                      SOLID_WALL 1, MOVING_WALL 2)
    GNS (DeepMind)  otherwise (tfrecord_to_h5 keeps the    3          e.g. 5 water, 6 sand, 7 goop
                    GNS ids; it adds only                             (KINEMATIC_PARTICLE_ID = 3)
                    "num_particles_max" and
                    "periodic_boundary_conditions")

A particle mapped to a wall must keep its position (to 1e-3 of the radius) in every frame: a moving one
(a GNS kinematic obstacle, a lid that moves) stops the conversion with the fix (``wall_types`` without its
id). Walls are stored exactly constant, velocity 0.

Periodic sets (LagrangeBench TGV, RPF: ``periodic_boundary_conditions`` true) are refused: the models use
x_i − x_j and radius graphs without the minimum-image convention, and differences across the seam would
give velocities of a box length. A radius under which the first training frame averages less than one
edge per node is warned about (usually a radius in the wrong units).

Files are read one trajectory and ``frames_per_write`` frames at a time, so memory does not grow with the
dataset. Anything else (another group or dataset naming, a missing metadata.json) stops with an error that
names the file and the layout expected above.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_egnn.datasets.graphs import mean_degree
from dist_egnn.datasets.store import FLUID, WALL, StoreError, atomic_store, create_split, write_root_attrs
from dist_egnn.errors import ConfigError

SPLIT_FILES = {"train": "train.h5", "val": "valid.h5", "test": "test.h5"}
NODE_SCALARS = ["type", "source_type"]
WALL_TYPES = {"lagrangebench": [1, 2], "gns": [3]}   # file ids of static boundary particles, per convention
WALL_TOLERANCE = 1e-3          # a wall may move at most this fraction of the radius over a trajectory
EXPECTED = ("a folder with metadata.json and train.h5, valid.h5, test.h5, each holding one group per trajectory "
            "with datasets 'position' (T, N, 2 or 3) and 'particle_type' (N,) (the LagrangeBench HDF5 layout)")


@dataclass
class GNSConfig:
    """Where the files are; ``path`` is required (``dataset.gns.path=/data/Water-3D``).

    Also the ``dataset.gns`` section of the Hydra schema (dist_egnn/config.py): the one definition of these keys.
    """

    path: str | None = None            # folder with metadata.json, train.h5, valid.h5, test.h5
    frames_per_write: int = 64         # frames read and written at a time (memory vs. write count)
    wall_types: list[int] | None = None  # file particle types that are static walls; None: by convention


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
    every = meta.get("write_every", 1)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every <= 0 or every != int(every):
        raise StoreError(f"{meta_path}: 'write_every' must be a positive whole number (solver steps per stored "
                         f"frame), got {every!r}")
    periodic = meta.get("periodic_boundary_conditions") or []
    if any(periodic if isinstance(periodic, (list, tuple)) else [periodic]):
        raise StoreError(f"{meta_path}: periodic_boundary_conditions={periodic}: periodic sets are not supported "
                         f"(the models use x_i - x_j and radius graphs without the minimum-image convention, and "
                         f"velocities by differences would jump across the seam); convert a set with walls "
                         f"instead (e.g. LagrangeBench dam break or lid-driven cavity)")
    return meta


def wall_types(meta: dict[str, Any], cfg: GNSConfig) -> tuple[list[int], str]:
    """The file particle types that are static walls, and where that choice came from (see the docstring)."""
    if cfg.wall_types is not None:
        return [int(t) for t in cfg.wall_types], "dataset.gns.wall_types"
    # Not periodic_boundary_conditions: LagrangeBench's tfrecord_to_h5 adds it to DeepMind's GNS metadata too.
    if "write_every" in meta:
        return WALL_TYPES["lagrangebench"], "the LagrangeBench convention (metadata has write_every)"
    return WALL_TYPES["gns"], "the GNS convention (KINEMATIC_PARTICLE_ID 3)"


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
        if not isinstance(radius, (int, float)) or radius <= 0:
            raise StoreError(f"{folder / 'metadata.json'}: no positive 'default_connectivity_radius' "
                             f"(got {radius!r}); give the radius-graph cutoff with dataset.radius=R")
    dt = float(meta["dt"]) * int(meta.get("write_every", 1))     # time between stored frames
    walls, wall_source = wall_types(meta, cfg)
    _warn_sparse(splits["train"][0], radius, dataset)
    bar = tqdm(total=sum(frames[s] * len(t) for s, t in splits.items()), desc=f"converting {dataset}",
               unit="frame", disable=not progress)
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="gns", dt=dt,
                         units={"length": "as in the source files", "time": "as in the source files"},
                         radius=radius, node_scalars=NODE_SCALARS,
                         generator=dict(asdict(cfg), path=str(folder.resolve()), metadata=meta, notes=notes,
                                        dim=dims.pop(), converter="datasets.gns", wall_types=walls,
                                        wall_types_from=wall_source,
                                        frame_dt="metadata dt x write_every",
                                        velocities="backward differences (x(t) - x(t-1)) / frame dt"))
        for split, trajs in splits.items():
            group = create_split(root, split, [t.nodes for t in trajs], frames[split], num_scalars=len(NODE_SCALARS))
            group.attrs["trajectories"] = [f"{t.file.name}/{t.key}" for t in trajs]
            ptr = group["scene_ptr"][:]
            with h5py.File(trajs[0].file, "r") as handle:
                for s, t in enumerate(trajs):
                    nodes = slice(int(ptr[s]), int(ptr[s + 1]))
                    source = handle[t.key]
                    ptype = np.asarray(source["particle_type"][:])
                    wall = np.isin(ptype, walls)
                    group["node_scalars"][nodes] = np.stack([np.where(wall, WALL, FLUID), ptype], axis=1)
                    _copy(source["position"], group, nodes, frames[split], dt, cfg.frames_per_write,
                          f"{t.file}/{t.key}", bar, wall, WALL_TOLERANCE * radius, ptype)
    bar.close()
    return Path(path)


def _warn_sparse(traj: _Trajectory, radius: float, dataset: str) -> None:
    """Warn when the radius leaves the first stored frame of a training trajectory under one edge per node."""
    import h5py

    with h5py.File(traj.file, "r") as handle:
        pos = np.asarray(handle[traj.key]["position"][1], dtype=np.float64)
    degree = mean_degree(pos, radius)
    if degree < 1.0:
        warnings.warn(f"{dataset}: radius {radius:g} gives {degree:.2f} edges per node on {traj.file.name}/{traj.key} "
                      f"(under one: most particles would see no neighbour); check dataset.radius against "
                      f"metadata.json's default_connectivity_radius and the files' length units", stacklevel=3)


def _copy(position, group, nodes: slice, frames: int, dt: float, per_write: int, where: str, bar,
          wall: np.ndarray, tolerance: float, ptype: np.ndarray) -> None:
    """Stored frame k = file frame k + 1, with velocity (x(k + 1) − x(k)) / dt; blocks of ``per_write``.
    Walls are checked to stay within ``tolerance`` of their first stored position and stored exactly there."""
    anchor = None
    for first in range(0, frames, per_write):
        last = min(first + per_write, frames)
        block = np.asarray(position[first:last + 1], dtype=np.float64)      # file frames first .. last
        if not np.all(np.isfinite(block)):
            bad = first + int(np.flatnonzero(~np.isfinite(block).all(axis=(1, 2)))[0])
            raise StoreError(f"{where}/position: NaN or Inf at frame {bad}; the source file is damaged")
        if block.shape[2] == 2:
            block = np.concatenate([block, np.zeros(block.shape[:2] + (1,))], axis=2)
        if wall.any():
            if anchor is None:
                anchor = block[1, wall].copy()                              # stored frame 0
            moved = np.abs(block[:, wall] - anchor).max(axis=(0, 2))
            if moved.max() > tolerance:
                bad = np.unique(ptype[wall][moved > tolerance]).tolist()
                raise StoreError(f"{where}: wall particles of type {bad} move by up to {moved.max():.3g} (more than "
                                 f"{tolerance:.3g}); walls must be static: set dataset.gns.wall_types to the static "
                                 f"types only (without {bad}) so that these particles are predicted instead")
            block[:, wall] = anchor
        group["pos"][first:last, nodes] = block[1:].astype(np.float32)
        group["vel"][first:last, nodes] = ((block[1:] - block[:-1]) / dt).astype(np.float32)
        bar.update(last - first)
