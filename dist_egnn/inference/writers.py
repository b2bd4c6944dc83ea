"""What a rollout leaves for people and programs: JSON, a zarr store, ParaView frames, a picture.

* :func:`write_json`: ``rollout.json``, per-step lists (``mse``, ``baseline_mse``, ...) and what produced them.
* :func:`write_store`: the predicted trajectories as a store in the dataset layout (``datasets/store.py``),
  readable with ``dist_egnn.datasets.store.open_store``. The rolled-out split's group holds the rollout:
  ``pos`` (K + 1, N, 3) with frame 0 the stored input state and frame k the prediction after k task steps;
  ``vel`` the predicted velocities in the source store's unit (frame 0 as stored, then displacement over
  the step's time); ``node_scalars`` and ``scene_ptr`` of the rolled-out scenes (scene b is the source split's scene
  ``scenes[b]``, a root attribute: ``scene_ids`` need not pick the first ones); and, beside the layout,
  ``true_pos`` and ``baseline_pos`` (the stored frames and constant velocity, same shape). The root's ``dt``
  is the time between predicted frames, Δt · dt. The layout requires all three splits: the other two are
  placeholders of one node and one frame (root attributes ``rollout_split`` and ``placeholder_splits``).
* :func:`write_vtk`: per scene, one ``.vtu`` file per frame (meshio) plus a ``.pvd`` collection that
  ParaView opens as a time series. Points are the predicted positions; point data ``predicted``, ``true``,
  ``to_true`` (true − predicted: *Warp By Vector* with scale 1 moves the points onto the truth), ``error``
  (|true − predicted|), ``velocity`` and the node scalars (``type``: walls are 1).
* :func:`write_png`: true vs predicted particles of the first scene at a few steps (a 2D projection on the two
  axes of widest spread) above the per-step MSE of the model and of constant velocity, and the spread ratio.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from dist_egnn.datasets.store import StoreInfo, atomic_store, create_split, write_root_attrs
from dist_egnn.inference.rollout import Rollout
from dist_egnn.keys import SPLITS


def write_json(result: Rollout, path: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """``rollout.json``: per-step lists of length ``steps`` and the run's description; returns what it wrote."""
    record = dict(steps=result.steps, requested_steps=result.requested, samples=len(result.scenes),
                  mse=result.mse, baseline_mse=result.baseline_mse,
                  mse_over_baseline=[m / b if b > 0 else None for m, b in zip(result.mse, result.baseline_mse)],
                  edges_per_node=result.edges_per_node, spread_ratio=result.spread_ratio,
                  outside_share=result.outside_share if np.isfinite(result.outside_share).any() else None,
                  frames=result.frames[1:], start_frame=result.start, delta_t=result.delta_t, split=result.split,
                  scenes=result.scenes, nodes=int(len(result.moving)), walls=int((~result.moving).sum()),
                  stopped_early=result.stopped, input_velocity_gap=result.velocity_gap)
    if result.cut_fraction is not None:
        record["cut_fraction"] = result.cut_fraction
    if result.contained_share is not None:
        record["contained_share"] = result.contained_share
    record.update(extra)
    path.write_text(json.dumps(record, indent=1))
    return record


def write_store(result: Rollout, path: Path, info: StoreInfo, generator: dict[str, Any]) -> None:
    """The rollout as a store in the dataset layout; see the module docstring."""
    with atomic_store(path) as root:
        write_root_attrs(root, dataset=f"{info.attrs['dataset']}-rollout", source="rollout",
                         dt=result.delta_t * float(info.attrs["dt"]), units=info.attrs["units"],
                         radius=info.attrs["radius"], node_scalars=info.node_scalars, generator=generator)
        placeholders = [s for s in SPLITS if s != result.split]
        root.attrs.update(rollout_split=result.split, placeholder_splits=placeholders,
                          source_store=str(info.path), scenes=result.scenes, start_frame=result.start)
        sizes = np.diff(result.scene_ptr)
        frames = result.steps + 1
        group = create_split(root, result.split, sizes, frames, len(info.node_scalars))
        group["pos"][:] = result.pred.astype(np.float32)
        group["vel"][:] = result.vel.astype(np.float32)
        group["node_scalars"][:] = result.scalars.astype(np.float32)
        for name, values in (("true_pos", result.truth), ("baseline_pos", result.baseline)):
            group.create_array(name, data=values.astype(np.float32), chunks=group["pos"].chunks)
        for split in placeholders:
            empty = create_split(root, split, [1], 1, len(info.node_scalars))
            for name in ("pos", "vel", "node_scalars"):
                empty[name][:] = 0.0


def write_vtk(result: Rollout, folder: Path, info: StoreInfo) -> list[Path]:
    """One ``.vtu`` per scene and frame and one ``.pvd`` per scene; returns the ``.pvd`` paths."""
    import meshio

    folder.mkdir(parents=True, exist_ok=True)
    frame_time = float(info.attrs["dt"]) * result.delta_t
    collections = []
    for b, scene in enumerate(result.scenes):
        rows = slice(result.scene_ptr[b], result.scene_ptr[b + 1])
        name = f"scene_{scene:03d}"
        (folder / name).mkdir(exist_ok=True)
        cells = [("vertex", np.arange(rows.stop - rows.start, dtype=np.int64).reshape(-1, 1))]
        entries = []
        for k in range(result.steps + 1):
            pred, true = result.pred[k, rows].astype(np.float64), result.truth[k, rows].astype(np.float64)
            data = {"predicted": pred, "true": true, "to_true": true - pred,
                    "error": np.linalg.norm(true - pred, axis=1), "velocity": result.vel[k, rows].astype(np.float64)}
            for j, scalar in enumerate(info.node_scalars):
                data[scalar] = result.scalars[rows, j].astype(np.float64)
            file = folder / name / f"frame_{k:04d}.vtu"
            meshio.write_points_cells(file, pred, cells, point_data=data)
            entries.append(f'    <DataSet timestep="{k * frame_time:.9g}" part="0" '
                           f'file={quoteattr(f"{name}/{file.name}")}/>')
        pvd = folder / f"{name}.pvd"
        pvd.write_text('<?xml version="1.0"?>\n<VTKFile type="Collection" version="0.1">\n  <Collection>\n'
                       + "\n".join(entries) + "\n  </Collection>\n</VTKFile>\n")
        collections.append(pvd)
    return collections


SPREAD_AXIS_TOP = 5.0       # the right axis ends here: a diverging step's spread (1e22 seen) must not flatten the rest
LABELLED_STEPS = 20         # up to this many steps, every step gets its tick label; beyond, matplotlib picks


def write_png(result: Rollout, path: Path, title: str) -> None:
    """:func:`rollout_figure` saved as a PNG."""
    rollout_figure(result, title).savefig(path, dpi=100)


def rollout_figure(result: Rollout, title: str):
    """True vs predicted particles of the first scene at up to three steps, and the per-step MSE (with the
    spread ratio, the share outside the walls and, in a contained rollout, the share held inside on a second
    axis, which ends at :data:`SPREAD_AXIS_TOP`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = slice(result.scene_ptr[0], result.scene_ptr[1])
    moving = result.moving[rows]
    first = result.truth[0, rows]
    axes2d = np.sort(np.argsort(first.max(axis=0) - first.min(axis=0))[-2:])      # the two widest axes
    # up to three steps; a rollout whose first step diverged (0 steps kept) shows its input frame
    shown = sorted({1, (result.steps + 1) // 2, result.steps} & set(range(1, result.steps + 1))) or [0]
    fig = Figure(figsize=(4.2 * max(len(shown), 2), 8.0))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, max(len(shown), 1))
    labels = "xyz"
    for i, k in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        true, pred = result.truth[k, rows][:, axes2d], result.pred[k, rows][:, axes2d]
        if (~moving).any():
            ax.scatter(*true[~moving].T, s=2, c="0.8", label="wall")
        ax.scatter(*true[moving].T, s=6, c="tab:blue", alpha=0.6, label="true")
        ax.scatter(*pred[moving].T, s=6, c="tab:red", alpha=0.6, label="predicted")
        ax.set_title(f"step {k} (frame {result.frames[k]})")
        ax.set_xlabel(labels[axes2d[0]])
        ax.set_ylabel(labels[axes2d[1]])
        ax.set_aspect("equal", adjustable="datalim")
        if i == 0:
            ax.legend(loc="best", fontsize=8, markerscale=2)
    ax = fig.add_subplot(grid[1, :])
    steps = np.arange(1, result.steps + 1)
    ax.plot(steps, result.mse, "o-", c="tab:red", label="model")
    held = result.contained_share is not None
    ax.plot(steps, result.baseline_mse, "s--", c="0.4",
            label="constant velocity" + (" (held inside too)" if held else ""))
    ax.set_xlabel("rollout step (task steps of Δt frames)")
    ax.set_ylabel("MSE")
    if result.steps and all(v > 0 for v in [*result.mse, *result.baseline_mse]):
        ax.set_yscale("log")
    if result.steps <= LABELLED_STEPS:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    if result.steps and len(result.spread_ratio) == result.steps:   # the extent beside the error: a collapse shows
        extent = ax.twinx()
        extent.plot(steps, result.spread_ratio, "^:", c="tab:green", label="spread pred / true (right)")
        if len(result.outside_share) == result.steps and np.isfinite(result.outside_share).any():
            extent.plot(steps, result.outside_share, "v-.", c="tab:purple", label="share outside the walls (right)")
        if held and len(result.contained_share) == result.steps:
            extent.plot(steps, result.contained_share, "x-", c="tab:orange", label="share held inside (right)")
        extent.set_ylim(0.0, min(max(1.1, np.nanmax(result.spread_ratio) * 1.05), SPREAD_AXIS_TOP))
        extent.set_ylabel("spread pred / true, share outside")
        more, more_names = extent.get_legend_handles_labels()
        handles, names = handles + more, names + more_names
    ax.legend(handles, names)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
