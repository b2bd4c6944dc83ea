"""Roll a trained model out K task steps, feeding its predictions back as inputs.

A rollout starts from the stored state of every chosen scene at input frame t0 (default the run's
``dataset.frame_start``) and repeats one task step, Δt = ``dataset.delta_t`` stored frames, K times:

* **Inputs** of step k + 1 are the predictions of step k: positions x_{k+1} = the predicted positions;
  velocities v_{k+1} = the last predicted displacement x_{k+1} − x_k expressed in the units the model was
  trained with (``dataset.velocity_unit``, ``datasets.loader.velocity_scale``): ``horizon`` feeds
  displacement per task step, so v_{k+1} = x_{k+1} − x_k exactly; ``store`` feeds the store's unit
  (length per time), so v_{k+1} = (x_{k+1} − x_k) / (Δt · dt) with dt the store's time between frames.
  Step 1 reads the stored velocities, scaled as the loader scales them.
* **Graph**: rebuilt from the current (predicted) positions every step with the loader's own recipe
  functions (``dist_egnn.datasets.graphs``): the radius graph (or complete graph) with
  ``dataset.max_neighbors``, edge dropping at ``model.cutoff_rate``, the edge features (distances at the
  current positions) and the node features (``speed`` from the current velocities, static node scalars).
  :func:`build_graph` at P = 1 equals ``TrajectoryDataset.make_sample`` (a test checks it).
* **P parts** (``parts`` > 1): the partition follows the moving particles by being recomputed from the
  current positions every step: ``partitioners.strategies.partition`` (METIS, spatial bisection or random,
  as ``distributed.partition``) on the step's whole graph, then ``partitioners.subgraphs.split_graph`` gives
  every part the edges it receives (its owned receivers; senders owned or, in exact mode, in its 1-hop
  halo). The P parts run in this one process, as ``training.rank_data``'s sequential mode does: the model
  sees the union of the parts' edges, with the global means over whole graphs. In exact mode (``halo=exact``)
  that union is the whole graph, edge dropping uses the global threshold, and the rollout equals one
  process (a test checks it in float64); P ranks compute the same numbers (tests/parallel). In drop mode
  (``halo=none``, the paper's DistEGNN) the cut edges of that step's partition are missing and each part
  drops its own longest edges. The per-step cut fraction is recorded.
* **Walls**: a store with a node scalar ``type`` marks walls with 1 (``datasets/store.py``); walls send
  messages but are never moved: every step puts them back at their stored input positions (so their
  velocity input is zero from step 2 on), as the trainer does, and they are left out of every MSE.
* **Ground truth** of step k is the stored frame t0 + k·Δt. The rollout stops early, and says so, when a
  trajectory ends before K steps (``Rollout.stopped``), or when predictions become NaN/Inf.
* **Constant velocity**, the reference beside every step's MSE, on the same nodes: x_{k+1} = x_k + v_0,
  with v_0 the initial velocity as displacement per task step (v · Δt · dt from the store's unit).

MSE of a step: mean over every moving node and coordinate of every scene, as the trainer's evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import zarr
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dist_egnn.datasets.graphs import drop_longest_edges, edge_features, graph_edges, node_features
from dist_egnn.datasets.loader import GraphBatch, GraphSample, collate, velocity_scale
from dist_egnn.datasets.store import StoreInfo
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.keys import SPLITS
from dist_egnn.partitioners.strategies import partition
from dist_egnn.partitioners.subgraphs import split_graph

WALL_SCALAR = "type"          # node scalar marking particle kinds; WALL_TYPE never moves (issue 17)
WALL_TYPE = 1
HALO_MODES = ("exact", "none")
PARTITION_METHODS = ("metis", "spatial", "random")


class RolloutError(BadInput):
    """A rollout that cannot start from what was given (split, start frame, store): names the key and fix."""


# ------------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class GraphRecipe:
    """How the loader builds one sample's graph and features (``TrajectoryDataset.make_sample``)."""

    radius: float | None
    max_neighbors: int | None
    cutoff_rate: float
    node_features: tuple[str, ...]
    edge_features: tuple[str, ...]
    scalar_names: tuple[str, ...]

    @classmethod
    def of(cls, cfg: DictConfig, info: StoreInfo) -> "GraphRecipe":
        """The recipe of a run's configuration on a store (radius None: the store's own, as the loader does)."""
        d = cfg.dataset
        radius = info.attrs.get("radius") if d.get("radius") is None else d.radius
        return cls(radius=radius, max_neighbors=d.get("max_neighbors"),
                   cutoff_rate=float(cfg.model.get("cutoff_rate", 0.0)),
                   node_features=tuple(d.node_features), edge_features=tuple(d.edge_features),
                   scalar_names=tuple(info.node_scalars))


@dataclass(frozen=True)
class Parts:
    """How each step's graph is split: P parts, halo mode, partitioner and its seed (one part: no split)."""

    parts: int = 1
    halo: str = "exact"
    method: str = "metis"
    seed: int = 0

    def check(self) -> None:
        if self.parts < 1:
            raise ConfigError(f"parts={self.parts}: must be >= 1")
        if self.halo not in HALO_MODES:
            raise ConfigError(f"halo={self.halo!r}: choose one of {HALO_MODES}")
        if self.method not in PARTITION_METHODS:
            raise ConfigError(f"partition={self.method!r}: choose one of {PARTITION_METHODS}")


@dataclass
class StepGraph:
    """One scene's graph at one step: what ``collate`` needs, plus the step's cut fraction (P > 1)."""

    edge_index: np.ndarray
    edge_attr: np.ndarray
    node_features: np.ndarray
    cut_fraction: float | None = None


def build_graph(pos: np.ndarray, vel: np.ndarray, scalars: np.ndarray, recipe: GraphRecipe,
                parts: Parts = Parts()) -> StepGraph:
    """The graph and features of one scene at positions ``pos`` and velocities ``vel`` (training units).

    P = 1: exactly ``TrajectoryDataset.make_sample``'s graph. P > 1: the current positions are partitioned
    and the parts' edges united (see the module docstring).
    """
    names = list(recipe.scalar_names)
    walls = scalars[:, names.index(WALL_SCALAR)] == WALL_TYPE if WALL_SCALAR in names else None
    whole = graph_edges(pos, recipe.radius, recipe.max_neighbors, walls)          # no wall -> wall edge
    cut = None
    if parts.parts == 1:
        edges = drop_longest_edges(whole, pos, recipe.cutoff_rate)
    else:
        edges, cut = partitioned_edges(pos, whole, recipe.cutoff_rate, parts)
    return StepGraph(edge_index=edges,
                     edge_attr=edge_features(list(recipe.edge_features), edges, pos, scalars, names),
                     node_features=node_features(list(recipe.node_features), vel, scalars, names),
                     cut_fraction=cut)


def partitioned_edges(pos: np.ndarray, whole: np.ndarray, cutoff_rate: float, parts: Parts) -> tuple[np.ndarray, float]:
    """The edges the P parts of this step's partition receive, in global ids, and the step's cut fraction.

    The partition is computed from ``pos`` (the current positions) on the whole graph ``whole``. Exact mode:
    every part keeps the edges its owned nodes receive (halo senders included), the union is the whole
    graph and edge dropping takes the global threshold. Drop mode: edges inside a part only, each part
    dropping its own longest (``training.rank_data.RankData.sequential_edges``).
    """
    if parts.parts > len(pos):
        raise RolloutError(f"parts={parts.parts} is more than the {len(pos)} nodes of a scene: use at most "
                           f"{len(pos)} parts")
    split = partition(pos, parts.parts, parts.method, seed=parts.seed, edge_index=whole, allow_duplicates=True)
    pieces = split_graph(whole, split.assignment, parts.parts, halo=parts.halo == "exact")
    if parts.halo == "exact":
        ids = np.sort(np.concatenate([p.edge_ids for p in pieces]))
        edges = drop_longest_edges(whole[:, ids], pos, cutoff_rate)
    else:
        edges = np.concatenate([drop_longest_edges(whole[:, p.edge_ids], pos, cutoff_rate) for p in pieces], axis=1)
    return edges.astype(np.int64), float(split.metrics.cut_fraction)


# ------------------------------------------------------------------------------------------------ rollout
@dataclass
class Rollout:
    """A finished rollout of ``steps`` task steps (frame 0 of every array: the stored input state).

    Arrays hold the chosen scenes' nodes concatenated (``scene_ptr``): ``pred``/``truth``/``baseline``
    (steps + 1, N, 3) positions; ``vel`` (steps + 1, N, 3) predicted velocities in the store's unit
    (frame 0: stored), what a dataset store holds; ``scalars`` (N, K) node scalars; ``moving`` (N,) False for
    walls. ``mse``/``baseline_mse``/``cut_fraction``: one entry per step.
    """

    split: str
    start: int
    delta_t: int
    requested: int
    scenes: list[int]
    scene_ptr: np.ndarray
    pred: np.ndarray
    vel: np.ndarray
    truth: np.ndarray
    baseline: np.ndarray
    scalars: np.ndarray
    moving: np.ndarray
    mse: list[float] = field(default_factory=list)
    baseline_mse: list[float] = field(default_factory=list)
    cut_fraction: list[float] | None = None
    stopped: str | None = None

    @property
    def steps(self) -> int:
        return len(self.mse)

    @property
    def frames(self) -> list[int]:
        """Stored frames of the ground truth of steps 0 .. steps."""
        return [self.start + k * self.delta_t for k in range(self.steps + 1)]


def available_steps(info: StoreInfo, split: str, start: int, delta_t: int) -> int:
    """How many task steps of ground truth the split holds after input frame ``start``."""
    return max(0, (info.splits[split].num_frames - 1 - start) // delta_t)


def check_start(info: StoreInfo, split: str, start: int, delta_t: int) -> None:
    """The split exists and frame ``start`` has at least one step of ground truth after it."""
    if split not in SPLITS:
        raise RolloutError(f"split={split!r}: choose one of {SPLITS}")
    frames = info.splits[split].num_frames
    if start < 0 or available_steps(info, split, start, delta_t) < 1:
        raise RolloutError(f"start={start}: {info.path}/{split} holds frames 0..{frames - 1} and one task step is "
                           f"dataset.delta_t={delta_t} frames, so the input frame must lie in "
                           f"0..{frames - 1 - delta_t}; set start= within that range")


def displacement_factor(cfg: DictConfig, info: StoreInfo) -> tuple[float, float]:
    """(velocity scale the loader applies to stored velocities, training velocity units per unit of
    displacement per task step). ``horizon``: (Δt·dt, 1.0 exactly); ``store``: (1.0, 1 / (Δt·dt))."""
    d = cfg.dataset
    unit = d.get("velocity_unit", "store")          # configurations older than the key used the store's unit
    scale = velocity_scale(unit, d.delta_t, info.attrs["dt"])
    per_displacement = 1.0 if unit == "horizon" else scale / (float(d.delta_t) * float(info.attrs["dt"]))
    return scale, per_displacement


def model_inputs(graph: GraphBatch, cfg: DictConfig) -> dict[str, Any]:
    """The keyword arguments of the model's forward for one batch, as the trainer passes them
    (``training.trainer.forward_loss``: ``graph.model_inputs()``).

    GRAVITY (issue 17 item 2): this is the one place a rollout hands the model its per-graph inputs; when
    ``dataset.gravity`` reaches the trainer's forward, pass it here the same way.
    """
    return graph.model_inputs()


def rollout(model: Callable[..., Any], cfg: DictConfig, info: StoreInfo, split: str, steps: int, *,
            start: int | None = None, scenes: int | None = None, batch_size: int | None = None,
            parts: Parts = Parts(), device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
            progress: bool = False) -> Rollout:
    """Roll ``model`` out ``steps`` task steps on ``split`` of the store ``info``; see the module docstring.

    Args:
        model: called as in training, ``model(**graph.model_inputs())`` -> an object with ``.pos`` (N, 3).
        cfg: the run's configuration (``dataset`` recipe and ``model.cutoff_rate``), e.g. ``model.config``.
        info: the opened store (``datasets.store.open_store``).
        steps: K >= 1. start: input frame t0 (None: ``dataset.frame_start``). scenes: the first this many
            scenes of the split (None: all). batch_size: scenes per forward (None: ``trainer.eval_batch_size``).
        parts: P parts per step (see :class:`Parts`). dtype: the model's dtype (the state is kept in it).
    """
    if steps < 1:
        raise RolloutError(f"steps={steps}: a rollout needs at least one step; set steps=K with K >= 1")
    parts.check()
    d = cfg.dataset
    delta_t = int(d.delta_t)
    start = int(d.get("frame_start", 0) if start is None else start)
    check_start(info, split, start, delta_t)
    meta = info.splits[split]
    chosen = list(range(meta.num_scenes))[:scenes]
    if not chosen:
        raise RolloutError(f"scenes={scenes}: choose at least one scene (the split has {meta.num_scenes})")
    batch_size = int(batch_size or cfg.trainer.get("eval_batch_size", 1) or 1)
    recipe = GraphRecipe.of(cfg, info)
    scale, per_displacement = displacement_factor(cfg, info)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    available = available_steps(info, split, start, delta_t)
    todo = min(steps, available)
    stopped = None
    if todo < steps:
        stopped = (f"stopped after {todo} of {steps} steps: {info.path}/{split} ends at frame {meta.num_frames - 1}, "
                   f"so input frame {start} has ground truth for {available} steps of {delta_t} frames")

    group = zarr.open_group(str(info.path), mode="r")[split]
    slices = [meta.scene_nodes(s) for s in chosen]
    sizes = np.array([sl.stop - sl.start for sl in slices])
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def frame(name: str, t: int) -> np.ndarray:
        return np.concatenate([np.asarray(group[name][t, sl]) for sl in slices])

    scalars = np.concatenate([np.asarray(group["node_scalars"][sl]) for sl in slices]).astype(np.float32)
    moving = np.ones(len(scalars), dtype=bool)
    if WALL_SCALAR in info.node_scalars:
        moving = scalars[:, info.node_scalars.index(WALL_SCALAR)] != WALL_TYPE
    walls = ~moving
    if not moving.any():
        raise RolloutError(f"{info.path}/{split}: every node of the chosen scenes is a wall ({WALL_SCALAR}="
                           f"{WALL_TYPE}); there is nothing to predict: choose other scenes or another store")

    stored_vel = frame("vel", start)
    if scale != 1.0:                                   # exactly as the loader scales (float32)
        stored_vel = (stored_vel * np.float32(scale)).astype(np.float32)
    pos = frame("pos", start).astype(np_dtype)
    vel = stored_vel.astype(np_dtype)                  # step 1 sees what the loader feeds (walls included)
    first_displacement = vel / np_dtype(per_displacement)      # v_0 as displacement per task step
    out_vel = [frame("vel", start).astype(np.float32)]
    pred, truth, base = [pos.copy()], [pos.copy()], [pos.copy()]
    result = Rollout(split=split, start=start, delta_t=delta_t, requested=steps, scenes=chosen, scene_ptr=ptr,
                     pred=None, vel=None, truth=None, baseline=None, scalars=scalars, moving=moving,
                     cut_fraction=[] if parts.parts > 1 else None, stopped=stopped)
    batches = [list(range(i, min(i + batch_size, len(chosen)))) for i in range(0, len(chosen), batch_size)]
    bar = tqdm(total=todo * len(batches), desc="rollout", unit="batch", disable=not progress)
    store_per_displacement = 1.0 / (float(delta_t) * float(info.attrs["dt"]))
    model_eval = getattr(model, "eval", None)
    if callable(model_eval):
        model_eval()
    for k in range(1, todo + 1):
        new_pos = np.empty_like(pos)
        cuts = []
        for members in batches:
            samples = []
            for b in members:
                sl = slice(ptr[b], ptr[b + 1])
                g = build_graph(pos[sl], vel[sl], scalars[sl], recipe, parts)
                if g.cut_fraction is not None:
                    cuts.append(g.cut_fraction)
                samples.append(GraphSample(pos=pos[sl], vel=vel[sl], target=pos[sl], node_features=g.node_features,
                                           edge_index=g.edge_index, edge_attr=g.edge_attr, scene=chosen[b],
                                           frame=start + (k - 1) * delta_t))
            graph = collate(samples).to(device, dtype)
            with torch.no_grad():
                out = model(**model_inputs(graph, cfg))
            rows = slice(ptr[members[0]], ptr[members[-1] + 1])
            new_pos[rows] = out.pos.detach().to("cpu", dtype).numpy()
            bar.update(1)
        new_pos[walls] = pos[walls]
        if not np.all(np.isfinite(new_pos)):
            bad = int((~np.isfinite(new_pos).all(axis=1)).sum())
            result.stopped = (f"stopped after {k - 1} of {steps} steps: the predictions of step {k} hold NaN or Inf "
                              f"at {bad} nodes (the model diverged)")
            break
        displacement = new_pos - pos
        vel = displacement * np_dtype(per_displacement)
        pos = new_pos
        true_k = frame("pos", start + k * delta_t).astype(np.float64)
        base_k = base[-1] + first_displacement
        base_k[walls] = base[0][walls]
        mse = float(np.mean(np.square(pos[moving].astype(np.float64) - true_k[moving])))
        base_mse = float(np.mean(np.square(base_k[moving].astype(np.float64) - true_k[moving])))
        pred.append(pos.copy())
        truth.append(true_k.astype(np_dtype))
        base.append(base_k)
        out_vel.append((displacement * store_per_displacement).astype(np.float32))
        result.mse.append(mse)
        result.baseline_mse.append(base_mse)
        if result.cut_fraction is not None:
            result.cut_fraction.append(float(np.mean(cuts)))
        bar.set_postfix(step=k, mse=f"{mse:.4g}", const_vel=f"{base_mse:.4g}")
    bar.close()
    result.pred, result.truth, result.baseline = np.stack(pred), np.stack(truth), np.stack(base)
    result.vel = np.stack(out_vel)
    return result
