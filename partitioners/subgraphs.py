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


@dataclass
class PartGraph:
    """One part of a partitioned graph, as the rank that owns it sees it."""

    part: int
    num_parts: int
    owned: np.ndarray              # (n_owned,) global ids of owned nodes, increasing: local id k <-> owned[k]
    halo: np.ndarray               # (n_halo,) global ids of halo nodes: local id n_owned + k <-> halo[k]
    halo_owner: np.ndarray         # (n_halo,) part that owns each halo node (non-decreasing)
    edge_index: np.ndarray         # (2, E_part) local ids; receivers < n_owned
    edge_ids: np.ndarray           # (E_part,) position of each edge in the whole graph's edge list
    send: dict[int, np.ndarray] = field(default_factory=dict)
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

    @property
    def cut_edge_mask(self) -> np.ndarray:
        """(E_part,) True for edges whose sender is a halo row: the cut edges this part receives (exact mode)."""
        return self.edge_index[1] >= self.num_owned

    def halo_counts(self) -> np.ndarray:
        """(num_parts,) how many halo rows come from each part (all-to-all receive sizes)."""
        return np.bincount(self.halo_owner, minlength=self.num_parts)

    def send_counts(self) -> np.ndarray:
        """(num_parts,) how many owned rows go to each part (all-to-all send sizes)."""
        return np.array([len(self.send.get(q, ())) for q in range(self.num_parts)], dtype=np.int64)


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
        raise ValueError(f"assignment holds parts outside [0, {num_parts})")
    counts = np.bincount(assignment, minlength=num_parts)
    if np.any(counts == 0):
        raise ValueError(f"parts {np.flatnonzero(counts == 0).tolist()} of {num_parts} are empty; every part "
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
                               edge_ids=edge_ids))
    for q, part_q in enumerate(parts):                      # q's halo block from owner p = p's send list to q
        for p in np.unique(part_q.halo_owner):
            parts[p].send[q] = local[part_q.halo[part_q.halo_owner == p]]
    return parts
