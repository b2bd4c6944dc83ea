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
  velocity input is zero from step 2 on), as the trainer does, and they are left out of every MSE. A run
  trained with ``dataset.unwired_walls=drop`` gets, at every step, only the walls its graph's edges touch.
* **Containment** (``contain``, off by default): every step, after the model, the moving nodes outside their
  container are put back on its nearest point (:func:`container_box`: an SPH store's box, less one particle
  radius, where the simulator's fluid stays), so the velocity fed next loses the outward part at the face, as
  an inelastic wall. It is a constraint laid over the model, not something the model learned: a contained
  rollout answers what the model does where it stays inside, and ``contained_share`` (of the moving nodes,
  moved back by that step) says how often it had to hold one. Constant velocity, the reference, is held
  inside the same box after each step's move v_0, so both are scored under the same constraint. On the small
  fluid, where every unconstrained rollout diverged from particles that had left the box, the contained ones
  ran all 73 frames holding 0.06-2 % of the fluid per step on average (docs/results/README.md).
* **Ground truth** of step k is the stored frame t0 + k·Δt. The rollout stops early, and says so, when a
  trajectory ends before K steps (``Rollout.stopped``), or when predictions become NaN/Inf, or when a scene's
  predicted moving nodes spread more than :data:`SPREAD_LIMIT` times as far from their centroid as the true
  ones (a fluid thrown kilometres out of a 10 m box: seen one step before a non-finite step, at a spread of
  1.5e22, which the last written frame then showed instead of the last meaningful one), or, for a radius
  graph without ``dataset.max_neighbors``, when a scene's graph grows past :data:`EDGE_GROWTH_LIMIT` times the
  edges of its first step: a model that piles the particles together (seen on an under-trained fluid model:
  0.13M edges at step 1, 57M at step 6, 13 GB) would otherwise exhaust memory on graphs that mean nothing.
  With the cap the graph is bounded (n · (max_neighbors + wall_neighbors) edges) and the rollout goes on;
  ``edges_per_node`` (edges the moving nodes receive, per moving node, of every step's graph) shows any
  piling up. The steps before a stop are kept and scored. A stop also names the moving node that moved
  farthest in the last kept step when it moved over :data:`RUNAWAY_FACTOR` times the median moving node, with
  the step since which it is outside its scene's walls: with virtual nodes, which hear every particle, one
  runaway makes a whole scene non-finite a step later, and "NaN at 2,002 nodes" would hide where it began
  (measured on the small fluid: every late divergence began with a particle that had left the box at the impact,
  docs/results/README.md).
* **Spread**: ``spread_ratio`` of a step is the RMS distance of a scene's predicted moving nodes from their
  centroid over the same of the truth, mean over scenes: 1 keeps the fluid's extent, below 1 the prediction
  contracts. A model trained on one-step MSE over a long task step learns the mean of what may happen and
  contracts; fed back, the contraction compounds and a rollout can stay below constant velocity while the
  fluid has collapsed into a ball (measured on water3d_like, docs/results/README.md).
* **Outside the walls**: ``outside_share`` of a step is the share of a scene's predicted moving nodes outside
  the axis-aligned box of its wall particles, mean over the scenes that have walls (NaN without any). The
  spread alone misses a fluid that falls through the floor as one block (its extent stays near the truth's;
  seen on a water3d_like model with a 0.2 s task step). The box is that of the stored walls: with
  ``wall_reach`` only those the fluid ever came near are stored, so its top is the fluid's highest reach.
* **Input velocity gap**: a run trained on the stored velocities (``dataset.input_velocity=stored``) is fed,
  from step 2 on, its last displacement per task step instead, and the two differ even on the true
  trajectories: under a constant acceleration a the stored v(t) is the velocity at the end of the step, the
  displacement's the mean over it, a·Δt·dt/2 lower (measured on the small SPH fluid at one frame per step: the
  rollouts fall at 5-6 m/s² instead of 9.81, docs/results/README.md). ``velocity_gap`` is the RMS of the
  difference over the RMS of the stored velocity, at the input frame of step 2 on the true frames (the moving
  nodes of every chosen scene); None for a displacement-trained run, a one-step rollout or fluid at rest.
* **Constant velocity**, the reference beside every step's MSE, on the same nodes: x_{k+1} = x_k + v_0,
  with v_0 the initial velocity as displacement per task step (v · Δt · dt from the store's unit); with
  ``contain``, x_{k+1} is held inside the container as the predictions are.

MSE of a step: mean over every moving node and coordinate of every scene, as the trainer's evaluation.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import zarr
from omegaconf import DictConfig
from tqdm.auto import tqdm

from dist_egnn.datasets.graphs import (
    drop_longest_edges,
    drop_unwired_walls,
    edge_features,
    graph_edges,
    node_features,
    part_graphs,
    up_of,
)
from dist_egnn.datasets.loader import GraphBatch, GraphSample, collate, task_gravity, velocity_scale
from dist_egnn.datasets.sph import box_corners
from dist_egnn.datasets.store import StoreInfo
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.keys import SPLITS
from dist_egnn.partitioners.strategies import partition
from dist_egnn.partitioners.subgraphs import split_graph

WALL_SCALAR = "type"          # node scalar marking particle kinds; WALL_TYPE never moves (issue 17)
WALL_TYPE = 1
EDGE_GROWTH_LIMIT = 10        # a scene's graph beyond this many times its first step's edges: the rollout stops
SPREAD_LIMIT = 1e3            # a scene's predicted extent beyond this many times the true one: the rollout stops
VELOCITY_GAP_NOTE = 0.01      # launch/predict.py names an input velocity gap of this share of the velocity or more
RUNAWAY_FACTOR = 10.0         # a stop names a moving node whose last step passed this many times the median one's
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
    wall_neighbors: int
    wall_neighbors_reach: float | None
    node_features: tuple[str, ...]
    edge_features: tuple[str, ...]
    scalar_names: tuple[str, ...]
    up: tuple[float, float, float] | None = None   # against dataset.gravity (height_per_radius); None: no field
    unwired_walls: str = "keep"                    # drop: walls no edge touches leave the step's graph

    @classmethod
    def of(cls, cfg: DictConfig, info: StoreInfo) -> "GraphRecipe":
        """The recipe of a run's configuration on a store (radius None: the store's own, as the loader does)."""
        d = cfg.dataset
        radius = info.attrs.get("radius") if d.get("radius") is None else d.radius
        # the loader's direction, from the same float32 field in the task's units, so the columns agree bit for bit
        up = up_of(task_gravity(d.get("gravity"), d.get("velocity_unit", "store"), d.delta_t, info.attrs["dt"]))
        up = None if up is None else tuple(float(c) for c in up)
        return cls(radius=radius, max_neighbors=d.get("max_neighbors"),
                   cutoff_rate=float(cfg.model.get("cutoff_rate", 0.0)),
                   wall_neighbors=int(d.get("wall_neighbors", 0) or 0),
                   wall_neighbors_reach=d.get("wall_neighbors_reach"),
                   node_features=tuple(d.node_features), edge_features=tuple(d.edge_features),
                   scalar_names=tuple(info.node_scalars), up=up,
                   unwired_walls=d.get("unwired_walls", "keep"))


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
    """One scene's graph at one step: what ``collate`` needs, plus the step's cut fraction (P > 1) and the
    scene's nodes it holds (``kept``, ids in the scene; None: every node)."""

    edge_index: np.ndarray
    edge_attr: np.ndarray
    node_features: np.ndarray
    cut_fraction: float | None = None
    kept: np.ndarray | None = None


def build_graph(pos: np.ndarray, vel: np.ndarray, scalars: np.ndarray, recipe: GraphRecipe,
                parts: Parts = Parts()) -> StepGraph:
    """The graph and features of one scene at positions ``pos`` and velocities ``vel`` (training units).

    P = 1: exactly ``TrajectoryDataset.make_sample``'s graph. P > 1: the current positions are partitioned
    and the parts' edges united (see the module docstring). With ``recipe.unwired_walls`` = drop, the walls
    none of those edges touches are left out (``kept``), as the loader leaves them out.
    """
    names = list(recipe.scalar_names)
    walls = scalars[:, names.index(WALL_SCALAR)] == WALL_TYPE if WALL_SCALAR in names else None
    whole = graph_edges(pos, recipe.radius, recipe.max_neighbors, walls, recipe.wall_neighbors,  # no wall -> wall
                        recipe.wall_neighbors_reach)
    cut = None
    if parts.parts == 1:
        edges = drop_longest_edges(whole, pos, recipe.cutoff_rate)
    else:
        edges, cut = partitioned_edges(pos, whole, recipe.cutoff_rate, parts, recipe, walls)
    kept = None
    if recipe.unwired_walls == "drop":
        edges, kept, (pos, vel, scalars) = drop_unwired_walls(edges, walls, pos, vel, scalars)
    return StepGraph(edge_index=edges,
                     edge_attr=edge_features(list(recipe.edge_features), edges, pos, scalars, names, vel,
                                             recipe.radius, None if recipe.up is None else np.asarray(recipe.up)),
                     node_features=node_features(list(recipe.node_features), vel, scalars, names),
                     cut_fraction=cut, kept=kept)


def partitioned_edges(pos: np.ndarray, whole: np.ndarray, cutoff_rate: float, parts: Parts,
                      recipe: GraphRecipe | None = None, walls: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The edges the P parts of this step's partition receive, in global ids, and the step's cut fraction.

    The partition is computed from ``pos`` (the current positions) on the whole graph ``whole``. Exact mode:
    every part keeps the edges its owned nodes receive (halo senders included), the union is the whole
    graph and edge dropping takes the global threshold. Drop mode: edges inside a part only, each part
    dropping its own longest (``training.rank_data.RankData.sequential_edges``); with ``recipe.wall_neighbors``
    each part's own graph (``datasets.graphs.part_graphs``: its nodes' nearest walls in the part).
    """
    if parts.parts > len(pos):
        raise RolloutError(f"parts={parts.parts} is more than the {len(pos)} nodes of a scene: use at most "
                           f"{len(pos)} parts")
    split = partition(pos, parts.parts, parts.method, seed=parts.seed, edge_index=whole, allow_duplicates=True,
                      walls=walls)                   # with walls: parts of equal work, as the stored ones
    pieces = split_graph(whole, split.assignment, parts.parts, halo=parts.halo == "exact")
    if parts.halo == "exact":
        ids = np.sort(np.concatenate([p.edge_ids for p in pieces]))
        edges = drop_longest_edges(whole[:, ids], pos, cutoff_rate)
    elif recipe is not None and recipe.wall_neighbors:
        graphs = part_graphs(pos, split.assignment, parts.parts, recipe.radius, recipe.max_neighbors, walls,
                             recipe.wall_neighbors, recipe.wall_neighbors_reach)
        edges = np.concatenate([drop_longest_edges(g, pos, cutoff_rate) for g in graphs], axis=1)
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
    walls. ``mse``/``baseline_mse``/``edges_per_node``/``spread_ratio``/``outside_share``/``cut_fraction``: one
    entry per step.
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
    edges_per_node: list[float] = field(default_factory=list)
    spread_ratio: list[float] = field(default_factory=list)
    outside_share: list[float] = field(default_factory=list)
    cut_fraction: list[float] | None = None
    contained_share: list[float] | None = None     # contain=True: share of the moving nodes moved back per step
    stopped: str | None = None
    velocity_gap: float | None = None

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

    The per-graph inputs travel on the batch as in training: ``gravity`` (B, 3), the run's ``dataset.gravity``
    in the task's units (``datasets.loader.task_gravity``, put on every sample by :func:`predict_step`), and
    the walls' ``moving`` mask.
    """
    return graph.model_inputs()


@dataclass
class RolloutPlan:
    """What a rollout covers: the chosen scenes of ``split`` from input frame ``start``, ``todo`` of the
    ``requested`` steps of ``delta_t`` frames (fewer when the trajectory ends first: ``stopped`` says so), the
    scenes grouped ``batches`` (indices into ``scenes``) per forward."""

    split: str
    start: int
    delta_t: int
    requested: int
    todo: int
    scenes: list[int]
    batches: list[list[int]]
    stopped: str | None


@dataclass
class RolloutState:
    """The chosen scenes' nodes concatenated (``ptr``): the current inputs (``pos`` in the model's dtype, ``vel``
    in the training units), what stays fixed, and the trajectories kept so far (one entry per step)."""

    read: Callable[[str, int], np.ndarray]    # read(name, t): stored array ``name`` of the chosen scenes at frame t
    ptr: np.ndarray
    scalars: np.ndarray
    moving: np.ndarray
    typed: bool                               # the store marks walls (``type``): the model gets ``moving``
    gravity: np.ndarray | None                # (3,) dataset.gravity in the task's units; None: no field
    pos: np.ndarray
    vel: np.ndarray
    first_displacement: np.ndarray            # v_0 as displacement per task step (the constant-velocity reference)
    pred: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    base: list[np.ndarray] = field(default_factory=list)
    out_vel: list[np.ndarray] = field(default_factory=list)
    first_edges: dict[int, int] = field(default_factory=dict)   # per batch member: edges of its step-1 graph

    @property
    def walls(self) -> np.ndarray:
        return ~self.moving


def rollout(model: Callable[..., Any], cfg: DictConfig, info: StoreInfo, split: str, steps: int, *,
            start: int | None = None, scenes: int | None = None, scene_ids: Sequence[int] | None = None,
            batch_size: int | None = None, parts: Parts = Parts(), device: str | torch.device = "cpu",
            dtype: torch.dtype = torch.float32, progress: bool = False, contain: bool = False) -> Rollout:
    """Roll ``model`` out ``steps`` task steps on ``split`` of the store ``info``; see the module docstring.

    Args:
        model: called as in training, ``model(**graph.model_inputs())`` -> an object with ``.pos`` (N, 3).
        cfg: the run's configuration (``dataset`` recipe and ``model.cutoff_rate``), e.g. ``model.config``.
        info: the opened store (``datasets.store.open_store``).
        steps: K >= 1. start: input frame t0 (None: :func:`first_input_frame`). scenes: the first this many
            scenes of the split (None: all); scene_ids: these scenes by index instead (not with ``scenes``).
            batch_size: scenes per forward (None: ``trainer.eval_batch_size``).
        parts: P parts per step (see :class:`Parts`). dtype: the model's dtype (the state is kept in it).
        contain: hold the moving nodes inside the store's container every step (:func:`container_box`).
    """
    plan = plan_rollout(cfg, info, split, steps, start, scenes, batch_size, parts, scene_ids)
    box = container_box(info) if contain else None
    recipe = GraphRecipe.of(cfg, info)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    state = initial_state(cfg, info, plan, np_dtype)
    result = Rollout(split=split, start=plan.start, delta_t=plan.delta_t, requested=steps, scenes=plan.scenes,
                     scene_ptr=state.ptr, pred=None, vel=None, truth=None, baseline=None, scalars=state.scalars,
                     moving=state.moving, cut_fraction=[] if parts.parts > 1 else None,
                     contained_share=[] if contain else None, stopped=plan.stopped)
    bar = tqdm(total=plan.todo * len(plan.batches), desc="rollout", unit="batch", disable=not progress)
    model_eval = getattr(model, "eval", None)
    if callable(model_eval):
        model_eval()
    scale, per_displacement = displacement_factor(cfg, info)
    result.velocity_gap = velocity_gap(cfg, state, plan, scale, per_displacement)
    for k in range(1, plan.todo + 1):
        try:
            new_pos, cuts, received = predict_step(model, cfg, state, plan, recipe, parts, k, device, dtype, bar)
            new_pos[state.walls] = state.pos[state.walls]
            check_finite(new_pos, k)
            held = None if box is None else hold_inside(new_pos, state.moving, box)
            truth = state.read("pos", plan.start + k * plan.delta_t).astype(np.float64)
            check_spread(new_pos, truth, state.moving, state.ptr, plan.scenes, k)
        except Diverged as diverged:
            result.stopped = (f"stopped after {k - 1} of {steps} steps: {diverged}"
                              f"{runaway(state.pred, state.moving, state.ptr, plan.scenes, recipe)}")
            break
        advance(state, new_pos, truth, per_displacement, store_step_time(info, plan), box)
        record_errors(result, state, truth, cuts, received)
        if held is not None:
            result.contained_share.append(held)
        bar.set_postfix(step=k, mse=f"{result.mse[-1]:.4g}", const_vel=f"{result.baseline_mse[-1]:.4g}")
    bar.close()
    result.pred, result.truth, result.baseline = np.stack(state.pred), np.stack(state.truth), np.stack(state.base)
    result.vel = np.stack(state.out_vel)
    return result


def container_box(info: StoreInfo) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) corners of where a particle's centre may lie in the store's container: an SPH store's box
    [−w/2, w/2] × [0, h] × [−d/2, d/2] (``datasets/sph.py``, ``generator.box``) shrunk by one particle radius, as
    the simulator keeps its fluid one radius or more inside the wall particles on the faces. A store that records
    no container (N-body, MD, converted GNS sets) gets a :class:`RolloutError`: the wall particles' own box would
    be the truth's highest reach where the walls were cut to those the fluid came near (``wall_reach``)."""
    generator = info.attrs.get("generator") or {}
    if info.attrs.get("source") != "sph" or "box" not in generator or "particle_radius" not in generator:
        raise RolloutError(f"contain=true holds the fluid inside its container, which only SPH stores record "
                           f"(generator.box and generator.particle_radius); {info.path} (source "
                           f"{info.attrs.get('source')!r}) records none: leave contain out")
    lower, upper = box_corners(generator["box"])
    radius = float(generator["particle_radius"])
    return lower + radius, upper - radius


def hold_inside(pos: np.ndarray, moving: np.ndarray, box: tuple[np.ndarray, np.ndarray]) -> float:
    """Put the moving nodes of ``pos`` (N, 3, changed in place) outside ``box`` (:func:`container_box`) on its
    nearest point; returns the share of the moving nodes it moved."""
    lower, upper = (b.astype(pos.dtype) for b in box)
    inside = np.clip(pos[moving], lower, upper)
    moved = np.any(inside != pos[moving], axis=1)
    pos[moving] = inside
    return float(moved.mean()) if len(moved) else 0.0


def first_input_frame(cfg: DictConfig) -> int:
    """The first input frame training used: ``dataset.frame_start``, and not before ``delta_t`` with
    ``dataset.input_velocity=displacement`` (whose velocity needs the frame a task step earlier)."""
    d = cfg.dataset
    start = int(d.get("frame_start", 0))
    return max(start, int(d.delta_t)) if d.get("input_velocity", "stored") == "displacement" else start


def plan_rollout(cfg: DictConfig, info: StoreInfo, split: str, steps: int, start: int | None, scenes: int | None,
                 batch_size: int | None, parts: Parts, scene_ids: Sequence[int] | None = None) -> RolloutPlan:
    """Check the request and resolve its defaults from the run's configuration (see :func:`rollout`)."""
    if steps < 1:
        raise RolloutError(f"steps={steps}: a rollout needs at least one step; set steps=K with K >= 1")
    parts.check()
    d = cfg.dataset
    delta_t = int(d.delta_t)
    start = first_input_frame(cfg) if start is None else int(start)
    check_start(info, split, start, delta_t)
    if d.get("input_velocity", "stored") == "displacement" and start < delta_t:
        raise RolloutError(f"start={start}: the run was trained with dataset.input_velocity=displacement, whose input "
                           f"velocity at frame t is the displacement since frame t - {delta_t}; start at frame "
                           f"{delta_t} or later")
    meta = info.splits[split]
    if scenes is not None and scene_ids is not None:
        raise RolloutError(f"scenes={scenes} and scene_ids={list(scene_ids)}: give one of them (the first scenes, "
                           f"or these)")
    if scenes is not None and not 1 <= scenes <= meta.num_scenes:
        raise RolloutError(f"scenes={scenes}: {info.path}/{split} has {meta.num_scenes} scenes; choose 1 to "
                           f"{meta.num_scenes}, or leave scenes out for all of them")
    chosen = list(range(meta.num_scenes))[:scenes] if scene_ids is None else chosen_scenes(info, split, scene_ids)
    batch_size = int(batch_size or cfg.trainer.get("eval_batch_size", 1) or 1)
    available = available_steps(info, split, start, delta_t)
    todo = min(steps, available)
    stopped = None
    if todo < steps:
        stopped = (f"stopped after {todo} of {steps} steps: {info.path}/{split} ends at frame {meta.num_frames - 1}, "
                   f"so input frame {start} has ground truth for {available} steps of {delta_t} frames")
    batches = [list(range(i, min(i + batch_size, len(chosen)))) for i in range(0, len(chosen), batch_size)]
    return RolloutPlan(split=split, start=start, delta_t=delta_t, requested=steps, todo=todo, scenes=chosen,
                       batches=batches, stopped=stopped)


def chosen_scenes(info: StoreInfo, split: str, scene_ids: Sequence[int]) -> list[int]:
    """``scene_ids`` checked against the split: distinct indices of its scenes."""
    count = info.splits[split].num_scenes
    ids = [int(i) for i in scene_ids]
    bad = [i for i in ids if not 0 <= i < count]
    if not ids or bad or len(set(ids)) < len(ids):
        what = "is empty" if not ids else (f"names {bad}" if bad else "repeats a scene")
        raise RolloutError(f"scene_ids={ids} {what}: {info.path}/{split} has scenes 0 to {count - 1}; give distinct "
                           f"indices among them, or leave scene_ids out for all of them")
    return ids


def initial_state(cfg: DictConfig, info: StoreInfo, plan: RolloutPlan, np_dtype) -> RolloutState:
    """The stored state of the chosen scenes at the input frame, as the loader feeds it (step 0 of every
    trajectory); a :class:`RolloutError` when every node is a wall."""
    meta = info.splits[plan.split]
    group = zarr.open_group(str(info.path), mode="r")[plan.split]
    slices = [meta.scene_nodes(s) for s in plan.scenes]
    sizes = np.array([sl.stop - sl.start for sl in slices])
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def read(name: str, t: int) -> np.ndarray:
        return np.concatenate([np.asarray(group[name][t, sl]) for sl in slices])

    scalars = np.concatenate([np.asarray(group["node_scalars"][sl]) for sl in slices]).astype(np.float32)
    typed = WALL_SCALAR in info.node_scalars       # the model gets the walls mask as the loader gives it
    moving = np.ones(len(scalars), dtype=bool)
    if typed:
        moving = scalars[:, info.node_scalars.index(WALL_SCALAR)] != WALL_TYPE
    if not moving.any():
        raise RolloutError(f"{info.path}/{plan.split}: every node of the chosen scenes is a wall ({WALL_SCALAR}="
                           f"{WALL_TYPE}); there is nothing to predict: choose other scenes or another store")
    d = cfg.dataset
    unit = d.get("velocity_unit", "store")
    scale, per_displacement = displacement_factor(cfg, info)
    stored_vel = read("vel", plan.start)
    if d.get("input_velocity", "stored") == "displacement":      # as the loader computes it (float32)
        moved = read("pos", plan.start) - read("pos", plan.start - plan.delta_t)
        stored_vel = (moved * np.float32(per_displacement)).astype(np.float32)
    elif scale != 1.0:                                 # exactly as the loader scales (float32)
        stored_vel = (stored_vel * np.float32(scale)).astype(np.float32)
    pos = read("pos", plan.start).astype(np_dtype)
    vel = stored_vel.astype(np_dtype)                  # step 1 sees what the loader feeds (walls included)
    return RolloutState(read=read, ptr=ptr, scalars=scalars, moving=moving, typed=typed,
                        gravity=task_gravity(d.get("gravity"), unit, plan.delta_t, info.attrs["dt"]),
                        pos=pos, vel=vel, first_displacement=vel / np_dtype(per_displacement),
                        pred=[pos.copy()], truth=[pos.copy()], base=[pos.copy()],
                        out_vel=[read("vel", plan.start).astype(np.float32)])


def velocity_gap(cfg: DictConfig, state: RolloutState, plan: RolloutPlan, scale: float,
                 per_displacement: float) -> float | None:
    """How far the velocity a rollout feeds from step 2 on is from the one a stored-velocity run was trained on,
    on the true frames: RMS of (x(t1) - x(t0)) · per_displacement - v(t1) · scale over the moving nodes, over
    the RMS of v(t1) · scale, t1 = t0 + Δt (both in the training units); see the module docstring."""
    if cfg.dataset.get("input_velocity", "stored") != "stored" or plan.todo < 2:
        return None
    t1 = plan.start + plan.delta_t
    moved = state.read("pos", t1).astype(np.float64) - state.read("pos", plan.start)
    fed = moved[state.moving] * per_displacement
    trained = state.read("vel", t1)[state.moving].astype(np.float64) * scale
    size = np.sqrt(np.mean(np.sum(np.square(trained), axis=1)))
    if size == 0.0:
        return None
    return float(np.sqrt(np.mean(np.sum(np.square(fed - trained), axis=1))) / size)


def velocity_gap_note(gap: float | None, frame: int) -> str | None:
    """The line ``launch/predict.py`` prints for a gap of at least :data:`VELOCITY_GAP_NOTE`; else None."""
    if gap is None or gap < VELOCITY_GAP_NOTE:
        return None
    return (f"from step 2 the model is fed its last displacement as the velocity, which on the true frames differs "
            f"from the stored velocity it was trained on by {gap:.1%} RMS (frame {frame}; under an acceleration g it "
            f"lags the stored one by g·Δt·dt/2, so a rolled-out fluid falls with less than g): train with "
            f"dataset.input_velocity=displacement to be fed in a rollout what training fed")


def predict_step(model: Callable[..., Any], cfg: DictConfig, state: RolloutState, plan: RolloutPlan,
                 recipe: GraphRecipe, parts: Parts, k: int, device, dtype: torch.dtype,
                 bar) -> tuple[np.ndarray, list, int]:
    """Step k: every batch of scenes' graph built at the current state and the model's positions (N, 3) (walls
    as the model returned them), with the cut fraction of every scene's partition (P > 1; else empty) and the
    edges the moving nodes received."""
    new_pos = state.pos.copy()                        # a wall left out of a graph (unwired) stays where it is
    cuts, received = [], 0
    ptr = state.ptr
    for members in plan.batches:
        samples, rows = [], []
        for b in members:
            sl = slice(ptr[b], ptr[b + 1])
            g = build_graph(state.pos[sl], state.vel[sl], state.scalars[sl], recipe, parts)
            if recipe.max_neighbors is None:          # with a cap the graph cannot outgrow memory
                check_growth(state.first_edges, b, g.edge_index.shape[1], plan.scenes[b], k)
            at = np.arange(ptr[b], ptr[b + 1]) if g.kept is None else ptr[b] + g.kept    # the graph's rows
            received += int(state.moving[at][g.edge_index[0]].sum())
            if g.cut_fraction is not None:
                cuts.append(g.cut_fraction)
            samples.append(GraphSample(pos=state.pos[at], vel=state.vel[at], target=state.pos[at],
                                       node_features=g.node_features, edge_index=g.edge_index, edge_attr=g.edge_attr,
                                       scene=plan.scenes[b], frame=plan.start + (k - 1) * plan.delta_t,
                                       moving=state.moving[at] if state.typed else None, gravity=state.gravity))
            rows.append(at)
        graph = collate(samples).to(device, dtype)
        with torch.no_grad():
            out = model(**model_inputs(graph, cfg))
        new_pos[np.concatenate(rows)] = out.pos.detach().to("cpu", dtype).numpy()
        bar.update(1)
    return new_pos, cuts, received


class Diverged(Exception):
    """A step's predictions mean nothing any more: NaN/Inf, its graph grew past EDGE_GROWTH_LIMIT times its first
    step's (the particles piled together) or its extent past SPREAD_LIMIT times the truth's (they flew apart). The
    rollout stops there and keeps the steps before (not an input error)."""


def check_growth(first_edges: dict[int, int], b: int, edges: int, scene: int, k: int) -> None:
    """Remember scene ``b``'s edges at step 1; at a later step, stop the rollout when they exceed
    :data:`EDGE_GROWTH_LIMIT` times that."""
    first = first_edges.setdefault(b, edges)
    if edges > EDGE_GROWTH_LIMIT * max(first, 1):
        raise Diverged(
            f"the graph of step {k} of scene {scene} has {edges:,} edges, {edges / max(first, 1):.0f}x its first "
            f"step's {first:,} (limit {EDGE_GROWTH_LIMIT}x): the predicted particles piled together (the model "
            f"diverged); denser graphs would only exhaust memory")


def check_finite(pred: np.ndarray, k: int) -> None:
    """Stop the rollout at step ``k`` when its predictions hold NaN or Inf."""
    if not np.all(np.isfinite(pred)):
        bad = int((~np.isfinite(pred).all(axis=1)).sum())
        raise Diverged(f"the predictions of step {k} hold NaN or Inf at {bad} nodes (the model diverged)")


def check_spread(pred: np.ndarray, truth: np.ndarray, moving: np.ndarray, ptr: np.ndarray, scenes: list[int],
                 k: int) -> None:
    """Stop the rollout at step ``k`` when a scene's predicted moving nodes spread more than
    :data:`SPREAD_LIMIT` times as far as the true ones (:func:`spread_ratio` of that scene alone)."""
    for b, (lo, hi) in enumerate(zip(ptr[:-1], ptr[1:])):
        ratio = spread_ratio(pred[lo:hi], truth[lo:hi], moving[lo:hi], np.array([0, hi - lo]))
        if ratio > SPREAD_LIMIT:
            raise Diverged(f"the predictions of step {k} of scene {scenes[b]} spread {ratio:.3g} times as far as the "
                           f"true particles (limit {SPREAD_LIMIT:g}x): the predicted particles flew apart (the "
                           f"model diverged)")


def runaway(frames: list[np.ndarray], moving: np.ndarray, ptr: np.ndarray, scenes: list[int],
            recipe: GraphRecipe | None = None) -> str:
    """What a stop adds about where it began: the moving node that moved farthest between the last two kept
    ``frames`` (positions (N, 3) from the start frame on), when that is over :data:`RUNAWAY_FACTOR` times the
    median moving node's move, with the step since which it has been outside its scene's walls (their
    axis-aligned box, :func:`within_walls`); "" when no node ran away or fewer than two frames were kept.
    Outside the walls with unbounded nearest-wall edges (``recipe``), it also names the bound: such a particle
    hears walls farther than any training graph held, how every late divergence of the small fluid began."""
    if len(frames) < 2 or not moving.any():
        return ""
    moved = np.where(moving, np.linalg.norm(frames[-1].astype(np.float64) - frames[-2], axis=1), -1.0)
    node, median = int(np.argmax(moved)), float(np.median(moved[moving]))
    if not moved[node] > RUNAWAY_FACTOR * median:
        return ""
    b = int(np.searchsorted(ptr, node, side="right")) - 1
    text = (f"; before it, node {node - ptr[b]} of scene {scenes[b]} moved {moved[node]:.3g} in step "
            f"{len(frames) - 1} (the moving nodes' median: {median:.3g})")
    walls = frames[0][ptr[b]:ptr[b + 1]][~moving[ptr[b]:ptr[b + 1]]]
    if len(walls):
        inside = within_walls(np.stack([f[node] for f in frames]), walls)
        if not inside[-1]:
            since = max((j for j, v in enumerate(inside) if v), default=-1) + 1
            text += f", outside its scene's walls since step {since}" if since else ", outside its scene's walls"
            if recipe is not None and recipe.wall_neighbors and recipe.wall_neighbors_reach is None:
                text += (f", still wired to its {recipe.wall_neighbors} nearest walls however far (bound them with "
                         f"wall_neighbors_reach=R just above the training graphs' longest: python -m "
                         f"dist_egnn.measure.reach STORE --wall-neighbors {recipe.wall_neighbors})")
    return text


def store_step_time(info: StoreInfo, plan: RolloutPlan) -> float:
    """Store velocity units per unit of displacement per task step: 1 / (Δt · dt)."""
    return 1.0 / (float(plan.delta_t) * float(info.attrs["dt"]))


def advance(state: RolloutState, new_pos: np.ndarray, truth: np.ndarray, per_displacement: float,
            store_per_displacement: float, box: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Feed the step's predictions back: the next inputs (velocity from the displacement, in training units)
    and the step's entries of the trajectories (prediction, ``truth`` (N, 3), constant velocity, held inside
    ``box`` as the prediction was when the rollout is contained)."""
    np_dtype = state.pos.dtype.type
    displacement = new_pos - state.pos
    state.vel = displacement * np_dtype(per_displacement)
    state.pos = new_pos
    base_k = state.base[-1] + state.first_displacement
    base_k[state.walls] = state.base[0][state.walls]
    if box is not None:                               # the reference gets the constraint the prediction got
        hold_inside(base_k, state.moving, box)
    state.pred.append(new_pos.copy())
    state.truth.append(truth.astype(np_dtype))
    state.base.append(base_k)
    state.out_vel.append((displacement * store_per_displacement).astype(np.float32))


def record_errors(result: Rollout, state: RolloutState, truth: np.ndarray, cuts: list[float],
                  received: int = 0) -> None:
    """The step just advanced: the MSE over the moving nodes of the prediction and of constant velocity against
    ``truth`` (N, 3) float64, the edges its graph gave each moving node (``received`` in all), and the mean
    cut fraction of its partitions (P > 1)."""
    moving = state.moving
    result.edges_per_node.append(received / max(int(moving.sum()), 1))
    result.spread_ratio.append(spread_ratio(state.pos, truth, moving, state.ptr))
    result.outside_share.append(outside_share(state.pos, moving, state.ptr))
    result.mse.append(float(np.mean(np.square(state.pos[moving].astype(np.float64) - truth[moving]))))
    result.baseline_mse.append(float(np.mean(np.square(state.base[-1][moving].astype(np.float64) - truth[moving]))))
    if result.cut_fraction is not None:
        result.cut_fraction.append(float(np.mean(cuts)))


def spread_ratio(pred: np.ndarray, truth: np.ndarray, moving: np.ndarray, ptr: np.ndarray) -> float:
    """Mean over scenes (``ptr``) of the RMS distance of the predicted moving nodes from their centroid over the
    same of ``truth``: below 1 the prediction contracts (NaN when no scene has a spread truth)."""
    ratios = []
    for a, b in zip(ptr[:-1], ptr[1:]):
        m = moving[a:b]
        p, t = pred[a:b][m].astype(np.float64), truth[a:b][m].astype(np.float64)
        true_spread = np.sqrt(np.mean(np.sum(np.square(t - t.mean(axis=0)), axis=1))) if len(t) else 0.0
        if true_spread > 0:
            ratios.append(np.sqrt(np.mean(np.sum(np.square(p - p.mean(axis=0)), axis=1))) / true_spread)
    return float(np.mean(ratios)) if ratios else float("nan")


def outside_share(pred: np.ndarray, moving: np.ndarray, ptr: np.ndarray) -> float:
    """Mean over the scenes (``ptr``) that have walls of the share of their predicted moving nodes outside the
    axis-aligned box of their wall particles (walls never move, so ``pred`` holds them as stored); NaN when no
    scene has walls or moving nodes."""
    shares = []
    for a, b in zip(ptr[:-1], ptr[1:]):
        m = moving[a:b]
        walls, fluid = pred[a:b][~m], pred[a:b][m]
        if len(walls) and len(fluid):
            shares.append(1.0 - float(within_walls(fluid, walls).mean()))
    return float(np.mean(shares)) if shares else float("nan")


def within_walls(points: np.ndarray, walls: np.ndarray) -> np.ndarray:
    """Which of ``points`` (M, 3) lie in the axis-aligned box of the wall particles ``walls`` (W, 3): (M,) bool."""
    return np.all((points >= walls.min(axis=0)) & (points <= walls.max(axis=0)), axis=1)
