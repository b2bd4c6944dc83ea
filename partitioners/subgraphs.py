"""From a node-to-part assignment to the subgraph each rank works on, with its halo.

Id spaces (see also ``dist_egnn.keys``):

* global id: a node's row in the whole graph (one sample), 0 .. N-1.
* local id: a node's row on the part that holds it. Owned nodes come first, in increasing global id
  (local ids 0 .. n_owned-1); halo nodes follow (n_owned .. n_owned+n_halo-1).
* halo nodes: nodes owned by another part that send an edge to one of this part's nodes. They are
  ordered by (owner part, global id), so the halo rows coming from one owner form one contiguous block,
  which is exactly what an all-to-all exchange delivers.

Every edge lives on the part that owns its receiver (``edge_index[0]``), because that is where its message
is aggregated. In ``halo=True`` mode a part keeps all edges it receives (cut edges read their sender from
the halo): P parts compute exactly what one device computes. In ``halo=False`` mode (the paper's DistEGNN)
cut edges are dropped and the halo is empty.

Worked example: path graph 0-1-2-3 (both directions), assignment [0, 0, 1, 1], halo=True.
Part 0 owns global [0, 1] (local 0, 1) and receives edge 1<-2 from part 1: halo = [2] (local 2).
Part 1 owns global [2, 3] (local 0, 1), halo = [1] (local 2). Part 0 sends its local 1 (global 1) to
part 1: ``send[1] = [1]``; part 1 sends its local 0 (global 2) to part 0: ``send[0] = [0]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from dist_egnn.errors import BadInput, ConfigError


@dataclass
class PartNodes:
    """The nodes one part holds: what a rank needs to place its rows and to exchange its halo.

    Built from a whole graph by :func:`split_graph` (as a :class:`PartGraph`, with edges), or from a stored
    assignment and halo mask by :func:`part_nodes`, by a rank that never sees the whole graph.
    """

    part: int
    num_parts: int
    owned: np.ndarray              # (n_owned,) global ids of owned nodes, increasing: local id k <-> owned[k]
    halo: np.ndarray               # (n_halo,) global ids of halo nodes: local id n_owned + k <-> halo[k]
    halo_owner: np.ndarray         # (n_halo,) part that owns each halo node (non-decreasing)
    send: dict[int, np.ndarray]
    """part q -> local ids of owned nodes that q holds as halo, in q's halo order (increasing global id)."""

    @property
    def num_owned(self) -> int:
        return len(self.owned)

    @property
    def num_halo(self) -> int:
        return len(self.halo)

    @property
    def local_to_global(self) -> np.ndarray:
        """(n_owned + n_halo,) global id of every local row."""
        return np.concatenate([self.owned, self.halo])

    def global_to_local(self, global_ids: np.ndarray) -> np.ndarray:
        """Local row of each global id; -1 for nodes this part neither owns nor holds as halo."""
        rows = self.local_to_global
        order = np.argsort(rows, kind="stable")
        ids = np.asarray(global_ids, dtype=np.int64)
        if len(rows) == 0:
            return np.full(ids.shape, -1, dtype=np.int64)
        at = np.minimum(np.searchsorted(rows[order], ids), len(rows) - 1)
        return np.where(rows[order][at] == ids, order[at], -1)

    def halo_counts(self) -> np.ndarray:
        """(num_parts,) how many halo rows come from each part (all-to-all receive sizes)."""
        return np.bincount(self.halo_owner, minlength=self.num_parts)

    def send_counts(self) -> np.ndarray:
        """(num_parts,) how many owned rows go to each part (all-to-all send sizes)."""
        return np.array([len(self.send.get(q, ())) for q in range(self.num_parts)], dtype=np.int64)


@dataclass
class PartGraph(PartNodes):
    """One part of a partitioned graph, as the rank that owns it sees it: its nodes and the edges it receives."""

    edge_index: np.ndarray = field(default_factory=lambda: np.zeros((2, 0), np.int64))
    """(2, E_part) local ids; receivers < n_owned."""
    edge_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """(E_part,) position of each edge in the whole graph's edge list."""

    @property
    def cut_edge_mask(self) -> np.ndarray:
        """(E_part,) True for edges whose sender is a halo row: the cut edges this part receives (exact mode)."""
        return self.edge_index[1] >= self.num_owned


def split_graph(edge_index: np.ndarray, assignment: np.ndarray, num_parts: int, halo: bool) -> list[PartGraph]:
    """Cut a graph into one :class:`PartGraph` per part.

    Args:
        edge_index: (2, E) global ids, row 0 receives.
        assignment: (N,) part of every node, in [0, num_parts).
        halo: keep cut edges and build the 1-hop halo (exact mode), or drop them (paper mode).
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    n = len(assignment)
    if n and (assignment.min() < 0 or assignment.max() >= num_parts):
        raise BadInput(f"assignment holds parts outside [0, {num_parts})")
    counts = np.bincount(assignment, minlength=num_parts)
    if np.any(counts == 0):
        raise BadInput(f"parts {np.flatnonzero(counts == 0).tolist()} of {num_parts} are empty; every part "
                         f"needs at least one node (choose fewer parts or another partitioner)")
    order = np.argsort(assignment, kind="stable")          # grouped by part, increasing global id inside
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = np.empty(n, dtype=np.int64)
    local[order] = np.arange(n) - np.repeat(starts, counts)

    recv, send = edge_index
    recv_part, send_part = assignment[recv], assignment[send]
    slot = np.full(n, -1, dtype=np.int64)                   # scratch: global id -> local halo row
    parts = []
    for p in range(num_parts):
        owned = order[starts[p]:starts[p] + counts[p]]
        mine = recv_part == p if halo else (recv_part == p) & (send_part == p)
        edge_ids = np.flatnonzero(mine)
        r, s = recv[edge_ids], send[edge_ids]
        remote = send_part[edge_ids] != p
        halo_nodes = np.unique(s[remote])
        halo_nodes = halo_nodes[np.lexsort((halo_nodes, assignment[halo_nodes]))]
        slot[halo_nodes] = counts[p] + np.arange(len(halo_nodes))
        local_send = np.where(remote, slot[s], local[s])
        slot[halo_nodes] = -1
        parts.append(PartGraph(part=p, num_parts=num_parts, owned=owned, halo=halo_nodes,
                               halo_owner=assignment[halo_nodes], edge_index=np.stack([local[r], local_send]),
                               edge_ids=edge_ids, send={}))
    for q, part_q in enumerate(parts):                      # q's halo block from owner p = p's send list to q
        for p in np.unique(part_q.halo_owner):
            parts[p].send[q] = local[part_q.halo[part_q.halo_owner == p]]
    return parts


# ------------------------------------------------------------------------ parts without the whole graph
def halo_mask(edge_index: np.ndarray, assignment: np.ndarray, num_parts: int) -> np.ndarray:
    """(N,) bit mask of the halos each node belongs to: bit p is set if part p receives an edge from it.

    This, with the assignment, is all a rank needs to know its halo and its send lists without the graph
    (:func:`part_nodes`). The dtype is the narrowest unsigned integer with ``num_parts`` bits (at most 64).
    """
    if num_parts > 64:
        raise ConfigError(f"halo masks hold at most 64 parts; got num_parts={num_parts}")
    dtype = mask_dtype(num_parts)
    assignment = np.asarray(assignment, dtype=np.int64)
    recv, send = edge_index
    cut = assignment[recv] != assignment[send]
    mask = np.zeros(len(assignment), dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), assignment[recv[cut]].astype(np.uint64))
    np.bitwise_or.at(mask, send[cut], bits)
    return mask.astype(dtype)


def mask_dtype(num_parts: int) -> np.dtype:
    """The narrowest unsigned integer type with a bit per part."""
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if num_parts <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    raise ConfigError(f"halo masks hold at most 64 parts; got num_parts={num_parts}")


def part_nodes(assignment: np.ndarray, mask: np.ndarray | None, part: int, num_parts: int) -> PartNodes:
    """The nodes of ``part`` from a stored assignment (N,) and halo mask (N,) (None: drop mode, no halo).

    Gives the same owned, halo, halo_owner and send lists as :func:`split_graph` on the graph the mask was
    made from.
    """
    assignment = np.asarray(assignment, dtype=np.int64)
    owned = np.flatnonzero(assignment == part)
    if mask is None or num_parts == 1:
        empty = np.zeros(0, np.int64)
        return PartNodes(part=part, num_parts=num_parts, owned=owned, halo=empty, halo_owner=empty, send={})
    mask = np.asarray(mask).astype(np.uint64)
    member = lambda q: (mask >> np.uint64(q)) & np.uint64(1) == 1  # noqa: E731
    halo = np.flatnonzero(member(part))
    halo = halo[np.argsort(assignment[halo], kind="stable")]      # by owner, increasing global id inside
    mine = assignment == part
    send = {}
    for q in range(num_parts):
        if q != part:
            sent = np.flatnonzero(mine & member(q))
            if len(sent):
                send[q] = np.searchsorted(owned, sent)
    return PartNodes(part=part, num_parts=num_parts, owned=owned, halo=halo, halo_owner=assignment[halo], send=send)


@dataclass
class StackedParts:
    """One rank's parts of B graphs stacked into one batch, and the all-to-all that fills its halo rows.

    Batch rows: the owned rows of graph 0, graph 1, ..., graph B−1 first (``owned_offsets``), then every
    halo row, grouped by the part that owns it and, inside that, by graph: the rows arriving from part q
    form one contiguous block, which is what an all-to-all delivers. The send list to part q holds, graph
    after graph, the owned rows q holds as halo, in q's order; both sides derive the same order from the
    same rule, so no ids travel.
    """

    owned_offsets: np.ndarray      # (B + 1,) graph b owns batch rows owned_offsets[b] .. owned_offsets[b+1]−1
    halo_rows: list[np.ndarray]    # per graph: (n_halo_b,) batch row of each of its halo nodes
    send_index: np.ndarray         # (S,) batch rows sent, grouped by destination part
    send_counts: np.ndarray        # (P,)
    recv_counts: np.ndarray        # (P,)

    @property
    def num_owned(self) -> int:
        return int(self.owned_offsets[-1])

    @property
    def num_rows(self) -> int:
        return self.num_owned + int(self.recv_counts.sum())

    def batch_rows(self, graph: int, local_ids: np.ndarray) -> np.ndarray:
        """Local ids of graph ``graph``'s part (owned first, then halo) -> batch rows."""
        local_ids = np.asarray(local_ids, dtype=np.int64)
        n_owned = self.owned_offsets[graph + 1] - self.owned_offsets[graph]
        halo = self.halo_rows[graph]
        is_halo = local_ids >= n_owned
        rows = local_ids + self.owned_offsets[graph]
        if halo.size:
            rows[is_halo] = halo[local_ids[is_halo] - n_owned]
        return rows

    def halo_plan(self) -> HaloPlan:
        """The all-to-all that fills this batch's halo rows."""
        return HaloPlan(torch.from_numpy(np.ascontiguousarray(self.send_index, dtype=np.int64)),
                        self.send_counts.tolist(), self.recv_counts.tolist())


def stack_parts(parts: list[PartNodes]) -> StackedParts:
    """Stack one rank's parts of several graphs into one batch; see :class:`StackedParts`."""
    num_parts = parts[0].num_parts
    owned_offsets = np.concatenate([[0], np.cumsum([p.num_owned for p in parts])]).astype(np.int64)
    counts = np.stack([p.halo_counts() for p in parts]) if parts else np.zeros((0, num_parts), np.int64)  # (B, P)
    starts = owned_offsets[-1] + np.concatenate([[0], np.cumsum(counts.T.ravel())[:-1]]).reshape(num_parts, -1)
    halo_rows = []
    for b, p in enumerate(parts):
        first_of_owner = np.concatenate([[0], np.cumsum(counts[b])[:-1]])
        within = np.arange(p.num_halo) - first_of_owner[p.halo_owner]
        halo_rows.append((starts[p.halo_owner, b] + within).astype(np.int64))
    send_lists = [[owned_offsets[b] + p.send.get(q, np.zeros(0, np.int64)) for b, p in enumerate(parts)]
                  for q in range(num_parts)]
    send_counts = np.array([sum(len(s) for s in lists) for lists in send_lists], dtype=np.int64)
    flat = [s for lists in send_lists for s in lists]
    send_index = np.concatenate(flat).astype(np.int64) if flat else np.zeros(0, np.int64)
    return StackedParts(owned_offsets=owned_offsets, halo_rows=halo_rows, send_index=send_index,
                        send_counts=send_counts, recv_counts=counts.sum(axis=0).astype(np.int64))


@dataclass
class HaloPlan:
    """Who sends which owned rows to whom, for one batch; ranks are numbered within the graph group.

    What ``dist_egnn.parallel.collectives.HaloExchange`` runs: made from a :class:`StackedParts` by
    :meth:`StackedParts.halo_plan`.

    send_index:  (S,) local ids of owned rows to send, grouped by destination rank (0, 1, .., P-1).
    send_counts: (P,) rows sent to each rank (0 to itself).
    recv_counts: (P,) halo rows received from each rank, in the order the halo rows are stored: the halo
                 block from rank q is a contiguous run of rows (:func:`stack_parts` orders them so).
    """

    send_index: Tensor
    send_counts: list[int]
    recv_counts: list[int]

    @property
    def num_recv(self) -> int:
        return int(sum(self.recv_counts))

    def to(self, device: torch.device | str) -> "HaloPlan":
        return HaloPlan(self.send_index.to(device), self.send_counts, self.recv_counts)
