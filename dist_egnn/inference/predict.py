"""``python launch/predict.py run=RUN_DIR steps=K [...]``: load a run, roll it out, write the results.

Order: every check first (the options, the run's ``config.yaml`` and ``best.pt``, the store, its node
scalars against the training store's, the model's widths against the data, the split and start frame),
then the rollout (``dist_egnn.inference.rollout``), then the outputs, written into a temporary sibling
folder that replaces ``<out>`` (default ``RUN_DIR/predict``) only once complete; ``<out>`` must be new, empty
or an earlier output of predict (:func:`check_out`). A bad input therefore stops with a ``BadInput`` naming the
key or file and the fix, and nothing is written.

``<out>/`` receives:
    rollout.json    per-step lists of length ``steps``: ``mse``, ``baseline_mse`` (constant velocity on the
                    same nodes), ``mse_over_baseline``, ``edges_per_node`` (edges each moving node received:
                    rises when predictions pile up), ``spread_ratio`` (the predicted fluid's extent over the
                    truth's: below 1 it contracts), ``outside_share`` (of the predicted fluid, outside the box
                    of the walls), ``frames``, ``cut_fraction`` (P > 1), ``contained_share`` (``contain=true``:
                    of the moving nodes, put back inside the container by that step); ``steps``,
                    ``requested_steps``, ``stopped_early``, ``samples`` (scenes), ``command``, ``config``
                    (these options), the run, the store, the outputs
    rollout.zarr    the predicted trajectories in the dataset layout (``writers.write_store``)
    rollout.png     true vs predicted particles at a few steps, per-step MSE vs constant velocity
    vtk/            with ``format=vtk``: ``scene_NNN.pvd`` + ``scene_NNN/frame_KKKK.vtu`` for ParaView
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dist_egnn.datasets.store import StoreInfo, open_store
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.inference import writers
from dist_egnn.inference.load import RunError, load_model
from dist_egnn.inference.rollout import (
    HALO_MODES,
    PARTITION_METHODS,
    GraphRecipe,
    Parts,
    RolloutError,
    check_start,
    container_box,
    first_input_frame,
    rollout,
)
from dist_egnn.keys import SPLITS
from dist_egnn.training.device import autocast

FORMATS = ("zarr", "vtk")
OUTPUTS = ("rollout.json", "rollout.zarr", "rollout.png", "vtk")     # what predict writes into <out>/
LITTER = (".DS_Store", ".nfs")      # what a file browser or NFS leaves in a folder someone looked into
DEVICES = ("auto", "cpu", "cuda")


def check_options(cfg: DictConfig) -> None:
    """What the types of ``PredictConfig`` cannot say; one ConfigError naming every bad key and its fix."""
    problems = []
    if not cfg.get("run"):
        problems.append("run is missing: give the run directory, run=runs/<dataset>-<model>/<date>")
    if cfg.steps < 1:
        problems.append(f"steps={cfg.steps}: must be >= 1 (task steps of the run's dataset.delta_t frames)")
    if cfg.split not in SPLITS:
        problems.append(f"split={cfg.split!r}: choose one of {SPLITS}")
    if cfg.format not in FORMATS:
        problems.append(f"format={cfg.format!r}: choose one of {FORMATS} (vtk also writes the zarr store)")
    if cfg.get("parts") is not None and cfg.parts < 1:
        problems.append(f"parts={cfg.parts}: must be >= 1")
    if cfg.get("halo") is not None and cfg.halo not in HALO_MODES:
        problems.append(f"halo={cfg.halo!r}: choose one of {HALO_MODES}")
    if cfg.get("partition") is not None and cfg.partition not in PARTITION_METHODS:
        problems.append(f"partition={cfg.partition!r}: choose one of {PARTITION_METHODS}")
    for key, low in (("start", 0), ("scenes", 1), ("batch_size", 1), ("num_threads", 1), ("seed", 0),
                     ("max_neighbors", 1)):
        if cfg.get(key) is not None and cfg[key] < low:
            problems.append(f"{key}={cfg[key]}: must be >= {low}")
    if cfg.get("wall_neighbors_reach") is not None and not cfg.wall_neighbors_reach > 0:
        problems.append(f"wall_neighbors_reach={cfg.wall_neighbors_reach}: must be > 0 (a distance in the store's "
                        f"length unit)")
    if cfg.device not in DEVICES:
        problems.append(f"device={cfg.device!r}: choose one of {DEVICES}")
    if cfg.format == "vtk" and importlib.util.find_spec("meshio") is None:
        problems.append("format=vtk writes .vtu files through meshio, which is not installed: "
                        "pip install -e '.[io]' (or pip install meshio), or leave format=zarr")
    if cfg.get("dtype") not in (None, "float32", "float64"):
        problems.append(f"dtype={cfg.dtype!r}: choose float32 or float64 (or leave it out: the run's trainer.dtype)")
    if problems:
        raise ConfigError("invalid predict options:\n  " + "\n  ".join(problems))


def check_data(run_cfg: DictConfig, info: StoreInfo, model: torch.nn.Module, run_dir: Path) -> None:
    """The store's node scalars equal the training store's, and the model's widths fit the data's features."""
    d = run_cfg.dataset
    trained_on = Path(d.store)
    if trained_on.resolve() != info.path.resolve():
        if trained_on.exists():
            trained_info = open_store(trained_on)
            train_scalars = trained_info.node_scalars
            for key, what in (("dt", "time between stored frames"), ("units", "units")):
                a, b = trained_info.attrs[key], info.attrs[key]
                # dt within 0.1 %: the MD source accepts frame intervals that differ by that much between files
                if not (math.isclose(a, b, rel_tol=1e-3) if key == "dt" else a == b):
                    raise RolloutError(f"data={info.path} has {key}={b} ({what}), but the run was "
                                       f"trained on {trained_on} with {key}={a}: a task step "
                                       f"and the model's velocities would mean something else; give data= a store "
                                       f"with the same {key} or train a model on this one")
            if train_scalars != info.node_scalars:
                raise RolloutError(f"data={info.path} has node scalars {info.node_scalars}, but the run was trained "
                                   f"on {trained_on} with node scalars {train_scalars}: the model's features would "
                                   f"mean something else; give data= a store with the same node scalars (prepared "
                                   f"from the same source) or train a model on this one")
        else:
            print(f"note: the training store {trained_on} is not found from {Path.cwd()} (gone, or relative to "
                  f"another folder); checking {info.path} against the run's feature recipe only")
    recipe = list(d.node_features)
    missing = [n for n in recipe if n != "speed" and n not in info.node_scalars]
    missing += [n for n in d.edge_features if n.endswith("_product") and n[:-len("_product")] not in info.node_scalars]
    if missing:
        raise RolloutError(f"{info.path} lacks the node scalars of the run's features {missing} (dataset.node_features="
                           f"{recipe}, dataset.edge_features={list(d.edge_features)} in {run_dir / 'config.yaml'}; "
                           f"the store holds {info.node_scalars}): give data= a store with them")
    for name, width, features in (("node_features", getattr(model, "node_features", None), recipe),
                                  ("edge_features", getattr(model, "edge_features", None), list(d.edge_features))):
        if width is not None and width != len(features):
            raise RunError(f"the model of {run_dir} takes {width} {name.replace('_', ' ')} but its config.yaml's "
                           f"dataset.{name}={features} makes {len(features)}: the model's widths do not match the "
                           f"data; restore the config.yaml written with checkpoints/best.pt")


def rollout_config(run_cfg: DictConfig, max_neighbors: int | None = None, wall_neighbors_reach: float | None = None,
                   where: Path | str = "the run's config.yaml") -> DictConfig:
    """The run's configuration with the rollout's graph bounds replaced where given: ``dataset.max_neighbors``
    and ``dataset.wall_neighbors_reach``. Bounds at or above what the training graphs held (the largest
    in-degree, water3d_like: 19 on the stored frames; the longest nearest-wall edge, ``python -m
    dist_egnn.measure.reach STORE --wall-neighbors k``) leave every graph the model saw unchanged and only bound
    the graphs of predictions that pile up or fly off."""
    if max_neighbors is None and wall_neighbors_reach is None:
        return run_cfg
    if wall_neighbors_reach is not None and not run_cfg.dataset.get("wall_neighbors", 0):
        raise RolloutError(f"wall_neighbors_reach={wall_neighbors_reach} bounds the nearest-wall edges, but the run "
                           f"has none (dataset.wall_neighbors=0 in {where}); leave wall_neighbors_reach out")
    bounded = copy.deepcopy(run_cfg)
    with open_dict(bounded):
        if max_neighbors is not None:
            bounded.dataset.max_neighbors = int(max_neighbors)
        if wall_neighbors_reach is not None:
            bounded.dataset.wall_neighbors_reach = float(wall_neighbors_reach)
    return bounded


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    return torch.device(name)


def rollout_precision(run_cfg: DictConfig, dtype: torch.dtype) -> str:
    """The run's ``trainer.precision`` (bf16: a rollout of the validation split then repeats the run's own
    ``val_rollout_mse``), but fp32 when predict's ``dtype`` made the model other than float32 (autocast would turn a
    float64 model's products into bf16)."""
    return run_cfg.trainer.get("precision", "fp32") if dtype == torch.float32 else "fp32"


def in_precision(model: torch.nn.Module, precision: str, device: torch.device):
    """The model as a rollout calls it: as it is for fp32, else under autocast in ``precision``."""
    if precision == "fp32":
        return model

    def call(**inputs):
        with autocast(device, precision):
            return model(**inputs)
    return call


def predict(cfg: DictConfig, command: str | None = None) -> dict[str, Any]:
    """Everything ``launch/predict.py`` does (see the module docstring); returns rollout.json's content."""
    started = time.perf_counter()
    check_options(cfg)
    device = resolve_device(cfg.device)
    run_dir = Path(cfg.run)
    model = load_model(run_dir, device=device, dtype=cfg.get("dtype"))
    run_cfg = rollout_config(model.config, cfg.get("max_neighbors"), cfg.get("wall_neighbors_reach"),
                             run_dir / "config.yaml")
    store = Path(cfg.data) if cfg.get("data") else Path(run_cfg.dataset.store)
    if not cfg.get("data") and not store.is_absolute() and not store.exists():
        raise RunError(f"{run_dir / 'config.yaml'} gives dataset.store={store}, a path relative to the folder the "
                       f"run trained in, and there is no {Path.cwd() / store}: run predict from that folder or give "
                       f"data=STORE (a store that is gone is rebuilt by `python launch/prepare.py` with the run's "
                       f"dataset options)")
    info = open_store(store)
    check_data(run_cfg, info, model, run_dir)
    if cfg.get("max_neighbors") is not None and GraphRecipe.of(run_cfg, info).radius is None:
        raise RolloutError(f"max_neighbors={cfg.max_neighbors} caps the senders of a radius graph, but the run's "
                           f"graphs are complete (no dataset.radius in {run_dir / 'config.yaml'}, no radius in "
                           f"{info.path}), so it would change nothing: leave max_neighbors out")
    start = first_input_frame(run_cfg) if cfg.get("start") is None else cfg.start
    check_start(info, cfg.split, start, int(run_cfg.dataset.delta_t))
    dist = run_cfg.get("distributed") or {}
    parts = Parts(parts=cfg.parts if cfg.get("parts") is not None else dist.get("parts", 1),
                  halo=cfg.halo if cfg.get("halo") is not None else dist.get("halo", "none"),
                  method=cfg.partition if cfg.get("partition") is not None else dist.get("partition", "metis"),
                  seed=cfg.seed if cfg.get("seed") is not None else dist.get("seed", 0))
    parts.check()
    box = container_box(info) if cfg.contain else None
    out = Path(cfg.out) if cfg.get("out") else run_dir / "predict"
    target = Path(os.path.abspath(out))        # `.` has a name to put a sibling beside; a link is not followed
    check_out(target)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    dtype = next(model.parameters()).dtype
    print(f"rolling out {run_dir} on {info.path}/{cfg.split} from frame {start}: {cfg.steps} steps of "
          f"{run_cfg.dataset.delta_t} frames" + (f", {parts.parts} parts ({parts.method}, halo={parts.halo}), "
                                                 f"re-partitioned every step" if parts.parts > 1 else "")
          + ("" if box is None else f", the fluid held inside its container {box[0].tolist()} .. {box[1].tolist()}"),
          flush=True)
    precision = rollout_precision(run_cfg, dtype)
    result = rollout(in_precision(model, precision, device), run_cfg, info, cfg.split, int(cfg.steps), start=start,
                     scenes=cfg.get("scenes"), scene_ids=cfg.get("scene_ids"), batch_size=cfg.get("batch_size"),
                     parts=parts, device=device, dtype=dtype, progress=bool(cfg.progress), contain=bool(cfg.contain))

    options = OmegaConf.to_container(cfg, resolve=True)
    extra = dict(command=command, config=options, run=str(run_dir), store=str(info.path),
                 checkpoint=model.checkpoint, parts=parts.parts, halo=parts.halo if parts.parts > 1 else None,
                 partition=parts.method if parts.parts > 1 else None, dtype=str(dtype).replace("torch.", ""),
                 precision=precision,
                 model=run_cfg.model.name, velocity_unit=run_cfg.dataset.get("velocity_unit", "store"),
                 container=None if box is None else [box[0].tolist(), box[1].tolist()])
    tmp = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        writers.write_store(result, tmp / "rollout.zarr", info, generator=dict(run=str(run_dir), command=command,
                                                                                 steps=result.steps, split=cfg.split))
        outputs = {"store": str(out / "rollout.zarr"), "png": str(out / "rollout.png")}
        if cfg.format == "vtk":
            pvds = writers.write_vtk(result, tmp / "vtk", info)
            outputs["vtk"] = [str(out / "vtk" / p.name) for p in pvds]
        writers.write_png(result, tmp / "rollout.png",
                          f"{run_cfg.dataset.name} {run_cfg.model.name}: {info.path.name}/{cfg.split}, scene "
                          f"{result.scenes[0]}" + (", fluid held inside its container (contain=true)" if cfg.contain
                                                   else ""))
        extra.update(outputs=outputs, time_s=round(time.perf_counter() - started, 3))
        record = writers.write_json(result, tmp / "rollout.json", extra)
        replace_folder(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def check_out(out: Path) -> None:
    """``out`` is replaced whole once the rollout is done, so it must be new, empty, or an earlier output of
    predict (nothing but :data:`OUTPUTS`): a folder with anything else in it (the run directory, a dataset,
    ``.``) is refused before the rollout, naming what it holds."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"out={out} is a file; give a folder (or leave out= out: RUN_DIR/predict)")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS and not p.name.startswith(LITTER))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise BadInput(f"out={out} holds {shown}, which predict did not write: it replaces its out= folder "
                           f"whole, so give a new or empty folder, or one an earlier predict wrote (leave out= out: "
                           f"RUN_DIR/predict)")


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``, replacing an older one only once ``new`` is complete."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def summary(record: dict[str, Any]) -> str:
    """The per-step table printed at the end: the MSE beside constant velocity's, and whether the predicted
    fluid keeps its extent (spread) and stays inside the walls (outside; stores with walls only), and with
    ``contain=true`` the share of it put back inside the container (held)."""
    outside, held = record.get("outside_share"), record.get("contained_share")
    lines = [f"{'step':>4} {'frame':>6} {'mse':>12} {'const. vel.':>12} {'ratio':>7} {'spread':>7}"
             + (f" {'outside':>7}" if outside else "") + (f" {'held':>7}" if held is not None else "")]
    for k, (frame, m, b, spread) in enumerate(zip(record["frames"], record["mse"], record["baseline_mse"],
                                                   record["spread_ratio"]), 1):
        lines.append(f"{k:>4} {frame:>6} {m:>12.5g} {b:>12.5g} {m / b if b else float('nan'):>7.3f} {spread:>7.3f}"
                     + (f" {outside[k - 1]:>7.1%}" if outside else "")
                     + (f" {held[k - 1]:>7.1%}" if held is not None else ""))
    return "\n".join(lines)
