"""Samples and batches from a store: frame t of a scene -> frame t + Δt, read lazily through dask.

A sample is one (scene, frame t) pair: inputs are positions, velocities and features at t, the target is
the positions at t + Δt. Walls (node scalar ``type`` = 1, ``datasets.store``) are part of every graph as
senders and receivers of messages to and from moving nodes (no edge joins two walls: ``datasets.graphs``),
but are never scored: ``moving`` marks the nodes the loss and the
metrics see (None: every node, a store without ``type``). Only the slices a batch needs are read
(``pos[t, a:b]``, ``pos[t + Δt, a:b]``, ``vel[t, a:b]``), all of a batch's slices in one dask computation,
so memory is bounded by the chunks those slices touch, not by the length of the dataset.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Iterator

import dask
import dask.array as da
import numpy as np
import torch
import zarr
from scipy.spatial import cKDTree

from dist_egnn.datasets.graphs import (
    FIELD_EDGE_FEATURES,
    RADIUS_EDGE_FEATURES,
    VELOCITY_EDGE_FEATURES,
    drop_longest_edges,
    drop_unwired_walls,
    edge_features,
    graph_edges,
    node_features,
    up_of,
)
from dist_egnn.datasets.md import trivial_target
from dist_egnn.datasets.store import WALL, StoreError, StoreInfo
from dist_egnn.errors import ConfigError


@dataclass
class GraphSample:
    """One graph, NumPy arrays: pos/vel/target (n, 3), node_features (n, F), edge_index (2, E), edge_attr (E, D),
    moving (n,) bool or None (every node moves)."""

    pos: np.ndarray
    vel: np.ndarray
    target: np.ndarray
    node_features: np.ndarray
    edge_index: np.ndarray
    edge_attr: np.ndarray
    scene: int
    frame: int
    moving: np.ndarray | None = None
    gravity: np.ndarray | None = None   # (3,) the external field in the task's units; None: none


@dataclass
class PartArrays:
    """Some nodes of one sample: (n, 3)/(n, K) arrays of the nodes a rank owns, and of its halo (input only)."""

    pos: np.ndarray
    vel: np.ndarray
    target: np.ndarray
    scalars: np.ndarray
    halo_pos: np.ndarray
    halo_scalars: np.ndarray
    scene: int
    frame: int
    halo_vel: np.ndarray | None = None  # read only when an edge feature needs velocities (radial_velocity)


@dataclass
class GraphBatch:
    """B graphs concatenated into one disconnected graph, as torch tensors; see ``dist_egnn.keys``."""

    node_features: torch.Tensor   # (N, F)
    pos: torch.Tensor             # (N, 3)
    vel: torch.Tensor             # (N, 3)
    target: torch.Tensor          # (N, 3)
    edge_index: torch.Tensor      # (2, E), receivers in row 0, offsets applied
    edge_attr: torch.Tensor       # (E, D)
    batch: torch.Tensor           # (N,)
    num_graphs: int
    moving: torch.Tensor | None = None   # (N,) bool: not a wall (scored, moved); None: every node
    gravity: torch.Tensor | None = None  # (B, 3) external field per graph, task units (task_gravity); None: none

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "GraphBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device)
                if dtype is not None and value.is_floating_point():
                    value = value.to(dtype)
            moved[f.name] = value
        return GraphBatch(**moved)

    def model_inputs(self) -> dict:
        """Keyword arguments for ``EGNN``/``FastEGNN.forward``; ``moving`` only for a store with walls' ``type``
        (FastEGNN's centroid averages the moving nodes, docs/maths.md §8)."""
        walls = {} if self.moving is None else {"moving": self.moving}
        field = {} if self.gravity is None else {"gravity": self.gravity}       # dataset.gravity, docs/maths.md §8
        return dict(node_features=self.node_features, pos=self.pos, vel=self.vel, edge_index=self.edge_index,
                    edge_attr=self.edge_attr, batch=self.batch, num_graphs=self.num_graphs, **walls, **field)


def collate(samples: list[GraphSample]) -> GraphBatch:
    """Concatenate graphs, shifting each graph's edge indices by the nodes before it."""
    sizes = np.array([len(s.pos) for s in samples])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    cat = lambda name: torch.from_numpy(np.concatenate([getattr(s, name) for s in samples]))  # noqa: E731
    edge_index = np.concatenate([s.edge_index + off for s, off in zip(samples, offsets)], axis=1)
    moving = None if any(s.moving is None for s in samples) else cat("moving")
    gravity = None if any(s.gravity is None for s in samples) else torch.from_numpy(
        np.stack([s.gravity for s in samples]))
    return GraphBatch(node_features=cat("node_features"), pos=cat("pos"), vel=cat("vel"), target=cat("target"),
                      edge_index=torch.from_numpy(edge_index), edge_attr=cat("edge_attr"),
                      batch=torch.from_numpy(np.repeat(np.arange(len(samples)), sizes)),
                      num_graphs=len(samples), moving=moving, gravity=gravity)


VELOCITY_UNITS = ("store", "horizon")
INPUT_VELOCITIES = ("stored", "displacement")
UNWIRED_WALLS = ("keep", "drop")


def velocity_scale(unit: str, delta_t: int, frame_dt: float) -> float:
    """The factor that turns stored velocities into ``unit``.

    ``store``: as stored (1.0). ``horizon``: displacement over the task's time step, v · Δt · (time between
    stored frames), so that the model's φ_v(h)·v term starts near the constant-velocity prediction whatever
    the store's time unit. An SPH store in m/s with Δt = 20 frames at 50 fps otherwise feeds velocities
    2.5x the displacement they predict (and |v| up to 50 into the first layer), which made training diverge.
    """
    if unit == "store":
        return 1.0
    if unit == "horizon":
        return float(delta_t) * float(frame_dt)
    raise ConfigError(f"dataset.velocity_unit={unit!r}: choose one of {VELOCITY_UNITS}")


def check_gravity(value) -> np.ndarray | None:
    """``dataset.gravity`` as a (3,) float64 array (None: no external field); a ConfigError unless it is a list of 3
    finite numbers."""
    if value is None:
        return None
    fix = "give a list of 3 finite numbers in the store's length / time² (e.g. [0, -9.81, 0]) or null (no field)"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ConfigError(f"dataset.gravity={value!r}: {fix}")
    values = list(value)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"dataset.gravity={values!r}: {fix}")
    g = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(g)):
        raise ConfigError(f"dataset.gravity={values!r} is not finite: {fix}")
    return g


def task_gravity(value, unit: str, delta_t: int, frame_dt: float) -> np.ndarray | None:
    """``dataset.gravity`` (length / time² in the store's units, e.g. m/s²) in the task's units, (3,) float32, or
    None for no field.

    Scaled as the velocities are (:func:`velocity_scale`, s): a velocity v in the task's units is v · s, so an
    acceleration is g · s². ``horizon`` (s = Δt · dt, the task step T): g · T², the displacement scale of one task
    step (a free fall covers g T² / 2), of the same order as the inputs and the target displacement. ``store``
    (s = 1): as given, in the store's units, like the velocities. The model's phi_g learns the rest of the scale.
    """
    g = check_gravity(value)
    if g is None:
        return None
    return (g * velocity_scale(unit, delta_t, frame_dt) ** 2).astype(np.float32)


class TrajectoryDataset:
    """The samples of one split of a store, read on demand.

    Args:
        info: an opened, validated store (``datasets.store.open_store``).
        split: ``train``, ``val`` or ``test``.
        delta_t: frames between input and target.
        frame_start, frame_stop, frame_stride: the input frames used, ``range(start, stop, stride)``;
            ``frame_stop`` None means every frame that still has a target ``delta_t`` later.
        node_features, edge_features: feature recipes (``datasets.graphs``).
        radius: radius-graph cutoff; None uses the store's ``radius`` attribute (None there: complete graph).
        max_neighbors: optional cap of senders per receiver. cutoff_rate: edge dropping (docs/maths.md §2).
        wall_neighbors: k > 0: every moving node also receives from its k nearest walls (``datasets.graphs``);
            a StoreError for a store without walls. wall_neighbors_reach: only those within this distance
            (store length units); None: however far.
        input_velocity: ``stored``: the store's velocity at the input frame. ``displacement``: the
            displacement over the task step before it, (x(t) − x(t − Δt)) / (Δt·dt), in the same unit: what
            a rollout can feed back, which for a falling body lags the instantaneous velocity by g·Δt·dt/2
            (docs/maths.md §8). Input frames before ``delta_t`` have no such step and are left out.
        velocity_scale: factor applied to the stored velocities as they are read (inputs and the speed
            feature alike); see ``velocity_scale``.
        gravity: the external field of every graph, (3,) in the task's units (:func:`task_gravity`); None: none.
        unwired_walls: ``keep`` every wall of the scene in every graph, or ``drop`` the walls no edge of the
            sample's graph touches (``datasets.graphs``, unwired walls): fewer node rows, the same edges.
    """

    def __init__(self, info: StoreInfo, split: str, *, delta_t: int, frame_start: int = 0,
                 frame_stop: int | None = None, frame_stride: int = 1, node_features: list[str],
                 edge_features: list[str], radius: float | None = None, max_neighbors: int | None = None,
                 cutoff_rate: float = 0.0, velocity_scale: float = 1.0, gravity: np.ndarray | None = None,
                 wall_neighbors: int = 0, wall_neighbors_reach: float | None = None,
                 input_velocity: str = "stored", unwired_walls: str = "keep"):
        self.info = info
        self.gravity = None if gravity is None else np.asarray(gravity, dtype=np.float32).reshape(3)
        self.split = split
        self.meta = info.splits[split]
        where = f"{info.path}/{split}"
        last_input = self.meta.num_frames - 1 - delta_t
        if delta_t < 1:
            raise StoreError(f"dataset.delta_t={delta_t} must be >= 1")
        if frame_start > last_input:
            raise StoreError(f"{where}: frame {frame_start} + delta_t {delta_t} is beyond the trajectory's end "
                             f"({self.meta.num_frames} frames); lower dataset.frame_start or dataset.delta_t")
        stop = last_input + 1 if frame_stop is None else min(frame_stop, last_input + 1)
        self.frames = np.arange(frame_start, stop, frame_stride)
        if input_velocity not in INPUT_VELOCITIES:
            raise ConfigError(f"dataset.input_velocity={input_velocity!r}: choose one of {INPUT_VELOCITIES}")
        self.input_velocity = input_velocity
        if unwired_walls not in UNWIRED_WALLS:
            raise ConfigError(f"dataset.unwired_walls={unwired_walls!r}: choose one of {UNWIRED_WALLS}")
        self.unwired_walls = unwired_walls
        if input_velocity == "displacement":              # a displacement needs the frame delta_t before
            self.frames = self.frames[self.frames >= delta_t]
            if not len(self.frames):
                raise StoreError(f"{where}: dataset.input_velocity=displacement needs input frames >= delta_t "
                                 f"({delta_t}) and frames {frame_start}..{stop - 1} hold none; raise "
                                 f"dataset.frame_stop, lower dataset.delta_t, or use input_velocity=stored")
        self.delta_t = delta_t
        self.node_recipe = list(node_features)
        self.edge_recipe = list(edge_features)
        self.radius = info.attrs.get("radius") if radius is None else radius
        per_radius = [n for n in self.edge_recipe if n in RADIUS_EDGE_FEATURES]
        if per_radius and self.radius is None:
            raise ConfigError(f"{info.path}: dataset.edge_features holds {per_radius[0]}, but the graph is complete "
                              f"(dataset.radius and the store's radius are null): set dataset.radius, or use distance")
        self.up = up_of(self.gravity)
        along_field = [n for n in self.edge_recipe if n in FIELD_EDGE_FEATURES]
        if along_field and self.up is None:
            raise ConfigError(f"{info.path}: dataset.edge_features holds {along_field[0]}, which measures along the "
                              f"external field, but dataset.gravity is {'null' if gravity is None else 'zero'}: set "
                              f"dataset.gravity (e.g. [0, -9.81, 0]), or drop {along_field[0]}")
        reach = (info.attrs.get("generator") or {}).get("wall_reach")
        if reach is not None and (self.radius is None or self.radius > reach):
            raise StoreError(f"{info.path}: its walls were kept only within dataset.sph.wall_reach={reach} m of the "
                             f"fluid, so a graph of radius {self.radius} would miss wall edges; set dataset.radius "
                             f"<= {reach}, or rebuild the store with dataset.sph.wall_reach >= the radius (or null)")
        if max_neighbors is not None and self.radius is None:
            raise ConfigError(f"{info.path}: dataset.max_neighbors={max_neighbors} caps the senders of a radius graph, "
                              f"but the graph is complete (dataset.radius and the store's radius are null), so it "
                              f"would change nothing: set dataset.radius, or drop dataset.max_neighbors")
        self.max_neighbors = max_neighbors
        self.wall_neighbors = int(wall_neighbors)
        self.wall_neighbors_reach = None if wall_neighbors_reach is None else float(wall_neighbors_reach)
        self.cutoff_rate = cutoff_rate
        self.velocity_scale = float(velocity_scale)
        # a displacement over one task step, in the velocity unit the stored velocities are scaled to
        self.per_displacement = self.velocity_scale / (float(delta_t) * float(info.attrs["dt"]))
        group = zarr.open_group(str(info.path), mode="r")[split]
        self._pos = da.from_zarr(group["pos"])
        self._vel = da.from_zarr(group["vel"])
        if velocity_scale != 1.0:
            self._vel = (self._vel * np.float32(velocity_scale)).astype(np.float32)
        self._scalars = da.from_zarr(group["node_scalars"])
        self.type_column = info.node_scalars.index("type") if "type" in info.node_scalars else None
        if self.wall_neighbors and self.type_column is None:
            raise StoreError(f"{info.path}: dataset.wall_neighbors={self.wall_neighbors} asks for edges from walls, "
                             f"but the store has no node scalar `type` (its scalars: {info.node_scalars}); set "
                             f"dataset.wall_neighbors=0")
        if self.unwired_walls == "drop" and self.type_column is None:
            raise StoreError(f"{info.path}: dataset.unwired_walls=drop leaves out walls no edge touches, but the store "
                             f"has no node scalar `type` to mark walls (its scalars: {info.node_scalars}): it would "
                             f"change nothing; set dataset.unwired_walls=keep")
        trivial = trivial_target(info.attrs, delta_t)
        if trivial:
            warnings.warn(trivial, stacklevel=2)
        self._scene_moving: np.ndarray | None = None

    def mean_degree(self, samples: int = 2000) -> float:
        """Edges per moving node of the first sample's radius graph (complete graph: n − 1), estimated from up
        to ``samples`` receivers spread over the scene's moving nodes (walls, which receive only from moving
        nodes, left out; every node in a store without walls)."""
        if self.radius is None:
            return float(self.meta.scene_ptr[1] - 1)
        nodes = self.meta.scene_nodes(0)
        pos, scalars = self._compute([self._pos[self.frames[0], nodes], self._scalars[nodes]],
                                     [(0, int(self.frames[0]))])
        moving = self.moving_of(scalars)
        candidates = pos if moving is None or not moving.any() else pos[moving]
        receivers = candidates[np.linspace(0, len(candidates) - 1, min(samples, len(candidates))).astype(int)]
        counts = cKDTree(pos).query_ball_point(receivers, self.radius, return_length=True)
        return float(np.mean(counts) - 1)

    def moving_of(self, scalars: np.ndarray) -> np.ndarray | None:
        """(n,) bool of the rows of ``scalars`` (n, K) that are not walls; None for a store without ``type``."""
        return None if self.type_column is None else scalars[:, self.type_column] != WALL

    def walls_of(self, scalars: np.ndarray) -> np.ndarray | None:
        """(n,) bool of the rows of ``scalars`` (n, K) that are walls, whose pairs no graph holds
        (``datasets.graphs``); None for a store without ``type``."""
        return None if self.type_column is None else scalars[:, self.type_column] == WALL

    def scene_moving(self) -> np.ndarray:
        """(S,) nodes per scene that are not walls (every node for a store without ``type``); read once."""
        if self._scene_moving is None:
            ptr = self.meta.scene_ptr
            if self.type_column is None:
                self._scene_moving = np.diff(ptr)
            else:
                moving = self._compute([self._scalars[:, self.type_column]], [])[0] != WALL
                self._scene_moving = np.add.reduceat(moving.astype(np.int64), ptr[:-1])
        return self._scene_moving

    def __len__(self) -> int:
        return self.meta.num_scenes * len(self.frames)

    def locate(self, index: int) -> tuple[int, int]:
        """Sample index -> (scene, input frame)."""
        scene, k = divmod(int(index), len(self.frames))
        return scene, int(self.frames[k])

    def read(self, indices: list[int] | np.ndarray) -> list[GraphSample]:
        """Read the samples ``indices`` in one dask computation and build their graphs."""
        located = [self.locate(i) for i in indices]
        return [self.make_sample(scene, frame, *arrays) for (scene, frame), arrays in zip(located,
                                                                                          self.read_states(located))]

    def read_states(self, located: list[tuple[int, int]]) -> list[tuple[np.ndarray, ...]]:
        """(pos, vel, target, scalars) of every whole scene at every (scene, input frame) of ``located``, in one
        dask computation: the input state as the loader feeds it, the target ``delta_t`` frames later."""
        lazy = []
        for scene, frame in located:
            nodes = self.meta.scene_nodes(scene)
            lazy += [self._pos[frame, nodes], self.velocity(frame, nodes), self._pos[frame + self.delta_t, nodes],
                     self._scalars[nodes]]
        arrays = self._compute(lazy, located)
        return [tuple(arrays[4 * k: 4 * k + 4]) for k in range(len(located))]

    def read_parts(self, indices: list[int] | np.ndarray, owned: list[np.ndarray | None],
                   halo: list[np.ndarray]) -> list[PartArrays]:
        """Read only some nodes of some samples, in one dask computation (a rank's part plus its halo).

        For sample ``indices[k]``: everything a training step needs of the nodes ``owned[k]`` (ids within
        the scene; None: every node of the scene, read as one slice) and the input positions and scalars of
        the nodes ``halo[k]``, which only feed edges (and their input velocities when an edge feature needs
        them). Only the chunks holding those nodes are read.
        """
        located = [self.locate(i) for i in indices]
        halo_vel = self.edge_features_need_velocity
        per = 7 if halo_vel else 6
        lazy = []
        for (scene, frame), own, other in zip(located, owned, halo):
            nodes = self.meta.scene_nodes(scene)
            rows = nodes if own is None else nodes.start + np.asarray(own, dtype=np.int64)
            other = nodes.start + np.asarray(other, dtype=np.int64)
            lazy += [self._pos[frame, rows], self.velocity(frame, rows), self._pos[frame + self.delta_t, rows],
                     self._scalars[rows], self._pos[frame, other], self._scalars[other]]
            if halo_vel:
                lazy.append(self.velocity(frame, other))
        arrays = self._compute(lazy, located)
        parts = []
        for k, (scene, frame) in enumerate(located):
            pos, vel, target, scalars, halo_pos, halo_scalars = arrays[per * k: per * k + 6]
            extra = {"halo_vel": arrays[per * k + 6]} if halo_vel else {}
            self.check_finite(scene, frame, pos=pos, vel=vel, target=target, halo_pos=halo_pos, **extra)
            parts.append(PartArrays(pos, vel, target, scalars, halo_pos, halo_scalars, scene, frame, **extra))
        return parts

    @property
    def edge_features_need_velocity(self) -> bool:
        """Whether an edge feature of the recipe reads the input velocities (a halo must then carry them)."""
        return any(name in VELOCITY_EDGE_FEATURES for name in self.edge_recipe)

    def velocity(self, frame: int, rows):
        """The input velocity of ``rows`` at ``frame`` (lazy), as ``input_velocity`` says."""
        if self.input_velocity == "stored":
            return self._vel[frame, rows]
        moved = self._pos[frame, rows] - self._pos[frame - self.delta_t, rows]
        return (moved * np.float32(self.per_displacement)).astype(np.float32)

    def _compute(self, lazy: list, located: list[tuple[int, int]]) -> tuple:
        """Read lazy slices in one dask computation; a damaged chunk becomes a StoreError naming the store."""
        try:
            return dask.compute(*lazy, scheduler="threads")
        except Exception as err:  # a truncated or corrupt chunk: numcodecs/zarr raise several types
            raise StoreError(f"{self.info.path}/{self.split}: reading samples (scene, frame) {located[:4]}"
                             f"{'...' if len(located) > 4 else ''} failed ({type(err).__name__}: {err}); the store "
                             f"is damaged: prepare it again with prepare.overwrite=true") from err

    def check_finite(self, scene: int, frame: int, **arrays: np.ndarray) -> None:
        """Stop with the store, field, scene and frame when an array read holds NaN or Inf."""
        for name, values in arrays.items():
            if not np.all(np.isfinite(values)):
                at = frame + self.delta_t if name == "target" else frame
                shown = "pos" if "pos" in name or name == "target" else name
                raise StoreError(f"{self.info.path}/{self.split}: {shown}"
                                 f" of scene {scene} at frame {at} holds NaN or Inf ({name}); regenerate or "
                                 f"repair the store")

    def make_sample(self, scene: int, frame: int, pos, vel, target, scalars) -> GraphSample:
        """Check one sample's arrays and build its graph and features."""
        for name, values in (("pos", pos), ("vel", vel), ("target pos", target)):
            if not np.all(np.isfinite(values)):
                raise StoreError(f"{self.info.path}/{self.split}: {name} of scene {scene} at frame "
                                 f"{frame if name != 'target pos' else frame + self.delta_t} holds NaN or Inf")
        edge_index = graph_edges(pos, self.radius, self.max_neighbors, self.walls_of(scalars), self.wall_neighbors,
                                 self.wall_neighbors_reach)
        edge_index = drop_longest_edges(edge_index, pos, self.cutoff_rate)
        if self.unwired_walls == "drop":
            edge_index, _, (pos, vel, target, scalars) = drop_unwired_walls(
                edge_index, self.walls_of(scalars), pos, vel, target, scalars)
        names = self.info.node_scalars
        return GraphSample(pos=pos, vel=vel, target=target,
                           node_features=node_features(self.node_recipe, vel, scalars, names),
                           edge_index=edge_index,
                           edge_attr=edge_features(self.edge_recipe, edge_index, pos, scalars, names, vel,
                                                   self.radius, self.up),
                           scene=scene, frame=frame, moving=self.moving_of(scalars), gravity=self.gravity)

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0) -> Iterator[GraphBatch]:
        """Batches of the whole split; with ``shuffle`` the order depends only on (seed, epoch)."""
        order = np.arange(len(self))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        for first in range(0, len(order), batch_size):
            yield collate(self.read(order[first:first + batch_size]))

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)
