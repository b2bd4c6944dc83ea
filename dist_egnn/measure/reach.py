"""How far particles move in one task step against how far a model sees: ``python -m dist_egnn.measure.reach``.

A message-passing model with L layers on a radius-r graph reads nothing beyond L·r of a node (its receptive
field; FastEGNN's virtual nodes add a coarse, graph-wide summary on top). Where a particle travels further than
that in one task step, what stops it (a wall, the fluid it runs into) is out of sight when the step begins, and
a model trained on MSE can only predict the mean of what may happen there. This module measures, per task step Δt
(in stored frames), the distribution of the moving particles' displacement |x(t + Δt) − x(t)| over the input
frames t = 0, s, 2s, ... (s = ``--stride``) of every scene of one split, and the shares beyond r and beyond L·r.

    python -m dist_egnn.measure.reach data/water3d_like.zarr --split train --layers 4 --delta-t 1 2 5 10 20

The radius is the store's own (``radius`` attribute) unless ``--radius`` is given. Walls (node scalar ``type``
1) are left out. Prints one markdown table.

With ``--wall-neighbors K`` (a store with walls) a second table gives, over the same input frames of the
smallest Δt, every moving particle's distance to its K-th nearest wall in its scene: the longest nearest-wall
edge ``dataset.wall_neighbors=K`` puts in a training graph, what ``dataset.wall_neighbors_reach`` should sit
just above (docs/maths.md §8).

    python -m dist_egnn.measure.reach data/fluid_small_walls.zarr --delta-t 1 --stride 1 --wall-neighbors 2
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import zarr
from scipy.spatial import cKDTree

from dist_egnn.datasets.statistics import input_frames
from dist_egnn.datasets.store import WALL, StoreError, StoreInfo, open_store


def checked_split(info: StoreInfo, split: str, delta_t: int):
    """The split's metadata, once ``split`` exists and ``delta_t`` leaves an input frame; else a StoreError."""
    if split not in info.splits:
        raise StoreError(f"{info.path}: no split {split!r}; it has {sorted(info.splits)}")
    meta = info.splits[split]
    if delta_t < 1 or delta_t >= meta.num_frames:
        raise StoreError(f"{info.path}/{split}: delta_t={delta_t} must be in 1..{meta.num_frames - 1} (frames "
                         f"stored)")
    return meta


def displacements(info: StoreInfo, split: str, delta_t: int, stride: int) -> np.ndarray:
    """|x(t + Δt) − x(t)| of every moving node over the input frames ``TrajectoryDataset`` would take with
    ``frame_stride=stride``: (samples × nodes,)."""
    meta = checked_split(info, split, delta_t)
    group = zarr.open_group(str(info.path), mode="r")[split]
    moving = slice(None)
    if "type" in info.node_scalars:
        moving = np.asarray(group["node_scalars"][:, info.node_scalars.index("type")]) != WALL
    out = []
    for t in input_frames(meta.num_frames, delta_t, frame_stride=stride):
        step = np.asarray(group["pos"][t + delta_t], np.float64) - np.asarray(group["pos"][t], np.float64)
        out.append(np.linalg.norm(step[moving], axis=1))
    return np.concatenate(out)


def wall_distances(info: StoreInfo, split: str, k: int, delta_t: int, stride: int) -> np.ndarray:
    """Every moving node's distance to the k-th nearest wall of its scene (fewer walls: the farthest) over the
    input frames of :func:`displacements`: (samples × moving nodes,)."""
    if "type" not in info.node_scalars:
        raise StoreError(f"{info.path}: --wall-neighbors asks for distances to walls, but the store has no node "
                         f"scalar `type` (its scalars: {info.node_scalars})")
    if k < 1:
        raise StoreError(f"--wall-neighbors {k}: must be >= 1")
    meta = checked_split(info, split, delta_t)
    group = zarr.open_group(str(info.path), mode="r")[split]
    walls = np.asarray(group["node_scalars"][:, info.node_scalars.index("type")]) == WALL
    out = []
    for t in input_frames(meta.num_frames, delta_t, frame_stride=stride):
        pos = np.asarray(group["pos"][t], np.float64)
        for lo, hi in zip(meta.scene_ptr[:-1], meta.scene_ptr[1:]):
            wall, moving = pos[lo:hi][walls[lo:hi]], pos[lo:hi][~walls[lo:hi]]
            if len(wall) and len(moving):
                d, _ = cKDTree(wall).query(moving, k=min(k, len(wall)))
                out.append(np.asarray(d).reshape(len(moving), -1)[:, -1])
    return np.concatenate(out) if out else np.zeros(0)


def measure(store: str | Path, split: str, deltas: list[int], stride: int, radius: float | None,
            layers: int) -> tuple[list[dict], float, float]:
    """One row per Δt: median, p90, p99 of the displacement and the shares beyond r and L·r; also r and dt."""
    info = open_store(store)
    radius = float(radius if radius is not None else info.attrs.get("radius", float("nan")))
    if not radius > 0:
        raise StoreError(f"{store}: radius {radius!r} must be positive: pass --radius")
    rows = []
    for delta_t in deltas:
        d = displacements(info, split, delta_t, stride)
        rows.append(dict(delta_t=delta_t, median=float(np.median(d)), p90=float(np.quantile(d, 0.9)),
                         p99=float(np.quantile(d, 0.99)), beyond_radius=float(np.mean(d > radius)),
                         beyond_field=float(np.mean(d > layers * radius)), count=int(d.size)))
    return rows, radius, float(info.attrs.get("dt", float("nan")))


def table(rows: list[dict], radius: float, dt: float, layers: int) -> str:
    head = (f"| Δt (frames) | Δt (time) | median | p90 | p99 | beyond r = {radius:g} | beyond {layers}·r = "
            f"{layers * radius:g} | samples × nodes |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['delta_t']} | {r['delta_t'] * dt:g} | {r['median']:.3f} | {r['p90']:.3f} | "
                     f"{r['p99']:.3f} | {r['beyond_radius']:.1%} | {r['beyond_field']:.1%} | {r['count']:,} |")
    return "\n".join(lines)


def wall_table(d: np.ndarray, k: int, radius: float) -> str:
    """One row: the k-th nearest wall's distance, median, p99 and max, and the max in radii."""
    if not d.size:
        return f"no moving particle shares a scene with a wall: no {k}-th nearest wall to measure"
    lines = ["| distance to the k-th nearest wall | median | p99 | max | max / r | samples × nodes |",
             "|" + "---|" * 6]
    lines.append(f"| k = {k} | {np.median(d):.3f} | {np.quantile(d, 0.99):.3f} | {d.max():.3f} | "
                 f"{d.max() / radius:.1f} | {d.size:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", help="a dataset store (zarr), e.g. data/water3d_like.zarr")
    parser.add_argument("--split", default="train")
    parser.add_argument("--delta-t", type=int, nargs="+", default=[1, 2, 5, 10, 20], dest="deltas")
    parser.add_argument("--stride", type=int, default=20, help="input frames t = 0, stride, 2·stride, ...")
    parser.add_argument("--radius", type=float, help="default: the store's radius attribute")
    parser.add_argument("--layers", type=int, default=4, help="message-passing layers L (model.layers)")
    parser.add_argument("--wall-neighbors", type=int, metavar="K",
                        help="also tabulate the distance to the K-th nearest wall (dataset.wall_neighbors)")
    args = parser.parse_args()
    if args.stride < 1 or args.layers < 1:
        parser.error("--stride and --layers must be >= 1")
    rows, radius, dt = measure(args.store, args.split, args.deltas, args.stride, args.radius, args.layers)
    print(table(rows, radius, dt, args.layers))
    if args.wall_neighbors is not None:
        info = open_store(args.store)
        print()
        print(wall_table(wall_distances(info, args.split, args.wall_neighbors, min(args.deltas), args.stride),
                         args.wall_neighbors, radius))


if __name__ == "__main__":
    main()
