"""Per-dataset statistics for ``trainer.normalization=rms`` (docs/maths.md §1, "Normalisation").

Over the training split only, the input frames a run reads (``dataset.delta_t``, ``frame_start``,
``frame_stop``, ``frame_stride``; with ``dataset.input_velocity=displacement`` those from frame Δt on), the moving
nodes only (walls, node scalar ``type`` = 1, are left out as
they are of the loss):

    displacement_rms        sqrt(mean over samples, nodes and the 3 axes of (x(t + Δt) − x(t))²)
    displacement_mean_norm  mean over samples and nodes of ‖x(t + Δt) − x(t)‖ (reported, not used)
    velocity_rms            sqrt(mean over samples, nodes and the 3 axes of v(t)²), in the store's unit, of the
                            velocity the model gets: stored, or (x(t) − x(t − Δt)) / (Δt · dt) for displacement

Each is one scalar pooled over the axes, so scaling a vector by it commutes with every rotation. The velocity
RMS is in the store's unit: the trainer multiplies it by the ``dataset.velocity_unit`` factor it applies to the
velocities themselves (``datasets.loader.velocity_scale``), so one record serves both units.

They are stored in the store's root attribute ``statistics``, one record per frame selection
(:func:`statistics_key`), by ``launch/prepare.py`` and, for a store made before them or a run with another
frame selection, at the first training that asks (rank 0; dist_egnn.training.setup). Adding the attribute
changes neither the store's identity (``datasets.prepare.store_record``) nor its data. The split is read
through dask chunk by chunk, so memory stays bounded by a few chunks whatever the store's size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import zarr

from dist_egnn.datasets.store import WALL, StoreError, StoreInfo

STATISTICS_ATTR = "statistics"
SPLIT = "train"


def statistics_key(delta_t: int, frame_start: int = 0, frame_stop: int | None = None, frame_stride: int = 1,
                   input_velocity: str = "stored") -> str:
    """The name of one frame selection's record in the ``statistics`` attribute, e.g.
    ``delta_t=10,frames=30:31:1`` (``None``: every frame with a target); with ``dataset.input_velocity=
    displacement`` ``...,velocity=displacement`` (other input frames, and another velocity)."""
    key = f"delta_t={int(delta_t)},frames={int(frame_start)}:{frame_stop}:{int(frame_stride)}"
    return key if input_velocity == "stored" else f"{key},velocity={input_velocity}"


def input_frames(num_frames: int, delta_t: int, frame_start: int = 0, frame_stop: int | None = None,
                 frame_stride: int = 1, input_velocity: str = "stored") -> np.ndarray:
    """The input frames of a split of ``num_frames`` frames, as ``TrajectoryDataset`` selects them (a
    displacement velocity needs the frame ``delta_t`` before)."""
    last_input = num_frames - 1 - delta_t
    stop = last_input + 1 if frame_stop is None else min(frame_stop, last_input + 1)
    frames = np.arange(frame_start, max(stop, frame_start), frame_stride)
    return frames if input_velocity == "stored" else frames[frames >= delta_t]


def compute_statistics(info: StoreInfo, delta_t: int, frame_start: int = 0, frame_stop: int | None = None,
                       frame_stride: int = 1, input_velocity: str = "stored") -> dict[str, Any]:
    """The record of one frame selection (see the module docstring), read chunk by chunk through dask.

    Also holds what it was computed over: ``split``, ``delta_t``, the frames, ``samples`` (scenes × input frames)
    and ``moving_nodes`` (per input frame, over every scene). Raises StoreError when the selection holds no
    input frame.
    """
    meta = info.splits[SPLIT]
    frames = input_frames(meta.num_frames, delta_t, frame_start, frame_stop, frame_stride, input_velocity)
    if len(frames) == 0:
        displacement = "" if input_velocity == "stored" else \
            f" and a frame {delta_t} before (input_velocity=displacement)"
        raise StoreError(f"{info.path}/{SPLIT}: no input frame with a target {delta_t} frames later{displacement} in "
                         f"frames {frame_start}:{frame_stop}:{frame_stride} ({meta.num_frames} frames stored); lower "
                         f"dataset.frame_start or dataset.delta_t")
    group = zarr.open_group(str(info.path), mode="r")[SPLIT]
    pos, vel = da.from_zarr(group["pos"]), da.from_zarr(group["vel"])
    moving = np.ones(meta.num_nodes, dtype=bool)
    if "type" in info.node_scalars:
        moving = np.asarray(group["node_scalars"][:, info.node_scalars.index("type")]) != WALL
    weight = moving.astype(np.float64)                                                  # (N,)
    displacement = pos[frames + delta_t].astype(np.float64) - pos[frames].astype(np.float64)   # (F, N, 3) lazy
    squared = da.square(displacement).sum(axis=2)                                       # (F, N)
    if input_velocity == "stored":
        velocity = da.square(vel[frames].astype(np.float64)).sum(axis=2)
    else:                  # the loader's input: the displacement over the last Δt frames per unit time (store units)
        moved = pos[frames].astype(np.float64) - pos[frames - delta_t].astype(np.float64)
        velocity = da.square(moved / (float(delta_t) * float(info.attrs["dt"]))).sum(axis=2)
    try:
        sums = dask.compute((squared * weight).sum(), (da.sqrt(squared) * weight).sum(),
                            (velocity * weight).sum(), scheduler="threads")
    except Exception as err:  # a truncated or corrupt chunk: numcodecs/zarr raise several types
        raise StoreError(f"{info.path}/{SPLIT}: reading positions and velocities for the normalisation statistics "
                         f"failed ({type(err).__name__}: {err}); the store is damaged: prepare it again with "
                         f"prepare.overwrite=true") from err
    squared_sum, norm_sum, velocity_sum = (float(s) for s in sums)
    count = float(len(frames)) * float(moving.sum())                                    # (sample, node) pairs
    per_axis = max(3.0 * count, 1.0)
    return dict(split=SPLIT, delta_t=int(delta_t), frame_start=int(frame_start), frame_stop=frame_stop,
                **({} if input_velocity == "stored" else {"input_velocity": input_velocity}),
                frame_stride=int(frame_stride), samples=int(len(frames)) * meta.num_scenes,
                moving_nodes=int(moving.sum()), displacement_rms=float(np.sqrt(squared_sum / per_axis)),
                displacement_mean_norm=norm_sum / max(count, 1.0), velocity_rms=float(np.sqrt(velocity_sum / per_axis)))


def recorded_statistics(path: str | Path, key: str) -> dict[str, Any] | None:
    """The record ``key`` of the store at ``path`` as it is on disk now (None: not recorded)."""
    attrs = zarr.open_group(str(path), mode="r").attrs.get(STATISTICS_ATTR) or {}
    record = attrs.get(key) if isinstance(attrs, dict) else None
    return dict(record) if isinstance(record, dict) else None


def record_statistics(path: str | Path, key: str, record: dict[str, Any]) -> None:
    """Add ``record`` under ``key`` to the store's ``statistics`` attribute (zarr rewrites the root's metadata
    file atomically; other records are kept). One writer at a time: rank 0, or ``launch/prepare.py``."""
    root = zarr.open_group(str(path), mode="r+")
    records = dict(root.attrs.get(STATISTICS_ATTR) or {})
    records[key] = record
    root.attrs[STATISTICS_ATTR] = records


def ensure_statistics(info: StoreInfo, delta_t: int, frame_start: int = 0, frame_stop: int | None = None,
                      frame_stride: int = 1, write: bool = True,
                      input_velocity: str = "stored") -> tuple[dict[str, Any], str | None]:
    """The record of this frame selection: read from the store, else computed and (``write``) recorded.

    Returns (record, note): ``note`` is None when the store held it, else one line saying it was computed and
    where it went (a store that cannot be written keeps working: the record is then used for this run only).
    """
    key = statistics_key(delta_t, frame_start, frame_stop, frame_stride, input_velocity)
    record = recorded_statistics(info.path, key)
    if record is not None:
        return record, None
    record = compute_statistics(info, delta_t, frame_start, frame_stop, frame_stride, input_velocity)
    if not write:
        return record, f"{info.path}: computed the normalisation statistics {key} (not recorded)"
    try:
        record_statistics(info.path, key, record)
    except OSError as err:
        return record, (f"{info.path}: computed the normalisation statistics {key} for this run only; the store "
                        f"cannot be written ({type(err).__name__}: {err})")
    return record, f"{info.path}: computed the normalisation statistics {key} and recorded them in its attributes"
