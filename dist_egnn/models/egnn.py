"""EGNN with velocity (Satorras et al. 2021): the baseline, and the real-node half of FastEGNN.

One layer (docs/maths.md §2 without the virtual terms), every term reading the layer's inputs:

    m_ij  = phi_e([h_i, h_j, |x_i - x_j|^2, e_ij])                                  (1) real-real message
    x_i'  = x_i + mean_j (x_i - x_j) phi_x(m_ij) + phi_v(h_i) v_i [+ phi_g(h_i) g]    (4) coordinates
    h_i'  = h_i + phi_h([h_i, mean_j m_ij, a_i])                                     (6) features

``mean_j`` runs over the senders j of edges received by i (0 for a node without edges). The velocity v is
the input velocity in every layer. The external field g (``gravity``, (B, 3) per graph, docs/maths.md §8) is a
summand of (4) only in a model built with ``external_field=True``; without it the model has no phi_g at all.
With ``normalize=True`` (the authors' N-body configuration) the real-real sum of (4) reads
(x_i - x_j) / (|x_i - x_j| + 1e-8) with the norm detached from autograd (:data:`NORMALIZE_EPS`).

Shapes: N real nodes (owned by this process), N_all = N + halo rows, E edges (receivers < N), B graphs,
H hidden, F node features, D edge features, A node attributes.

Mixed precision: under ``torch.autocast(dtype=torch.bfloat16)`` (``trainer.precision=bf16``) the products of the
MLPs phi_e, phi_x, phi_v, phi_h (and, in FastEGNN, phi_ev, phi_xv, phi_X, phi_hv) run in bfloat16. Float32 stay:
positions, x_i - x_j and every coordinate update; the geometry columns of the first layers (|x_i - x_j|^2, e_ij)
and their products; every sum or mean over edges or nodes; the node features h between layers (the residual
stream; the embedding, a K = F product, runs in float32 too); the outputs ``pos`` and ``virtual_pos``. What reads
h, mean_j m_ij and mean_c m_ic is only MLPs, which see their bf16 rounding anyway: a layer makes one bf16 copy of
each, shared by its readers and kept for backward in place of the float32 tensor (half the bytes; the readers'
gradients of h add up in bf16 before autograd casts them back). The fused blocks follow the same rules
(:mod:`dist_egnn.models.fused`); without autocast nothing changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dist_egnn.keys import RECEIVER, SENDER
from dist_egnn.models.blocks import coordinate_mlp, field_mlp, message_mlp, update_mlp, velocity_mlp
from dist_egnn.models.fused import NORMALIZE_EPS, edge_messages
from dist_egnn.models.ops import (
    count_per_segment,
    full_precision,
    low_precision,
    mlp_inputs,
    scatter_sum,
    split_columns,
)
from dist_egnn.parallel.seam import Ready, SingleProcess


class Prediction(NamedTuple):
    """What a model returns: predicted real positions (N, 3) and, for FastEGNN, virtual positions (B, 3, C)."""

    pos: Tensor
    virtual_pos: Tensor | None = None


@dataclass
class EdgeSplit:
    """The edges split for overlap (``distributed.overlap``): interior edges, whose sender this process owns, need
    no halo and are computed while the halo exchange is in flight; the cut edges after it.

    Both keep the receiver-sorted order of the context's edges (a stable split), so every sum adds its terms in
    the same order on every run. The cut edges are numbered in a compact block of their own nodes, [the owned
    rows that receive cut edges (``cut_rows``, ascending); the halo rows], so the cut-edge block projects and
    keeps those rows only, not every owned row again.
    """

    interior_index: Tensor    # (2, E_in): both ends < N
    interior_attr: Tensor     # (E_in, D)
    cut_index: Tensor         # (2, E_cut): receiver k is owned row cut_rows[k]; sender len(cut_rows) + halo row r
    cut_attr: Tensor          # (E_cut, D)
    cut_rows: Tensor          # (K,): owned rows that receive cut edges, ascending

    @staticmethod
    def of(edge_index: Tensor, edge_attr: Tensor, num_owned: int) -> "EdgeSplit":
        """Split (2, E) edges (receivers < N owned, senders < N_all) into interior and cut edges."""
        is_cut = edge_index[SENDER] >= num_owned
        cut = edge_index[:, is_cut]
        cut_rows, receiver = torch.unique(cut[RECEIVER], sorted=True, return_inverse=True)
        cut_index = torch.empty_like(cut)
        cut_index[RECEIVER] = receiver
        cut_index[SENDER] = cut[SENDER] - num_owned + cut_rows.shape[0]
        return EdgeSplit(edge_index[:, ~is_cut], edge_attr[~is_cut], cut_index, edge_attr[is_cut], cut_rows)


class Deferred:
    """A handle whose ``wait()`` completes a communicator handle and applies ``then`` to its tensors."""

    def __init__(self, handle, then):
        self.handle, self.then = handle, then

    def wait(self) -> tuple[Tensor, ...]:
        return self.then(self.handle.wait())


@dataclass
class GraphContext:
    """Everything about the graph that stays fixed through the layers of one forward pass."""

    edge_index: Tensor        # (2, E), row RECEIVER < N (owned), row SENDER < N_all (owned or halo)
    edge_attr: Tensor         # (E, D)
    batch: Tensor             # (N,)
    num_graphs: int           # B
    node_attr: Tensor | None  # (N, A) or None
    inv_degree: Tensor        # (N, 1): 1 / number of received edges, 0 for a node without edges
    node_count: Tensor        # (B, 1): real nodes per graph over ALL processes (a float, for division)
    comm: object              # SingleProcess or a distributed communicator (dist_egnn.parallel.seam)
    edge_chunk_size: int | None
    split: EdgeSplit | None = None   # interior and cut edges when the communicator overlaps (comm.overlap)
    field: Tensor | None = None      # (N, 3): the external field g of each node's graph; None: no field
    moving: Tensor | None = None     # (N,) bool: the nodes the centroid averages (not walls); None: every node
    moving_count: Tensor | None = None   # (B, 1): moving nodes per graph over ALL processes (with ``moving``)

    @cached_property
    def moving_index(self) -> Tensor | None:
        """(M,) indices of the moving nodes (None without ``moving``): found once per forward, when first asked
        for (a nonzero waits for the device)."""
        return None if self.moving is None else self.moving.nonzero().squeeze(1)

    def graph_means(self, *per_node: Tensor) -> tuple[Tensor, ...]:
        """Exact per-graph means over all real nodes of all processes: (N, *S) -> (B, *S) for each input."""
        return self.means_of_sums(*(scatter_sum(v, self.batch, self.num_graphs) for v in per_node))

    def means_of_sums(self, *local_sums: Tensor) -> tuple[Tensor, ...]:
        """Per-graph means from per-graph sums over this process's real nodes: (B, *S) -> (B, *S) each."""
        return self.divide_by_count(self.comm.sum_over_parts(*local_sums))

    def start_graph_means(self, *per_node: Tensor) -> Deferred | Ready:
        """:meth:`graph_means` as a handle (see :meth:`start_means`)."""
        return self.start_means(*(scatter_sum(v, self.batch, self.num_graphs) for v in per_node))

    def start_means(self, *local_sums: Tensor, count: Tensor | None = None) -> Deferred | Ready:
        """:meth:`means_of_sums` as a handle: with overlap the all-reduce is issued now and ``wait()`` completes it
        (work in between hides its latency); without, the means are computed now (the blocking all-reduce).
        ``count`` (B, 1) divides instead of the real-node count (e.g. ``moving_count`` for sums over the moving
        nodes; a graph whose count is 0 has zero sums and gets zero means)."""
        divide = lambda sums: self.divide_by_count(sums, count)  # noqa: E731
        if self.split is None:
            return Ready(divide(self.comm.sum_over_parts(*local_sums)))
        return Deferred(self.comm.start_sum(*local_sums), divide)

    def divide_by_count(self, sums: tuple[Tensor, ...], count: Tensor | None = None) -> tuple[Tensor, ...]:
        count = self.node_count if count is None else count.clamp(min=1)
        return tuple(s / count.view(-1, *([1] * (s.dim() - 1))) for s in sums)

    def centroid(self, pos: Tensor) -> Tensor:
        """x̄ (docs/maths.md §2 term 2, §8 walls): per-graph mean position of the moving nodes of all processes,
        (N, 3) -> (B, 3). Without a mask it is :meth:`graph_means` itself (every real node, bit for bit); a graph
        with no moving node takes the mean of all its nodes."""
        if self.moving is None:
            return self.graph_means(pos)[0]
        return self.centroid_of(self.comm.sum_over_parts(*self.centroid_sums(pos)))

    def start_centroid(self, pos: Tensor) -> Deferred | Ready:
        """:meth:`centroid` as a handle whose ``wait()`` gives ``(centroid,)`` (see :meth:`start_means`)."""
        if self.moving is None:
            return self.start_graph_means(pos)
        if self.split is None:
            return Ready((self.centroid(pos),))
        return Deferred(self.comm.start_sum(*self.centroid_sums(pos)), lambda sums: (self.centroid_of(sums),))

    def centroid_sums(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Per-graph sums over this process's nodes of the moving nodes' positions and of all positions: (B, 3)."""
        moving_pos = pos.masked_fill(~self.moving.unsqueeze(1), 0.0)
        return scatter_sum(moving_pos, self.batch, self.num_graphs), scatter_sum(pos, self.batch, self.num_graphs)

    def centroid_of(self, sums: tuple[Tensor, Tensor]) -> Tensor:
        """(B, 3) centroids from the summed :meth:`centroid_sums` of all processes."""
        moving_sum, every_sum = sums
        return torch.where(self.moving_count > 0, moving_sum / self.moving_count.clamp(min=1),
                           every_sum / self.node_count)


class EGNNLayer(nn.Module):
    """One EGNN layer: terms (1), (4) and (6) above.

    ``extra_node_inputs`` widens phi_h's input for subclasses that add more aggregated messages (FastEGNN).
    ``external_field`` adds phi_g (``field_mlp``) and the summand phi_g(h_i) g of (4); without it the layer has
    no such parameters. ``normalize`` divides x_i - x_j by its detached norm (+ 1e-8) in the real-real sum of (4).
    ``fused`` (default True) runs the per-edge work through the hand-written, recomputing autograd functions
    of :mod:`dist_egnn.models.fused`; False runs the plain autograd composition (same maths, more memory).
    """

    fused: bool = True

    def __init__(self, hidden: int, edge_features: int, node_attrs: int, extra_node_inputs: int = 0,
                 external_field: bool = False, normalize: bool = False):
        super().__init__()
        self.hidden = hidden
        self.edge_features = edge_features
        self.normalize = bool(normalize)
        self.edge_mlp = message_mlp(2 * hidden + 1 + edge_features, hidden)          # phi_e
        self.coord_mlp = coordinate_mlp(hidden)                                      # phi_x
        self.velocity_mlp = velocity_mlp(hidden)                                     # phi_v
        if external_field:
            self.field_mlp = field_mlp(hidden)                                       # phi_g
        else:
            self.field_mlp = None
        self.node_mlp = update_mlp(2 * hidden + extra_node_inputs + node_attrs, hidden)  # phi_h

    def forward(self, h: Tensor, pos: Tensor, vel: Tensor, ctx: GraphContext) -> tuple[Tensor, Tensor]:
        """(h (N, H), pos (N, 3), vel (N, 3)) -> (h' (N, H), pos' (N, 3))."""
        if ctx.split is None:
            h_all, pos_all = ctx.comm.exchange_halo(h, pos)
            h_all, h_read = self.mlp_reads(h, h_all, pos)
            message, displacement = self.real_messages(h_all, pos_all, ctx)
        else:                                       # overlap: the interior edges while the halo is in flight
            halo = ctx.comm.start_halo(h, pos)
            h_read = self.mlp_read(h, pos)
            message, displacement = self.real_messages_with_cut(self.interior_sums(h_read, pos, ctx), halo, h_read,
                                                                pos, ctx)
        pos_new = pos + displacement + self.own_motion(h_read, vel, ctx)
        h_new = h + self.recomputed(self.feature_update, ctx.node_attr, h_read,
                                    *mlp_inputs(low_precision(pos), message))
        return h_new, pos_new

    @staticmethod
    def mlp_reads(h: Tensor, h_all: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(h_all, h) as the layer's MLPs and message blocks read them: unchanged, or under autocast one bfloat16
        copy of h_all and its owned rows (the only rounding any of them sees; backward keeps it, not h)."""
        low = low_precision(pos)
        if low is None:
            return h_all, h
        h_all = h_all.to(low)
        return h_all, h_all[:h.shape[0]]

    @staticmethod
    def mlp_read(h: Tensor, pos: Tensor) -> Tensor:
        """The owned rows h as the layer reads them (overlap: the halo rows come later): h, or its bf16 copy."""
        low = low_precision(pos)
        return h if low is None else h.to(low)

    # -- term (6) ------------------------------------------------------------------------------------------
    def feature_update(self, node_attr: Tensor | None, h: Tensor, *messages: Tensor) -> Tensor:
        """phi_h([h_i, mean_j m_ij, (mean_c m_ic,) a_i]): (N, H)."""
        return self.node_mlp(_cat_attr([h, *messages], node_attr))

    def recomputed(self, fn, *args):
        """``fn(*args)``; with ``fused``, its node-sized intermediates are recomputed in backward, not kept."""
        if self.fused and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    # -- term (1) and the real part of (4) -------------------------------------------------------------
    def real_messages(self, h_all: Tensor, pos_all: Tensor, ctx: GraphContext) -> tuple[Tensor, Tensor]:
        """mean_j m_ij (N, H) and mean_j (x_i - x_j) phi_x(m_ij) (N, 3).

        The first Linear of phi_e is applied in pieces: the h_i and h_j blocks once per node, then gathered
        onto the edges, so no (E, 2H + 1 + D) input is ever built. The edge work itself runs in
        :class:`~dist_egnn.models.fused.EdgeMessages` (chunks of ``edge_chunk_size`` edges, recomputed in
        backward: no (E, H) tensor is kept); ``fused = False`` runs the plain autograd version below.
        """
        msg_sum, disp_sum = self.edge_sums(h_all, pos_all, ctx.edge_index, ctx.edge_attr, ctx.inv_degree.shape[0],
                                           ctx.edge_chunk_size)
        return msg_sum * ctx.inv_degree, disp_sum * ctx.inv_degree

    def interior_sums(self, h: Tensor, pos: Tensor, ctx: GraphContext) -> tuple[Tensor, Tensor]:
        """Overlap, before the halo arrives: the sums of :meth:`real_messages` over the interior edges (senders
        owned here), (N, H) and (N, 3), from the owned rows alone."""
        split = ctx.split
        return self.edge_sums(h, pos, split.interior_index, split.interior_attr, pos.shape[0], ctx.edge_chunk_size)

    def real_messages_with_cut(self, interior: tuple[Tensor, Tensor], halo, h: Tensor, pos: Tensor,
                               ctx: GraphContext) -> tuple[Tensor, Tensor]:
        """Overlap, after the interior edges: wait for the halo rows (``halo``, a ``start_halo`` handle), add the
        cut edges' sums to ``interior`` and divide by the degree: what :meth:`real_messages` returns.

        The cut-edge block runs on every rank, on zero edges too: it keeps the halo exchange in the autograd
        graph, so every rank issues its adjoint in backward (a collective all ranks must join)."""
        split = ctx.split
        h_halo, pos_halo = halo.wait()
        rows = split.cut_rows
        block_h = torch.cat([h.index_select(0, rows), h_halo.to(h.dtype)])        # (K + R, H)
        block_pos = torch.cat([pos.index_select(0, rows), pos_halo])                # (K + R, 3)
        cut_msg, cut_disp = self.edge_sums(block_h, block_pos, split.cut_index, split.cut_attr, rows.shape[0],
                                           ctx.edge_chunk_size)
        msg_sum = interior[0].index_add(0, rows, cut_msg.to(interior[0].dtype))
        disp_sum = interior[1].index_add(0, rows, cut_disp)
        return msg_sum * ctx.inv_degree, disp_sum * ctx.inv_degree

    def edge_sums(self, h_all: Tensor, pos_all: Tensor, edge_index: Tensor, edge_attr: Tensor, n_owned: int,
                  chunk: int | None) -> tuple[Tensor, Tensor]:
        """Sums at the receivers (rows < ``n_owned``) of m_ij and (x_i - x_j) phi_x(m_ij) over ``edge_index``:
        (n_owned, H) and (n_owned, 3); fused or plain autograd."""
        if self.fused:
            return edge_messages(h_all, pos_all, edge_index, edge_attr, n_owned, self.edge_mlp[0], self.edge_mlp[2],
                                 self.coord_mlp, chunk, normalize=self.normalize)
        first = self.edge_mlp[0]
        w_recv, w_send, w_edge = split_columns(first, [self.hidden, self.hidden, 1 + self.edge_features])
        proj_recv = torch.addmm(first.bias, h_all[:n_owned], w_recv.t())   # (N, H), bias folded in
        proj_send = h_all @ w_send.t()                                     # (N_all, H)
        return self._edge_block_autograd(proj_recv, proj_send, pos_all, edge_index, edge_attr, chunk, w_edge)

    def _edge_block_autograd(self, proj_recv: Tensor, proj_send: Tensor, pos_all: Tensor, edge_index: Tensor,
                             edge_attr: Tensor, chunk: int | None, w_edge: Tensor) -> tuple[Tensor, Tensor]:
        """The same sums with plain autograd; ``chunk``-edge chunks go through torch checkpointing."""
        num_edges = edge_index.shape[1]
        if not chunk or num_edges <= chunk:
            return self._edge_block(proj_recv, proj_send, pos_all, edge_index, edge_attr, w_edge)
        msg_sum = proj_recv.new_zeros(proj_recv.shape[0], self.hidden)
        disp_sum = pos_all.new_zeros(proj_recv.shape[0], 3)
        for start in range(0, num_edges, chunk):
            part = slice(start, start + chunk)
            m, d = checkpoint(self._edge_block, proj_recv, proj_send, pos_all, edge_index[:, part],
                              edge_attr[part], w_edge, use_reentrant=False)
            msg_sum = msg_sum + m
            disp_sum = disp_sum + d
        return msg_sum, disp_sum

    def _edge_block(self, proj_recv: Tensor, proj_send: Tensor, pos_all: Tensor, edge_index: Tensor,
                    edge_attr: Tensor, w_edge: Tensor) -> tuple[Tensor, Tensor]:
        """Messages of a set of edges, summed at their receivers: (N, H) and (N, 3)."""
        recv, send = edge_index[RECEIVER], edge_index[SENDER]
        diff = pos_all[recv] - pos_all[send]                        # x_i - x_j (E, 3)
        dist2 = (diff * diff).sum(dim=1, keepdim=True)              # |x_i - x_j|^2 (E, 1)
        with full_precision(pos_all):                               # the geometry columns' product in pos's dtype
            pre = torch.addmm((proj_recv[recv] + proj_send[send]).to(pos_all.dtype),
                              torch.cat([dist2, edge_attr], dim=1), w_edge.t())
        message = self.edge_mlp[3](self.edge_mlp[2](self.edge_mlp[1](pre)))    # SiLU, Linear, SiLU
        displacement = self.direction(diff) * self.coord_mlp(message)
        n_owned = proj_recv.shape[0]
        return scatter_sum(message.to(pos_all.dtype), recv, n_owned), scatter_sum(displacement, recv, n_owned)

    def direction(self, diff: Tensor) -> Tensor:
        """The vector of the real-real sum of (4): x_i - x_j (E, 3), or with ``normalize`` x_i - x_j divided by
        (|x_i - x_j| + 1e-8), the norm detached: no gradient flows through it (the authors' N-body choice)."""
        if not self.normalize:
            return diff
        norm = torch.linalg.vector_norm(diff.detach(), dim=1, keepdim=True)
        return diff / (norm + NORMALIZE_EPS)

    # -- velocity and external-field parts of (4) -----------------------------------------------------------
    def own_motion(self, h: Tensor, vel: Tensor, ctx: GraphContext) -> Tensor:
        """The summands of (4) that read node i alone: phi_v(h_i) v_i, plus phi_g(h_i) g with an external field
        (``ctx.field``): (N, 3). Each is :meth:`recomputed` (its (N, H) hidden layer is not kept for backward)."""
        motion = self.recomputed(self.velocity_term, h, vel)
        if self.field_mlp is not None:
            motion = motion + self.recomputed(self.field_term, h, ctx.field)
        return motion

    def velocity_term(self, h: Tensor, vel: Tensor) -> Tensor:
        """phi_v(h_i) v_i: (N, 3)."""
        return self.velocity_mlp(h) * vel

    def field_term(self, h: Tensor, field: Tensor) -> Tensor:
        """phi_g(h_i) g: (N, 3), ``field`` (N, 3) the g of each node's graph. Equivariant as phi_v(h_i) v_i is:
        an invariant scale of a vector that rotates with the positions (and does not translate)."""
        return self.field_mlp(h) * field


def _cat_attr(parts: list[Tensor], node_attr: Tensor | None) -> Tensor:
    return torch.cat(parts if node_attr is None else [*parts, node_attr], dim=1)


class EquivariantModel(nn.Module):
    """What EGNN and FastEGNN share: the input embedding, input checks and the per-forward graph context.

    ``comm`` is the communication seam (dist_egnn.parallel.seam); the default ``SingleProcess`` runs whole
    graphs in this process. A distributed trainer injects its communicator with :meth:`set_comm`.
    """

    sort_edges: bool = True
    """Reorder edges by receiver at the start of a forward (same sums, better memory locality)."""

    def __init__(self, node_features: int, edge_features: int, node_attrs: int, hidden: int, layers: int,
                 edge_chunk_size: int | None, comm=None, external_field: bool = False, normalize: bool = False):
        super().__init__()
        for name, value, least in [("node_features", node_features, 1), ("edge_features", edge_features, 0),
                                   ("node_attrs", node_attrs, 0), ("hidden", hidden, 1), ("layers", layers, 1)]:
            if int(value) < least:
                raise ValueError(f"{type(self).__name__}: {name}={value} must be >= {least}")
        self.node_features = node_features
        self.edge_features = edge_features
        self.node_attrs = node_attrs
        self.hidden = hidden
        self.edge_chunk_size = edge_chunk_size
        self.external_field = bool(external_field)
        self.normalize = bool(normalize)
        self.embedding = nn.Linear(node_features, hidden)
        self.comm = comm if comm is not None else SingleProcess()

    def set_fused(self, fused: bool) -> None:
        """Run the per-edge work through the fused functions (True, default) or plain autograd (False)."""
        for layer in self.layers:
            layer.fused = bool(fused)

    def set_comm(self, comm) -> None:
        """Use another communicator (e.g. a distributed one) from the next forward on."""
        self.comm = comm

    @torch.no_grad()
    def start_at_constant_velocity(self, alpha: float) -> None:
        """Start as the constant-velocity predictor x + α v (``model.constant_velocity_start``, docs/maths.md §8).

        Every layer's phi_v ends in Linear(H, 1); with weight 0 and bias α / L its summand of (4) is α v / L
        whatever h is, so the L layers add α v. The other summands of (4) start near zero (their last layers'
        gain is 1e-3), so the untrained model is within ~1e-3 of the baseline and training learns only the
        correction to it (as GNS learns accelerations). α is in the model's units (displacement per unit of
        the input v); the weight 0 is no dead end: its gradient is dL/dphi_v · SiLU(hidden), not zero."""
        if not math.isfinite(alpha):
            raise ValueError(f"{type(self).__name__}.start_at_constant_velocity: alpha={alpha} is not finite")
        for layer in self.layers:
            last = layer.velocity_mlp[-1]
            last.weight.zero_()
            last.bias.fill_(float(alpha) / len(self.layers))

    def embed(self, node_features: Tensor, pos: Tensor) -> Tensor:
        """h = embedding(f): (N, H) in pos's dtype, also under autocast (a K = F product: nothing to gain)."""
        with full_precision(pos):
            return self.embedding(node_features)

    def context(self, node_features: Tensor, pos: Tensor, vel: Tensor, edge_index: Tensor,
                edge_attr: Tensor | None, batch: Tensor | None, num_graphs: int | None,
                node_attr: Tensor | None, gravity: Tensor | None = None,
                moving: Tensor | None = None) -> GraphContext:
        """Check the inputs against the model's widths and build the per-forward graph context.

        ``moving`` (N,) bool marks the nodes that are not walls (``GraphBatch.moving``): FastEGNN's centroid
        averages them alone (:meth:`GraphContext.centroid`); None: every node."""
        name = type(self).__name__
        n = pos.shape[0]
        if pos.dim() != 2 or pos.shape[1] != 3 or vel.shape != pos.shape:
            raise ValueError(f"{name}: pos and vel must both be (N, 3); got {tuple(pos.shape)} and "
                             f"{tuple(vel.shape)}")
        if node_features.dim() != 2 or node_features.shape != (n, self.node_features):
            raise ValueError(f"{name} was built for {self.node_features} node features per node but got a "
                             f"tensor of shape {tuple(node_features.shape)} for {n} nodes: set "
                             f"model.node_features={node_features.shape[-1]} or change dataset.node_features")
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"{name}: edge_index must be (2, E); got {tuple(edge_index.shape)}")
        num_edges = edge_index.shape[1]
        if edge_attr is None:
            edge_attr = pos.new_zeros(num_edges, 0)
        if edge_attr.shape != (num_edges, self.edge_features):
            raise ValueError(f"{name} was built for {self.edge_features} edge features but got edge_attr of "
                             f"shape {tuple(edge_attr.shape)} for {num_edges} edges: set "
                             f"model.edge_features={edge_attr.shape[-1] if edge_attr.dim() == 2 else '?'} or "
                             f"change dataset.edge_features")
        if self.node_attrs == 0 and node_attr is not None and node_attr.shape[-1] > 0:
            raise ValueError(f"{name} was built with node_attrs=0 but got node_attr of shape "
                             f"{tuple(node_attr.shape)}: set model.node_attrs={node_attr.shape[-1]}")
        if self.node_attrs > 0 and (node_attr is None or node_attr.shape != (n, self.node_attrs)):
            got = None if node_attr is None else tuple(node_attr.shape)
            raise ValueError(f"{name} was built for node_attrs={self.node_attrs} but got node_attr {got}")
        if self.node_attrs == 0:
            node_attr = None
        if batch is None:
            batch = torch.zeros(n, dtype=torch.long, device=pos.device)
            num_graphs = 1
        elif num_graphs is None:
            num_graphs = int(batch.max()) + 1 if n else 1

        recv = edge_index[RECEIVER]
        if self.sort_edges and num_edges > 1 and not bool((recv[1:] >= recv[:-1]).all()):
            # edges by receiver: each chunk gathers and scatters over a narrow band of node rows
            order = torch.argsort(recv, stable=True)
            edge_index, edge_attr, recv = edge_index[:, order], edge_attr[order], recv[order]
        degree = count_per_segment(recv, n, pos.dtype)
        inv_degree = torch.where(degree > 0, 1.0 / degree.clamp(min=1), torch.zeros_like(degree)).unsqueeze(1)
        moving = self.checked_moving(moving, pos)
        local_counts = [count_per_segment(batch, num_graphs, pos.dtype).unsqueeze(1)]       # (B, 1) nodes
        if moving is not None:                                                               # (B, 1) moving nodes
            local_counts.append(count_per_segment(batch[moving], num_graphs, pos.dtype).unsqueeze(1))
        node_count, *moving_count = self.comm.sum_over_parts(*local_counts)                 # one collective
        moving_count = moving_count[0] if moving_count else None
        edge_attr = edge_attr.to(pos.dtype)
        split = EdgeSplit.of(edge_index, edge_attr, n) if getattr(self.comm, "overlap", False) else None
        return GraphContext(edge_index=edge_index, edge_attr=edge_attr, batch=batch,
                            num_graphs=num_graphs, node_attr=node_attr, inv_degree=inv_degree,
                            node_count=node_count.clamp(min=1), comm=self.comm,
                            edge_chunk_size=self.edge_chunk_size, split=split,
                            field=self.field_per_node(gravity, batch, num_graphs, pos),
                            moving=moving, moving_count=moving_count)

    def checked_moving(self, moving: Tensor | None, pos: Tensor) -> Tensor | None:
        """The moving-node mask (N,) on pos's device, checked; None without one."""
        if moving is None:
            return None
        if moving.shape != (pos.shape[0],) or moving.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__}: moving must be a bool (N,) = ({pos.shape[0]},) mask; got "
                             f"{moving.dtype} of shape {tuple(moving.shape)}")
        return moving.to(pos.device)

    def field_per_node(self, gravity: Tensor | None, batch: Tensor, num_graphs: int, pos: Tensor) -> Tensor | None:
        """The external field g (B, 3) of each node's graph, (N, 3) in pos's dtype; None for a model without one.

        A model built with ``external_field`` needs g, one built without refuses it (it has no phi_g to read it):
        either way a mismatch is a run whose ``dataset.gravity`` differs from the model's."""
        name = type(self).__name__
        if not self.external_field:
            if gravity is not None:
                raise ValueError(f"{name} was built without an external field but got gravity of shape "
                                 f"{tuple(gravity.shape)}: build it with external_field=True (dataset.gravity set "
                                 f"when the model is built), or leave gravity out")
            return None
        if gravity is None:
            raise ValueError(f"{name} was built with an external field (dataset.gravity) but got no gravity: pass "
                             f"gravity (B, 3), the field of every graph")
        if gravity.shape != (num_graphs, 3):
            raise ValueError(f"{name}: gravity must be (B, 3) = ({num_graphs}, 3), one vector per graph; got "
                             f"{tuple(gravity.shape)}")
        return gravity.to(pos.dtype)[batch]


class EGNN(EquivariantModel):
    """EGNN with velocity: embedding Linear(F -> H), then ``layers`` EGNN layers; outputs positions.

    Args:
        node_features: F, width of the invariant input features f_i.
        edge_features: D, width of the invariant edge attributes e_ij.
        node_attrs: A, width of the optional invariant attributes a_i given to every layer.
        hidden: H. layers: number of layers.
        edge_chunk_size: rows (edges, or real-virtual pairs) per chunk of the fused message blocks, which
            keep no per-edge tensor for backward and recompute each chunk instead; None: 16384
            (``dist_egnn.models.fused.DEFAULT_CHUNK``; 8192 under bf16 autocast, ``DEFAULT_CHUNK_LOW``). After
            ``set_fused(False)`` (plain autograd): chunks through torch checkpointing, None keeps every edge tensor.
        comm: communication seam, default single process.
        external_field: the model reads a per-graph external field g (``gravity``): every layer gets phi_g
            and the summand phi_g(h_i) g of (4) (docs/maths.md §8). False (default): no phi_g, no such input,
            the parameters of a model without a field.
        normalize: ``model.normalize``, the authors' N-body choice: the real-real sum of (4) reads
            (x_i - x_j) / (|x_i - x_j| + 1e-8), the norm detached.

    Call: ``model(node_features (N, F), pos (N, 3), vel (N, 3), edge_index (2, E), edge_attr (E, D),
    batch (N,), num_graphs, node_attr (N, A), gravity (B, 3))`` -> ``Prediction(pos (N, 3), None)``; ``gravity``
    is required with ``external_field`` and refused without. ``moving`` (N,) bool (walls False) is accepted and
    checked so that every model takes the same inputs; EGNN has no per-graph mean for it to change.
    """

    def __init__(self, node_features: int = 2, edge_features: int = 2, node_attrs: int = 0, hidden: int = 64,
                 layers: int = 4, edge_chunk_size: int | None = None, comm=None, external_field: bool = False,
                 normalize: bool = False):
        super().__init__(node_features, edge_features, node_attrs, hidden, layers, edge_chunk_size, comm,
                         external_field, normalize)
        self.layers = nn.ModuleList(EGNNLayer(hidden, edge_features, node_attrs, external_field=external_field,
                                              normalize=normalize) for _ in range(layers))

    def forward(self, node_features: Tensor, pos: Tensor, vel: Tensor, edge_index: Tensor,
                edge_attr: Tensor | None = None, batch: Tensor | None = None, num_graphs: int | None = None,
                node_attr: Tensor | None = None, gravity: Tensor | None = None,
                moving: Tensor | None = None) -> Prediction:
        ctx = self.context(node_features, pos, vel, edge_index, edge_attr, batch, num_graphs, node_attr, gravity,
                           moving=moving)
        h = self.embed(node_features, pos)
        for layer in self.layers:
            h, pos = layer(h, pos, vel, ctx)
        return Prediction(pos, None)
