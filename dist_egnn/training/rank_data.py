"""What one rank reads and builds for a batch: its part (+ halo) of every graph, and the halo plan.

One process (P = 1) is the special case "part 0 of 1": it reads whole graphs, so the trainer has one data
path for every P. For P > 1 the node sets come from the stored partition (assignment and halo mask of
every sample, ``partitioners.artifacts``): rank p reads the positions, velocities, targets and scalars of
the nodes it owns, and the input positions and scalars of its halo nodes, nothing else
(``TrajectoryDataset.read_parts``). It then builds the edges it receives: the radius graph of its owned +
halo nodes, keeping the edges whose receiver it owns. In exact mode that is exactly the whole graph's edge
set at those receivers, because every sender within the radius of an owned node is owned or in the halo;
in drop mode (no halo) the cut edges are missing, as in the paper's DistEGNN.

One process can also run all P parts itself (``python launch/train.py distributed.parts=P``, world size 1):
it reads whole graphs and, in drop mode, keeps only the edges inside a part, which is exactly what P ranks
compute together (docs/maths.md §4: the cut edges are the only difference from one device). In exact mode that is
the whole graph. It is the reference the drop-mode tests compare P ranks with, and a way to try a
distributed configuration on one machine.

Unwired walls (``dataset.unwired_walls=drop``, P = 1 only): after the edges, the noise and edge dropping, each
graph loses the walls none of its edges touches (``datasets.graphs``); its rows keep their global ids, so the MMD
keys and the training noise are those of the graph with every wall.

Batches: the sample order of an epoch comes from (seed, epoch) only, so every rank computes the same one.
Graph group g of G takes batches g, g + G, g + 2G, ... (graph × data parallel); in training every group
takes the same number of steps, so a remainder of fewer than G batches is left out of that epoch.

Training noise (``trainer.input_noise`` = σ, the training split only, GNS-style): every moving node's input
position gets N(0, σ²) per component and its velocity the error of a finite difference between two such noisy
positions one task step apart, so the model learns to correct the errors a rollout feeds back. The target
stays the true next position (``trainer.noise_target=clean``: the model undoes the position error too) or moves
with the input's position error (``shifted``, GNS's and LagrangeBench's convention: only the velocity error is
corrected). Drawn per (seed, epoch, sample, global node id), like the MMD keys: resume and P ranks see the same
noise as one device. The edges stay those of the clean frame (σ is refused unless it is well under the radius),
so the stored partitions and halos hold.

Noise near the walls (``trainer.wall_noise`` = σ_w, whole graphs only): the moving nodes within
``trainer.wall_noise_reach`` (default: the radius) of a wall particle take σ_w instead of σ, from the same keyed
draw (the others keep their inputs). The SPH fluid never enters its walls, so a model trained on stored states
(σ a few per cent of the spacing) never sees a particle at or past the wall face, which is where its rollouts
leave the box (docs/results/README.md, "Where the fluid leaves the box"); with σ_w near the radius's quarter
some inputs sit in the face and the clean target asks the model to put them back. With
``trainer.wall_noise_velocity=false`` σ_w moves a near node's position only: the input one task step earlier moves
with it by the same extra amount, so its velocity keeps σ's error (a particle put into the face with the velocity
it had; σ_w ≈ half the velocity's RMS per step would otherwise hide how fast the fluid moves near every wall).
Which nodes are near is decided on the clean frame's whole graph; a rank's halo rows would need walls it does not
hold, hence one graph per process.

Edge dropping (docs/maths.md §2, cutoff rate r) keeps the shortest ⌊(1 − r)·E⌋ edges of each graph, ties broken
by global ids so that the two directions of a pair are kept or dropped together. In exact mode with P > 1
the length threshold is global: the ranks exchange their edge lengths (one all-gather per batch), so P ranks
still equal one device. In drop mode each part
drops its own longest edges, as each device of the paper's DistEGNN works on its own graph.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
from scipy.spatial import cKDTree

from dist_egnn.datasets.graphs import (
    drop_longest_edges,
    drop_unwired_walls,
    edge_features,
    edge_order,
    graph_edges,
    node_features,
    part_graphs,
    whole_pairs,
)
from dist_egnn.datasets.loader import GraphBatch, PartArrays, TrajectoryDataset
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.partitioners.subgraphs import HaloPlan, PartNodes, part_nodes, stack_parts

DENSITY_FACTOR = 10        # mean degree over this many times the documented one: a GraphWarning


class GraphWarning(UserWarning):
    """Graphs that train without error but not as meant: without edges, or far denser than documented."""


@dataclass
class RankBatch:
    """One rank's share of one batch of B graphs."""

    graph: GraphBatch              # owned rows (N_owned); edge_index reaches the halo rows N_owned .. N_all − 1
    plan: HaloPlan | None          # exact mode with P > 1: what to send where; None: no halo
    sample_ids: list[int]
    graph_nodes: np.ndarray        # (B,) nodes of each whole graph, over all parts
    full_edges: int                # edges of the whole graphs before any dropping (cut or cutoff rate)
    mmd_keys: np.ndarray           # (N_owned,) uniform [0, 1) per node, drawn per (seed, epoch, sample, global id)
    graph_moving: np.ndarray | None = None   # (B,) nodes of each whole graph that are not walls; None: all

    @property
    def total_nodes(self) -> int:
        return int(self.graph_nodes.sum())

    @property
    def moving_nodes(self) -> np.ndarray:
        """(B,) nodes per whole graph that the loss and the metrics see (walls are left out)."""
        return self.graph_nodes if self.graph_moving is None else self.graph_moving

    @property
    def total_moving(self) -> int:
        return int(self.moving_nodes.sum())

    @property
    def num_edges(self) -> int:
        return int(self.graph.edge_index.shape[1])


class RankData:
    """The batches of one split as seen by one rank (part ``part`` of ``parts``).

    Args:
        dataset: the split (``datasets.loader.TrajectoryDataset``).
        part, parts: this rank's part and P.
        halo: exact mode (1-hop halo exchanged every layer) or drop mode (cut edges dropped).
        assignments: the stored partition of the split (``partitioners.artifacts.load_assignments``);
            needed when P > 1.
        gather: all-gather of a 1-D float64 array over the graph group (``comm.all_gather_arrays``), needed
            for edge dropping in exact mode with P > 1.
        sequential: this one process holds all P parts (``part`` is ignored); see the module docstring.
        report: warn about the split's graphs (:class:`GraphWarning`, once per split and kind): a graph
            without edges, or far denser than the dataset's documented density. Rank 0 only in a launch.
        noise: σ of the training noise on the inputs (``trainer.input_noise``, the store's length unit; see the
            module docstring); 0: none. Give it for the training split only.
        noise_shifts_target: move the target with the input's position error (``trainer.noise_target=shifted``).
        wall_noise: σ_w of the training noise on the moving nodes near a wall (``trainer.wall_noise``; 0: σ
            everywhere), whole graphs only. wall_noise_reach: how near (``trainer.wall_noise_reach``).
        wall_noise_velocity: σ_w enters the near nodes' velocities too (``trainer.wall_noise_velocity``).
    """

    def __init__(self, dataset: TrajectoryDataset, part: int = 0, parts: int = 1, halo: bool = False,
                 assignments=None, gather: Callable[[np.ndarray], list[np.ndarray]] | None = None,
                 sequential: bool = False, report: bool = True, noise: float = 0.0,
                 noise_shifts_target: bool = False, wall_noise: float = 0.0, wall_noise_reach: float = 0.0,
                 wall_noise_velocity: bool = True):
        if parts > 1 and assignments is None:
            raise ValueError("RankData: P > 1 needs the stored partition of the split (assignments)")
        if assignments is not None and assignments.num_parts != parts:
            raise BadInput(f"{assignments.path}: stored partition has {assignments.num_parts} parts but "
                             f"distributed.parts={parts}; prepare the partitions for P={parts}")
        if parts > 1 and dataset.unwired_walls == "drop":
            raise ConfigError(f"dataset.unwired_walls=drop with distributed.parts={parts}: the stored partitions and "
                              f"halos hold every wall; use distributed.parts=1 or dataset.unwired_walls=keep")
        self.dataset, self.part, self.parts, self.halo = dataset, part, parts, halo and parts > 1
        self.sequential = sequential and parts > 1
        self.assignments, self.gather = assignments, gather
        self.graph_sizes = np.diff(dataset.meta.scene_ptr)
        self.report, self.warned = report, set()          # kinds of GraphWarning already given for this split
        self.reference: tuple[float, str] | None | bool = False    # reference_degree(); False: not measured yet
        if wall_noise > 0.0 and (parts > 1 or dataset.type_column is None):
            raise ConfigError(f"trainer.wall_noise={wall_noise:g} needs whole graphs with wall particles: "
                              f"{dataset.info.path} with distributed.parts={parts}; use distributed.parts=1 and a "
                              f"store with walls, or trainer.wall_noise=0")
        if wall_noise > 0.0 and not wall_noise_reach > 0.0:
            raise ValueError(f"RankData: wall_noise={wall_noise:g} needs wall_noise_reach > 0 (got "
                             f"{wall_noise_reach}): with none no node is near a wall")
        self.noise, self.noise_shifts_target = float(noise), noise_shifts_target
        self.wall_noise, self.wall_noise_reach = float(wall_noise), float(wall_noise_reach)
        self.wall_noise_velocity = wall_noise_velocity

    def __len__(self) -> int:
        return len(self.dataset)

    def order(self, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
        """The epoch's sample order: a function of (seed, epoch) alone, identical on every rank."""
        order = np.arange(len(self.dataset))
        return np.random.default_rng([seed, epoch]).permutation(order) if shuffle else order

    def batch_ids(self, batch_size: int, shuffle: bool, seed: int, epoch: int, group: int = 0, groups: int = 1,
                  equal_steps: bool = False) -> list[np.ndarray]:
        """The sample ids of the batches graph group ``group`` of ``groups`` takes."""
        order = self.order(shuffle, seed, epoch)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if equal_steps:
            self.check_groups(len(batches), batch_size, groups)
            batches = batches[:len(batches) - len(batches) % groups]
        return batches[group::groups]

    def eval_batch_ids(self, batch_size: int, group: int = 0, groups: int = 1) -> tuple[list[np.ndarray], int]:
        """Graph group ``group``'s evaluation batches, and how many of them it scores: every sample is scored once
        over the groups, and every group runs the same number of forwards (a sharded engine, FSDP, gathers the
        parameters over every rank in a forward: a group with fewer forwards would go on to the next collective
        while the others wait in that gather), so a short group ends with batch 0 again, unscored."""
        batches = self.batch_ids(batch_size, shuffle=False, seed=0, epoch=0)
        own = batches[group::groups]
        return own + batches[:1] * (-(-len(batches) // groups) - len(own)), len(own)

    def num_steps(self, batch_size: int, groups: int = 1) -> int:
        batches = -(-len(self.dataset) // batch_size)
        self.check_groups(batches, batch_size, groups)
        return batches // groups

    def check_groups(self, batches: int, batch_size: int, groups: int) -> None:
        """Every graph group needs a training batch each step: a ConfigError when the split has fewer (but some)."""
        if 0 < batches < groups:
            fix = (f"lower trainer.batch_size to {len(self.dataset) // groups} or less, or launch fewer ranks"
                   if len(self.dataset) >= groups else f"launch at most {len(self.dataset)} graph groups")
            raise ConfigError(f"trainer.batch_size={batch_size}: the training split's {len(self.dataset)} samples "
                              f"make {batches} batch(es), fewer than the {groups} graph groups (world size / "
                              f"distributed.parts), and every group needs one per step; {fix}")

    def batches(self, batch_ids: list[np.ndarray], seed: int = 0, epoch: int = 0) -> Iterator[RankBatch]:
        for ids in batch_ids:
            yield self.build(list(map(int, ids)), seed, epoch)

    # -------------------------------------------------------------------------------------------------
    def build(self, sample_ids: list[int], seed: int = 0, epoch: int = 0) -> RankBatch:
        """Read and assemble this rank's share of the batch ``sample_ids``."""
        nodes = [self.nodes_of(i) for i in sample_ids]
        whole = self.parts == 1 or self.sequential
        arrays = self.dataset.read_parts(sample_ids, [None if whole else n.owned for n in nodes],
                                         [n.halo for n in nodes])
        local = [self.local_edges(a) for a in arrays]                       # per graph, local ids
        full_edges = sum(e.shape[1] for e in local)
        if self.report and len(self.warned) < 2:
            edges = ([e.shape[1] for e in local] if whole
                     else [self.assignments.num_edges_of(a.scene, a.frame) for a in arrays])
            self.check_graphs(sample_ids, arrays, edges, whole)
        if self.sequential:
            local = self.sequential_edges(local, arrays)
        else:
            if not whole:
                full_edges = sum(self.assignments.num_edges_of(a.scene, a.frame) for a in arrays)
            local = self.drop_edges(local, arrays, nodes)
        if self.noise > 0.0 or self.wall_noise > 0.0:   # after the edges: they are the clean frame's
            arrays = [self.with_noise(a, n, i, seed, epoch) for a, n, i in zip(arrays, nodes, sample_ids)]
        if self.dataset.unwired_walls == "drop":      # P = 1 only (refused in __init__ otherwise)
            arrays, local, nodes = self.without_unwired_walls(arrays, local, nodes)
        return self.assemble(sample_ids, nodes, arrays, local, full_edges, seed, epoch)

    def with_noise(self, arrays: PartArrays, nodes: PartNodes, sample: int, seed: int, epoch: int) -> PartArrays:
        """``arrays`` with the training noise on the moving nodes' positions (owned and halo rows alike) and
        velocities, and on their targets when ``noise_shifts_target``; walls untouched."""
        d = self.dataset
        ids = nodes.local_to_global
        size = int(self.graph_sizes[arrays.scene])
        if self.wall_noise > 0.0:
            near = ids[:len(arrays.pos)][self.near_walls(arrays)]
            sigma = np.full(size, self.noise, np.float32)
            sigma[near] = self.wall_noise
            unit = input_errors(seed, epoch, sample, size, 1.0)
            errors = unit * sigma[None, :, None]
            if not self.wall_noise_velocity:     # x(t − Δt) moves with x(t): the velocity error stays σ's
                extra = np.float32(self.wall_noise - self.noise)
                errors[1, near] = unit[1, near] * np.float32(self.noise) + unit[0, near] * extra
        else:
            errors = input_errors(seed, epoch, sample, size, self.noise)
        owned, halo = ids[:len(arrays.pos)], ids[len(arrays.pos):]
        moving_of = lambda scalars: 1.0 if d.type_column is None else d.moving_of(scalars)[:, None]  # noqa: E731
        # the velocity is a position difference over one task step, in the dataset's velocity unit
        velocity_error = lambda rows: (errors[0, rows] - errors[1, rows]) * np.float32(d.per_displacement)  # noqa: E731
        halo_vel = None if arrays.halo_vel is None else \
            arrays.halo_vel + velocity_error(halo) * moving_of(arrays.halo_scalars)
        moving = moving_of(arrays.scalars)
        position_error = errors[0, owned] * moving
        target = arrays.target + position_error if self.noise_shifts_target else arrays.target
        return replace(arrays, pos=arrays.pos + position_error, target=target,
                       vel=arrays.vel + velocity_error(owned) * moving,
                       halo_pos=arrays.halo_pos + errors[0, halo] * moving_of(arrays.halo_scalars), halo_vel=halo_vel)

    def near_walls(self, arrays: PartArrays) -> np.ndarray:
        """(n,) bool of a whole graph's rows that are moving and within ``wall_noise_reach`` of a wall."""
        walls = self.dataset.walls_of(arrays.scalars)
        near = np.zeros(len(arrays.pos), bool)
        if walls.any() and not walls.all():
            distance, _ = cKDTree(arrays.pos[walls]).query(arrays.pos[~walls],
                                                          distance_upper_bound=self.wall_noise_reach)
            near[~walls] = np.isfinite(distance)
        return near

    def without_unwired_walls(self, arrays: list[PartArrays], local: list[np.ndarray],
                              nodes: list[PartNodes]) -> tuple[list[PartArrays], list[np.ndarray], list[PartNodes]]:
        """Whole graphs without the walls none of their edges touches (``datasets.graphs``, unwired walls); the
        rows left keep their global ids in ``nodes`` (their MMD keys are those of one device keeping every wall)."""
        walls_of = self.dataset.walls_of
        out: tuple[list, list, list] = ([], [], [])
        for a, e, n in zip(arrays, local, nodes):
            e, kept, (pos, vel, target, scalars, owned) = drop_unwired_walls(
                e, walls_of(a.scalars), a.pos, a.vel, a.target, a.scalars, n.owned)
            if kept is not None:
                a = replace(a, pos=pos, vel=vel, target=target, scalars=scalars)
                n = replace(n, owned=owned)
            for kept_list, item in zip(out, (a, e, n)):
                kept_list.append(item)
        return out

    def check_graphs(self, sample_ids: list[int], arrays: list[PartArrays], edges: list[int], whole: bool) -> None:
        """Warn (once per split and kind) when a graph of this batch has no edges, or when the batch's mean
        degree is over :data:`DENSITY_FACTOR` times the dataset's documented density (:meth:`reference_degree`):
        both run without error but train a different model than meant, or run many times slower."""
        d = self.dataset
        where = f"{d.split} graphs of {d.info.path}"
        units = f"the store's length unit ({d.info.attrs.get('units', {}).get('length')}) and radius " \
                f"({d.info.attrs.get('radius')})"
        empty = [(i, a) for i, a, e in zip(sample_ids, arrays, edges) if e == 0 and self.graph_sizes[a.scene] > 1]
        if empty and "empty" not in self.warned:
            self.warned.add("empty")
            sample, a = empty[0]
            warnings.warn(GraphWarning(
                f"{where}: sample {sample} (scene {a.scene}, frame {a.frame}, {self.graph_sizes[a.scene]} nodes) has "
                f"no edges at dataset.radius={d.radius}: its nodes exchange no messages. Check dataset.radius "
                f"against {units}"), stacklevel=2)
        nodes = sum(int(self.graph_sizes[a.scene]) for a in arrays)
        if "dense" in self.warned or not nodes:
            return
        if self.reference is False:                       # measured once per split, on its first batch
            self.reference = self.reference_degree(arrays[0] if whole else None)
        if self.reference is None:
            return
        degree, (expected, what) = sum(edges) / nodes, self.reference
        if degree > DENSITY_FACTOR * expected:
            self.warned.add("dense")
            warnings.warn(GraphWarning(
                f"{where}: dataset.radius={d.radius} gives {degree:.1f} edges per node, {degree / expected:.0f}x "
                f"{what} ({expected:.1f}): every step costs about that much more time and memory. Check "
                f"dataset.radius against {units}, or cap the degree with dataset.max_neighbors"), stacklevel=2)

    def reference_degree(self, whole_graph: PartArrays | None) -> tuple[float, str] | None:
        """The dataset's documented edges per node and what it is: the mean degree its generator recorded
        (``generator.neighbors``), else the degree at the store's own radius on ``whole_graph`` (one whole
        graph), measured only when the configured radius is larger; None when there is none."""
        d = self.dataset
        recorded = (d.info.attrs.get("generator") or {}).get("neighbors")
        if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and recorded > 0:
            return float(recorded), "the store's documented mean degree (generator.neighbors)"
        own = d.info.attrs.get("radius")
        if whole_graph is None or own is None or d.radius is None or d.radius <= own or len(whole_graph.pos) < 2:
            return None
        walls = d.walls_of(whole_graph.scalars)
        degree = graph_edges(whole_graph.pos, own, walls=walls).shape[1] / len(whole_graph.pos)
        return (degree, f"the degree at the store's own radius {own}") if degree > 0 else None

    def nodes_of(self, sample: int) -> PartNodes:
        scene, frame = self.dataset.locate(sample)
        if self.parts == 1 or self.sequential:
            n = int(self.graph_sizes[scene])
            return part_nodes(np.zeros(n, np.int64), None, 0, 1)
        return part_nodes(self.assignments.of(scene, frame),
                          self.assignments.halo_mask_of(scene, frame) if self.halo else None, self.part, self.parts)

    def local_edges(self, arrays: PartArrays) -> np.ndarray:
        """(2, E) edges received by the owned nodes, local ids (owned rows, then halo rows); no wall -> wall edge,
        as in the whole graph and the stored partition's halos (``datasets.graphs.graph_edges``)."""
        pos = np.concatenate([arrays.pos, arrays.halo_pos])
        walls = self.dataset.walls_of(np.concatenate([arrays.scalars, arrays.halo_scalars]))
        d = self.dataset
        edges = graph_edges(pos, d.radius, d.max_neighbors, walls, d.wall_neighbors, d.wall_neighbors_reach)
        return edges[:, edges[0] < len(arrays.pos)]

    def drop_edges(self, local: list[np.ndarray], arrays: list[PartArrays], nodes: list[PartNodes]) -> list[np.ndarray]:
        """Edge dropping per graph: locally (P = 1, drop mode) or with the global threshold (exact mode)."""
        rate = self.dataset.cutoff_rate
        if rate == 0.0:
            return local
        positions = [np.concatenate([a.pos, a.halo_pos]) for a in arrays]
        ids = [n.local_to_global for n in nodes]
        if not self.halo:
            return [drop_longest_edges(e, p, rate, node_ids=g) for e, p, g in zip(local, positions, ids)]
        return [global_drop(e, p, g, rate, self.gather) for e, p, g in zip(local, positions, ids)]

    def sequential_edges(self, whole: list[np.ndarray], arrays: list[PartArrays]) -> list[np.ndarray]:
        """All P parts in this process: the whole graph (exact mode) or its edges inside parts (drop mode),
        with edge dropping as the P ranks would do it."""
        rate = self.dataset.cutoff_rate
        if self.halo:
            return [drop_longest_edges(e, a.pos, rate) for e, a in zip(whole, arrays)]
        kept = []
        d = self.dataset
        for e, a in zip(whole, arrays):
            part = self.assignments.of(a.scene, a.frame)
            if d.wall_neighbors:                      # each part's own nearest walls, as its rank finds them
                graphs = part_graphs(a.pos, part, self.parts, d.radius, d.max_neighbors, d.walls_of(a.scalars),
                                     d.wall_neighbors, d.wall_neighbors_reach)
                kept.append(np.concatenate([drop_longest_edges(g, a.pos, rate) for g in graphs], axis=1))
                continue
            inside = e[:, part[e[0]] == part[e[1]]]
            per_part = [drop_longest_edges(inside[:, part[inside[0]] == p], a.pos, rate) for p in range(self.parts)]
            kept.append(np.concatenate(per_part, axis=1))
        return kept

    def assemble(self, sample_ids, nodes, arrays, local, full_edges, seed, epoch) -> RankBatch:
        stacked = stack_parts(nodes)
        d = self.dataset
        names = d.info.node_scalars
        features, attrs, edges = [], [], []
        for b, (a, e) in enumerate(zip(arrays, local)):
            features.append(node_features(d.node_recipe, a.vel, a.scalars, names))
            pos = np.concatenate([a.pos, a.halo_pos])
            scalars = np.concatenate([a.scalars, a.halo_scalars])
            vel = None if a.halo_vel is None else np.concatenate([a.vel, a.halo_vel])
            attrs.append(edge_features(d.edge_recipe, e, pos, scalars, names, vel, d.radius, d.up))
            edges.append(stacked.batch_rows(b, e.reshape(-1)).reshape(2, -1))
        cat = lambda xs: torch.from_numpy(np.concatenate(xs))  # noqa: E731
        sizes = np.array([len(a.pos) for a in arrays])
        walls = d.type_column is not None
        graph = GraphBatch(node_features=cat(features), pos=cat([a.pos for a in arrays]),
                           vel=cat([a.vel for a in arrays]), target=cat([a.target for a in arrays]),
                           edge_index=torch.from_numpy(np.concatenate(edges, axis=1) if edges
                                                       else np.zeros((2, 0), np.int64)),
                           edge_attr=cat(attrs), batch=torch.from_numpy(np.repeat(np.arange(len(arrays)), sizes)),
                           num_graphs=len(arrays),
                           moving=cat([d.moving_of(a.scalars) for a in arrays]) if walls else None,
                           gravity=per_graph_field(d.gravity, len(arrays)))
        plan = None
        if self.halo and not self.sequential:          # one process holding every part has no halo to exchange
            plan = stacked.halo_plan()
        graph_nodes = np.array([self.graph_sizes[d.locate(i)[0]] for i in sample_ids], dtype=np.int64)
        keys = np.concatenate([mmd_keys(seed, epoch, i, n)[p.owned] for i, n, p in zip(sample_ids, graph_nodes, nodes)])
        graph_moving = d.scene_moving()[[d.locate(i)[0] for i in sample_ids]] if walls else None
        return RankBatch(graph=graph, plan=plan, sample_ids=list(sample_ids), graph_nodes=graph_nodes,
                         full_edges=int(full_edges), mmd_keys=keys, graph_moving=graph_moving)


def per_graph_field(gravity: np.ndarray | None, num_graphs: int) -> torch.Tensor | None:
    """The dataset's external field (3,) as the model's ``gravity`` (B, 3), one row per graph; None: no field.
    Every rank holding part of a graph gets the same row from the same configuration: no collective."""
    return None if gravity is None else torch.from_numpy(np.tile(gravity, (num_graphs, 1)))


def mmd_keys(seed: int, epoch: int, sample: int, num_nodes: int) -> np.ndarray:
    """(num_nodes,) uniform keys of one graph's nodes by global id: the MMD term samples the nodes whose key
    is below M / N, so P ranks pick the same nodes as one device (``dist_egnn.losses.sample_nodes``)."""
    return np.random.default_rng([seed, epoch, sample, 7]).random(num_nodes).astype(np.float32)


def input_errors(seed: int, epoch: int, sample: int, num_nodes: int, sigma: float) -> np.ndarray:
    """(2, num_nodes, 3) float32 N(0, σ²) position errors of one graph's nodes by global id, at the input frame
    and one task step before it (the training noise, :class:`RankData`)."""
    rng = np.random.default_rng([seed, epoch, sample, 11])
    return (rng.standard_normal((2, num_nodes, 3), dtype=np.float32) * np.float32(sigma))


def global_drop(edges: np.ndarray, pos: np.ndarray, node_ids: np.ndarray, rate: float,
                gather: Callable[[np.ndarray], list[np.ndarray]]) -> np.ndarray:
    """Keep this rank's edges among the shortest ⌊(1 − r)·E⌋ edges of the whole graph (ties by global ids).

    Every rank holds the edges its nodes receive, so the ranks' edge sets partition the graph's: gathering
    their lengths gives the global threshold, and gathering the (rare) edges tied with it settles the rest
    by global ids, pairs kept or dropped whole, exactly as ``datasets.graphs.drop_longest_edges`` does on one
    device.
    """
    length2 = np.square(pos[edges[0]] - pos[edges[1]]).sum(axis=1)
    everyone = np.concatenate(gather(length2.astype(np.float64)))
    keep = int(np.floor((1.0 - rate) * len(everyone)))
    if keep == 0:
        return edges[:, :0]
    threshold = np.partition(everyone, keep - 1)[keep - 1]
    below = length2 < threshold
    tied = length2 == threshold
    still = keep - int((everyone < threshold).sum())
    ids = node_ids[edges[:, tied]]                                      # (2, T) global ids of tied edges
    pairs = np.concatenate(gather(ids.T.reshape(-1).astype(np.float64))).reshape(-1, 2)
    order = edge_order(pairs[:, 0], pairs[:, 1], np.zeros(len(pairs)))
    still = whole_pairs(pairs[order, 0], pairs[order, 1], still)     # the two directions of a pair go together
    chosen = pairs[order[:still]]
    mine = ids.T.astype(np.float64)
    chosen_set = {tuple(p) for p in chosen.tolist()}
    tied_keep = np.array([tuple(p) in chosen_set for p in mine.tolist()], dtype=bool)
    keep_mask = below.copy()
    keep_mask[np.flatnonzero(tied)[tied_keep]] = True
    return edges[:, keep_mask]
