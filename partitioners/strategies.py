"""Node-to-part assignment of one geometric graph: METIS, spatial (recursive coordinate bisection), random.

``partition(pos, num_parts, method, radius=r, seed=s)`` is the one entry point. Every strategy maps
positions (and the radius graph where it needs one), P and a seed to an (N,) assignment in [0, P):

* ``metis``: pymetis (METIS) on the undirected radius graph: fewest cut edges for balanced parts. METIS is
  near-exact on large graphs (±1 node on 113K nodes) but loose on small or dense ones (20 % over at P = 8
  on a 100-node complete graph, where every balanced split cuts the same edges); parts above the balance
  bound below then hand their nodes with the most neighbours in the smallest part over to it. Seeded
  through ``pymetis.Options(seed=...)``: the same seed gives the same parts on the same platform and METIS
  version, not across them, which is why prepared assignments are stored (``partitioners.artifacts``).
* ``spatial``: recursive coordinate bisection. Split the nodes along the axis of widest extent at the
  node-count quantile that gives the two halves ⌊P/2⌋ and ⌈P/2⌉ parts, recurse. Works for every P (not only
  powers of two), parts differ by at most one node, every part is a compact box whatever the density,
  and it needs no graph. Chosen over Morton (Z-order) curves, whose parts are unions of scattered cells with
  longer boundaries at the same balance. Deterministic; the seed is not used. Ties along an axis go by
  global id. It depends on the coordinate axes, so (unlike METIS and random) a rotated graph gets
  different parts: in drop mode that makes the model's output depend on orientation.
* ``random``: a seeded permutation cut into P parts of ⌊N/P⌋ or ⌈N/P⌉ nodes. Cut fraction ≈ 1 − 1/P: the
  baseline every other strategy has to beat.

Balance bound: every part holds at most ⌈(1 + BALANCE_TOLERANCE)·N/P⌉ nodes (spatial and random:
at most ⌈N/P⌉).

Weighted parts (``weights``: P positive shares summing to 1, e.g. for ranks of different speeds): part p gets
about w_p·N nodes. METIS through its target part weights (``tpwgts``), the balance bound then
⌈(1 + BALANCE_TOLERANCE)·w_p·N⌉ per part; spatial bisection splits each box at the weighted quantile of its
parts' shares; random cuts the permutation at the cumulative shares. Spatial and random parts are within a few
nodes of w_p·N. ``weights=None`` or equal shares take the unweighted path: the same assignments as before.

Graphs with walls (``walls`` given and some True): parts balance work, not nodes. Every node costs its node
MLPs and every edge it receives an edge MLP, so node i weighs 1 + (edges it receives) (:func:`work_weights`).
In the SPH boxes walls are ~85 % of the nodes but most of them receive no edge in a given frame: balanced by
count, METIS put the whole fluid and every edge on one part and the idle walls on the others (0.0005 % cut at
P = 2), so one rank did nearly all the work. METIS gets the weights as vertex weights (the balance bound and
the rebalancing step then count weight), spatial bisection cuts at weighted quantiles, random cuts its
permutation at cumulative weight. Graphs without walls keep the node balance (and their stored assignments).

Graph: a given ``edge_index`` is used as is (so callers that built the radius graph do not build it twice);
otherwise it is built with ``datasets.graphs.graph_edges(pos, radius, max_neighbors, walls)``: the radius
graph, or the complete graph when ``radius`` is None (N-body), without wall -> wall edges, the graph the
model trains on (walls with no moving neighbour are then isolated nodes, placed by balance alone). METIS
sees it made undirected (both directions, no self-loops).

Bad input raises ValueError that says what is wrong and how to fix it: P < 1 or P > N, no nodes,
positions that are not (N, 3), NaN/Inf positions, duplicate positions (two nodes at one point mean a
broken source or converter; ``allow_duplicates=True`` accepts them, and then bisection splits coincident
nodes by id), an edge_index out of range, METIS on a graph without edges (nothing to cut: use a larger
radius or ``spatial``), and an empty part (METIS returns some on graphs with fewer nodes than parts per
connected piece, e.g. P close to N or a few cliques). Disconnected graphs are accepted: radius graphs
of fluids have isolated splashes; only an empty or out-of-range part is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pymetis
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from dist_egnn.datasets.graphs import graph_edges
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.partitioners.metrics import PartitionMetrics, partition_metrics
from dist_egnn.partitioners.subgraphs import PartGraph, split_graph

METHODS = ("metis", "spatial", "random")
MAX_COMPLETE_NODES = 4096        # a complete graph on more nodes has > 16.8M edges: ask for a radius
BALANCE_TOLERANCE = 0.03         # METIS parts may exceed N/P by this share (METIS's own k-way default)


@dataclass(frozen=True)
class Partition:
    """A node-to-part assignment of one graph and its quality.

    Id spaces. A node's *global id* is its row in ``pos`` (and in ``edge_index``); ``assignment[g]`` is
    the part that owns global node g, and each node is owned by exactly one part. Splitting the graph
    (:meth:`split`) gives every part its own *local ids*: its owned nodes first, as 0 .. n_owned − 1 in
    increasing global id, then its *halo* nodes (exact mode only) as n_owned .. n_owned + n_halo − 1: the
    remote senders of its cut edges, grouped by the part that owns them. ``PartGraph.local_to_global``
    maps back; ``partitioners/subgraphs.py`` has a worked example.

    Attributes:
        assignment: (N,) int64, part of every node, in [0, num_parts); no part is empty.
        num_parts: P.
        method: ``metis``, ``spatial`` or ``random``.
        seed: the seed the strategy was given (``spatial`` does not use it).
        metrics: cut fraction, boundary fraction, halo sizes, imbalance on ``edge_index``.
        edge_index: (2, E) the graph that was partitioned and measured, row 0 receiving.
    """

    assignment: np.ndarray
    num_parts: int
    method: str
    seed: int
    metrics: PartitionMetrics
    edge_index: np.ndarray = field(repr=False)

    def split(self, halo: bool) -> list[PartGraph]:
        """One :class:`PartGraph` per part (exact halo mode with ``halo=True``, drop mode otherwise)."""
        return split_graph(self.edge_index, self.assignment, self.num_parts, halo)


def partition(pos: np.ndarray, num_parts: int, method: str = "metis", *, radius: float | None = None,
              seed: int = 0, edge_index: np.ndarray | None = None, max_neighbors: int | None = None,
              allow_duplicates: bool = False, weights=None, walls: np.ndarray | None = None,
              wall_neighbors: int = 0, wall_reach: float | None = None) -> Partition:
    """Split the N nodes at ``pos`` (N, 3) into ``num_parts`` non-empty parts; see the module docstring.

    Args:
        pos: (N, 3) positions.
        num_parts: P, 1 <= P <= N.
        method: ``metis``, ``spatial`` or ``random``.
        radius: radius-graph cutoff when ``edge_index`` is not given; None: complete graph.
        seed: non-negative integer; the same seed gives the same assignment.
        edge_index: (2, E) a precomputed graph (row 0 receiving); skips building one.
        max_neighbors: cap of senders per receiver when building the radius graph.
        allow_duplicates: accept several nodes at one position.
        weights: P positive shares of the nodes summing to 1 (:func:`check_weights`); None: equal parts.
        walls: (N,) bool, the walls (node scalar ``type`` 1) when building the graph: no edge joins two.
        wall_neighbors: k > 0: the graph also holds every moving node's k nearest walls as senders
            (``datasets.graphs.graph_edges``), so halos include them; ``wall_reach``: only walls that near.

    With walls, parts balance work instead of nodes (module docstring; ``walls`` also with ``edge_index``).
    """
    pos = _check_positions(pos, allow_duplicates)
    n = len(pos)
    _check_request(n, num_parts, method, seed, radius)
    weights = check_weights(weights, num_parts)
    if edge_index is None:
        edge_index = _build_graph(pos, radius, max_neighbors, walls, wall_neighbors, wall_reach)
    else:
        edge_index = _check_edge_index(edge_index, n)
    work = work_weights(edge_index, n) if walls is not None and np.any(walls) else None
    if method == "metis":
        assignment = metis_assignment(edge_index, n, num_parts, seed, weights, work)
    elif method == "spatial":
        assignment = spatial_assignment(pos, num_parts, weights, work)
    else:
        assignment = random_assignment(n, num_parts, seed, weights, work)
    return Partition(assignment=assignment, num_parts=num_parts, method=method, seed=seed,
                     metrics=partition_metrics(edge_index, assignment, num_parts), edge_index=edge_index)


# ------------------------------------------------------------------------------------------ strategies
def work_weights(edge_index: np.ndarray, num_nodes: int) -> np.ndarray:
    """(N,) int64 cost of every node: 1 for its node MLPs plus one per edge it receives."""
    return 1 + np.bincount(np.asarray(edge_index[0], dtype=np.int64), minlength=num_nodes)


def part_shares(weights: np.ndarray | None, num_parts: int) -> np.ndarray:
    """The parts' target shares: ``weights`` (checked, :func:`check_weights`), or 1/P each for None."""
    return np.full(num_parts, 1.0 / num_parts) if weights is None else weights


def check_weights(weights, num_parts: int) -> np.ndarray | None:
    """``weights`` as a float64 (P,) array of positive shares summing to 1, or None for equal parts (also when
    every share is equal: the unweighted path, whose assignments stored partitions already hold).

    A length other than P, a share that is not positive or a sum off 1 by more than 1e-3 is refused."""
    if weights is None:
        return None
    shares = np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(shares) != num_parts:
        raise ConfigError(f"part weights {shares.tolist()} have {len(shares)} shares for {num_parts} parts: give one "
                          f"share per part")
    if not np.all(np.isfinite(shares)) or np.any(shares <= 0):
        raise ConfigError(f"part weights {shares.tolist()}: every share must be positive")
    if abs(shares.sum() - 1.0) > 1e-3:
        raise ConfigError(f"part weights {shares.tolist()} sum to {shares.sum():.4g}, not 1: shares are fractions of "
                          f"the nodes")
    shares = shares / shares.sum()
    return None if np.all(shares == shares[0]) else shares


def metis_assignment(edge_index: np.ndarray, num_nodes: int, num_parts: int, seed: int,
                     weights: np.ndarray | None = None, work: np.ndarray | None = None) -> np.ndarray:
    """METIS on the graph made undirected, then the balance bound enforced (see the module docstring).
    ``weights``: target shares of the parts (METIS's ``tpwgts``); None: equal. ``work``: (N,) node weights
    (:func:`work_weights`) balanced instead of node counts; None: every node 1.

    Raises ValueError if the graph has no edges or METIS leaves a part empty.
    """
    adjacency = undirected_adjacency(edge_index, num_nodes)
    if adjacency.nnz == 0 and num_parts > 1:
        raise BadInput(f"METIS cannot partition a graph without edges ({num_nodes} nodes, 0 edges besides "
                         f"self-loops): the radius is too small for these positions; use a larger radius or "
                         f"method='spatial'")
    targets = None if weights is None else [float(w) for w in weights]
    result = pymetis.part_graph(num_parts, adjacency=pymetis.CSRAdjacency(adjacency.indptr, adjacency.indices),
                                tpwgts=targets, vweights=None if work is None else work.tolist(),
                                options=pymetis.Options(seed=int(seed) % (2**31 - 1) + 1))  # METIS seeds 0 and 1 agree
    assignment = np.asarray(result.vertex_part, dtype=np.int64)
    counts = np.bincount(assignment, minlength=num_parts)
    if np.any(counts == 0):
        components = connected_components(adjacency, directed=False)[0]
        raise BadInput(f"METIS returned {int(np.sum(counts == 0))} empty parts of {num_parts} for a graph of "
                         f"{num_nodes} nodes in {components} connected pieces (part sizes {counts.tolist()}); "
                         f"use fewer parts or method='spatial' or 'random', which never leave a part empty")
    if work is not None:
        caps = np.ceil((1 + BALANCE_TOLERANCE) * part_shares(weights, num_parts) * work.sum()).astype(np.int64)
        return rebalance_work(adjacency, assignment, num_parts, caps, work)
    if weights is None:
        return rebalance(adjacency, assignment, num_parts, max_part_size(num_nodes, num_parts))
    caps = np.ceil((1 + BALANCE_TOLERANCE) * weights * num_nodes).astype(np.int64)
    return rebalance(adjacency, assignment, num_parts, caps)


def max_part_size(num_nodes: int, num_parts: int) -> int:
    """The balance bound: ⌈(1 + BALANCE_TOLERANCE)·N/P⌉ nodes."""
    return int(np.ceil((1 + BALANCE_TOLERANCE) * num_nodes / num_parts))


def rebalance(adjacency: sp.csr_matrix, assignment: np.ndarray, num_parts: int, cap) -> np.ndarray:
    """Move nodes out of parts above their cap into the part with the most room, most neighbours there first.

    ``cap``: one bound for every part, or one per part (weighted parts); the caps add up to at least N. Each
    step empties the part furthest above its cap into the room of the part furthest below its own (both at
    least one node), so the loop ends with every part at most its cap. With one cap, the part with the most
    room is the smallest part.
    """
    caps = np.broadcast_to(np.asarray(cap, dtype=np.int64), (num_parts,))
    sizes = np.bincount(assignment, minlength=num_parts)
    while np.any(sizes > caps):
        big, small = int(np.argmax(sizes - caps)), int(np.argmax(caps - sizes))
        members = np.flatnonzero(assignment == big)
        rows = adjacency[members]
        gain = rows @ (assignment == small).astype(np.int64) - rows @ (assignment == big).astype(np.int64)
        count = int(min(sizes[big] - caps[big], caps[small] - sizes[small]))
        assignment[members[np.argsort(-gain, kind="stable")[:count]]] = small
        sizes[big] -= count
        sizes[small] += count
    return assignment


def rebalance_work(adjacency: sp.csr_matrix, assignment: np.ndarray, num_parts: int, caps: np.ndarray,
                   work: np.ndarray) -> np.ndarray:
    """:func:`rebalance` counting ``work`` (N,) instead of nodes: each step moves, most neighbours in the
    target part first, the nodes of the heaviest part over its cap that fit in the lightest part's room,
    until the excess is gone (a node heavier than every room moves alone, so the loop always ends)."""
    loads = np.bincount(assignment, weights=work, minlength=num_parts).astype(np.int64)
    for _ in range(len(assignment)):
        if not np.any(loads > caps):
            break
        big, small = int(np.argmax(loads - caps)), int(np.argmax(caps - loads))
        members = np.flatnonzero(assignment == big)
        if len(members) == 1:
            break
        rows = adjacency[members]
        gain = rows @ (assignment == small).astype(np.int64) - rows @ (assignment == big).astype(np.int64)
        order = members[np.argsort(-gain, kind="stable")]
        moved = np.cumsum(work[order])
        count = int(np.searchsorted(moved, min(loads[big] - caps[big], caps[small] - loads[small]), side="left")) + 1
        count = min(count, len(members) - 1)
        chosen = order[:count]
        assignment[chosen] = small
        loads[big] -= int(work[chosen].sum())
        loads[small] += int(work[chosen].sum())
    return assignment


def undirected_adjacency(edge_index: np.ndarray, num_nodes: int) -> sp.csr_matrix:
    """The graph as METIS needs it: CSR with both directions of every edge, no self-loops, no repeats."""
    recv, send = edge_index
    keep = recv != send
    recv, send = recv[keep], send[keep]
    ones = np.ones(2 * len(recv), dtype=bool)                 # repeats merge into one True
    adjacency = sp.coo_matrix((ones, (np.concatenate([recv, send]), np.concatenate([send, recv]))),
                              shape=(num_nodes, num_nodes)).tocsr()
    adjacency.sum_duplicates()
    return adjacency


def spatial_assignment(pos: np.ndarray, num_parts: int, weights: np.ndarray | None = None,
                       work: np.ndarray | None = None) -> np.ndarray:
    """Recursive coordinate bisection: parts of ⌊N/P⌋ or ⌈N/P⌉ nodes (about w_p·N with ``weights``), compact boxes.
    ``work`` (N,): each cut at the weighted quantile instead (parts of about equal work)."""
    assignment = np.empty(len(pos), dtype=np.int64)
    pending = [(np.arange(len(pos)), 0, num_parts)]          # (global ids, first part, parts to make)
    while pending:
        nodes, first, parts = pending.pop()
        if parts == 1:
            assignment[nodes] = first
            continue
        coords = pos[nodes]
        axis = int(np.argmax(coords.max(axis=0) - coords.min(axis=0)))
        order = nodes[np.lexsort((nodes, coords[:, axis]))]  # along the axis, ties by global id
        left = parts // 2
        if weights is None and work is None:
            cut = len(nodes) * left // parts                  # keeps every part within ⌊N/P⌋..⌈N/P⌉
        else:                                                 # the left parts' share, each side a node per part
            share = left / parts if weights is None else (weights[first:first + left].sum()
                                                          / weights[first:first + parts].sum())
            if work is None:                                  # of the box's nodes
                cut = int(round(len(nodes) * share))
            else:                                             # of the box's work
                load = np.cumsum(work[order])
                cut = int(np.searchsorted(load, share * load[-1], side="left")) + 1
            cut = min(max(cut, left), len(nodes) - (parts - left))
        pending += [(order[:cut], first, left), (order[cut:], first + left, parts - left)]
    return assignment


def random_assignment(num_nodes: int, num_parts: int, seed: int, weights: np.ndarray | None = None,
                      work: np.ndarray | None = None) -> np.ndarray:
    """A seeded permutation cut into num_parts near-equal parts (at the cumulative shares with ``weights``;
    with ``work`` (N,) at cumulative work instead of node counts)."""
    assignment = np.empty(num_nodes, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(num_nodes)
    if weights is None and work is None:
        assignment[order] = np.arange(num_nodes) * num_parts // num_nodes
        return assignment
    if work is None:                                                           # at cumulative node shares
        bounds = np.round(np.cumsum(weights)[:-1] * num_nodes).astype(np.int64)
    else:                                                                      # at cumulative work shares
        load = np.cumsum(work[order])
        bounds = np.searchsorted(load, np.cumsum(part_shares(weights, num_parts))[:-1] * load[-1], side="left") + 1
    bounds = np.maximum(bounds, np.arange(1, num_parts))                       # a node for every part
    bounds = np.minimum(bounds, num_nodes - num_parts + np.arange(1, num_parts))
    assignment[order] = np.searchsorted(bounds, np.arange(num_nodes), side="right")
    return assignment


# --------------------------------------------------------------------------------------------- checks
def _check_positions(pos, allow_duplicates: bool) -> np.ndarray:
    pos = np.asarray(pos)
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise BadInput(f"positions must be an (N, 3) array, got shape {pos.shape}")
    if len(pos) == 0:
        raise BadInput("the graph is empty (0 nodes): there is nothing to partition; check the sample's "
                         "node range")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        raise BadInput(f"positions hold NaN or Inf at {int(bad.sum())} of {len(pos)} nodes (first: node "
                         f"{int(np.flatnonzero(bad)[0])}); fix or regenerate the data before partitioning")
    if not allow_duplicates:
        order = np.lexsort(pos.T[::-1])
        same = np.flatnonzero(np.all(pos[order[1:]] == pos[order[:-1]], axis=1))
        if len(same):
            i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
            raise BadInput(f"positions hold {len(same)} duplicates: nodes {i} and {j} are both at "
                             f"{pos[i].tolist()}; remove duplicated nodes or pass allow_duplicates=True "
                             f"if coincident nodes are intended")
    return pos


def _check_request(n: int, num_parts: int, method: str, seed: int, radius: float | None) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown partition method {method!r}: choose one of {METHODS}")
    if not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ConfigError(f"num_parts={num_parts!r}: need an integer >= 1")
    if num_parts > n:
        raise BadInput(f"num_parts={num_parts} is more than the {n} nodes of the graph: every part needs a "
                         f"node; use at most {n} parts")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r}: need a non-negative integer")
    if radius is not None and not radius > 0:
        raise ConfigError(f"radius={radius!r}: need a positive cutoff, or None for the complete graph")


def _build_graph(pos: np.ndarray, radius: float | None, max_neighbors: int | None,
                 walls: np.ndarray | None, wall_neighbors: int = 0, wall_reach: float | None = None) -> np.ndarray:
    if radius is None and len(pos) > MAX_COMPLETE_NODES:
        raise BadInput(f"radius=None asks for the complete graph, which on {len(pos)} nodes has "
                         f"{len(pos) * (len(pos) - 1):,} edges; give a radius (or an edge_index)")
    if walls is not None and np.shape(walls) != (len(pos),):
        raise BadInput(f"walls must be one bool per node ({len(pos)},), got shape {np.shape(walls)}")
    return graph_edges(pos, radius, max_neighbors, None if walls is None else np.asarray(walls, dtype=bool),
                       wall_neighbors, wall_reach)


def _check_edge_index(edge_index, n: int) -> np.ndarray:
    edge_index = np.asarray(edge_index)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2 or not np.issubdtype(edge_index.dtype, np.integer):
        raise BadInput(f"edge_index must be a (2, E) integer array, got shape {edge_index.shape} of "
                         f"{edge_index.dtype}")
    if edge_index.size and (edge_index.min() < 0 or edge_index.max() >= n):
        raise BadInput(f"edge_index refers to nodes outside 0..{n - 1} (min {edge_index.min()}, max "
                         f"{edge_index.max()}): it does not belong to these {n} positions")
    return edge_index
