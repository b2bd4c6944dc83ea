"""FastEGNN (Zhang et al., ICML 2024): EGNN plus C virtual nodes that talk to every real node.

One layer reads (h, x, S, Z) and writes all four; every term uses the layer's inputs (docs/maths.md §2):

    m_ij  = phi_e([h_i, h_j, |x_i - x_j|^2, e_ij])                                   (1) real-real message
    x̄     = mean_i x_i;   Ẑ = Z - x̄;   G = ẐᵀẐ (C x C);   g_c = column c of G          (2) virtual geometry
    m_ic  = phi_ev([h_i, s_c, |x_i - z_c|, g_c])                                     (3) real-virtual message
    x_i'  = x_i + mean_j (x_i - x_j) phi_x(m_ij) + mean_c (x_i - z_c) phi_xv(m_ic)
                + phi_v(h_i) v_i [+ phi_g(h_i) g]                                    (4) real coordinates
    z_c'  = z_c + mean_i (z_c - x_i) phi_X(m_ic)                                     (5) virtual coordinates
    h_i'  = h_i + phi_h([h_i, mean_j m_ij, mean_c m_ic, a_i])                        (6) real features
    s_c'  = s_c + phi_hv([s_c, mean_i m_ic])                                         (7) virtual features

``mean_i`` of (5) and (7) runs over ALL real nodes of the graph. When a graph is split over processes, those
means and the centroid are the only global quantities; they go through ``ctx.centroid`` / ``ctx.means_of_sums``,
which sum over processes via the injected communicator, so this file is the same for one and many processes.

Walls (``moving`` False, node scalar ``type`` 1; docs/maths.md §8): the centroid x̄ of (2), where the virtual
nodes also start, is the mean of the moving nodes only (the fluid's centroid, not the wall shell's; all nodes
of a graph that has no moving one). By default (``virtual_walls`` True) walls stay senders of m_ic: (3) runs
for them, and the means over i of (5) and (7) count them, divided by the number of all real nodes, so the
virtual nodes hear where the walls are. With ``virtual_walls`` False the virtual nodes talk to the moving
nodes alone: (3) runs for them only, the means over i of (5) and (7) are over the moving nodes (divided by
their number), and a wall's mean_c m_ic in (6) is zero. Walls never move, so this drops nothing a wall's own
update needs; the fluid still hears the walls through its edges, and a box of ~45,600 wall particles around
~8,000 fluid ones no longer runs ~85 % of the rows of (3). A wall's (4) is computed and discarded by the
trainer, its (6) kept (its features shape the messages it sends). Without a mask every mean is over all real
nodes, exactly as before walls existed.
The bracketed summand of (4), the external field g (``gravity``, (B, 3) per graph: the same on every process
holding part of a graph, so it needs no collective), and ``normalize`` (the real-real sum of (4) only, never the
virtual terms) are as in :mod:`dist_egnn.models.egnn`.

Shapes: N real nodes, B graphs, C virtual nodes per graph, H hidden.
    h (N, H)  pos (N, 3)  vel (N, 3)  virtual_h (B, H, C)  virtual_pos (B, 3, C)
    m_ic (N, C, H)  x_i - z_c (N, 3, C)  G (B, C, C)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_egnn.models.blocks import coordinate_mlp, message_mlp, update_mlp
from dist_egnn.models.egnn import EGNNLayer, EquivariantModel, GraphContext, Prediction
from dist_egnn.models.fused import virtual_messages
from dist_egnn.models.ops import full_precision, low_precision, mlp_inputs, scatter_sum, split_columns


class FastEGNNLayer(EGNNLayer):
    """EGNN layer plus the virtual-node terms (2), (3), (5), (7) and the virtual parts of (4) and (6)."""

    def __init__(self, hidden: int, edge_features: int, node_attrs: int, virtual_channels: int,
                 external_field: bool = False, normalize: bool = False, virtual_walls: bool = True):
        super().__init__(hidden, edge_features, node_attrs, extra_node_inputs=hidden, external_field=external_field,
                         normalize=normalize)
        self.virtual_channels = virtual_channels
        self.virtual_walls = bool(virtual_walls)
        self.virtual_edge_mlp = message_mlp(2 * hidden + 1 + virtual_channels, hidden)   # phi_ev
        self.virtual_coord_mlp = coordinate_mlp(hidden)                                  # phi_xv
        self.virtual_pos_mlp = coordinate_mlp(hidden)                                    # phi_X
        self.virtual_node_mlp = update_mlp(2 * hidden, hidden)                           # phi_hv

    def forward(self, h: Tensor, pos: Tensor, vel: Tensor, virtual_h: Tensor, virtual_pos: Tensor,
                ctx: GraphContext) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(h, pos, vel, virtual_h, virtual_pos) -> (h', pos', virtual_h', virtual_pos').

        With overlap (``ctx.split``) the collectives are started early and waited for late: the halo exchange
        and the centroid's all-reduce fly during the interior edges, the all-reduce of (5) and (7) during the
        cut edges, (4) and (6). Without, each is waited for where it is issued. Same terms, same sums."""
        if ctx.split is None:
            h_all, pos_all = ctx.comm.exchange_halo(h, pos)
            h_all, h_read = self.mlp_reads(h, h_all, pos)                                  # bf16 under autocast
            message, displacement = self.real_messages(h_all, pos_all, ctx)               # (1)
            centroid = ctx.centroid(pos)
        else:
            halo = ctx.comm.start_halo(h, pos)
            centroid_mean = ctx.start_centroid(pos)
            h_read = self.mlp_read(h, pos)
            interior = self.interior_sums(h_read, pos, ctx)                                # (1), senders owned here
            (centroid,) = centroid_mean.wait()
        gram = self.virtual_geometry(virtual_pos, centroid, pos)                          # (2)
        senders = self.virtual_senders(ctx)                                               # None: every node
        sender_batch = ctx.batch if senders is None else ctx.batch[senders]
        channel_mean, graph_sum, to_virtual, pull, push = self.virtual_messages(
            *self.rows(senders, h_read, pos), virtual_h, virtual_pos, gram, sender_batch, ctx)  # (3)
        virtual_sums = ctx.start_means(                                                   # (5), (7) one sum
            scatter_sum(self.virtual_displacement(to_virtual, push), sender_batch, ctx.num_graphs), graph_sum,
            count=None if senders is None else ctx.moving_count)
        if ctx.split is not None:
            message, displacement = self.real_messages_with_cut(interior, halo, h_read, pos, ctx)   # (1), cut edges
        pull_of_node, channel_mean = self.scattered(senders, pos.shape[0], self.virtual_pull(to_virtual, pull),
                                                    channel_mean)
        pos_new = (pos + displacement + pull_of_node                                       # (4)
                   + self.own_motion(h_read, vel, ctx))
        h_new = h + self.recomputed(self.feature_update, ctx.node_attr, h_read,                       # (6)
                                    *mlp_inputs(low_precision(pos), message, channel_mean))
        virtual_move, virtual_message_mean = virtual_sums.wait()
        virtual_pos_new = virtual_pos + virtual_move                                      # (5)
        virtual_h_new = virtual_h + self.virtual_feature_update(virtual_h, virtual_message_mean)        # (7)
        return h_new, pos_new, virtual_h_new, virtual_pos_new

    def virtual_geometry(self, virtual_pos: Tensor, centroid: Tensor, pos: Tensor) -> Tensor:
        """(2) G = ẐᵀẐ with Ẑ = Z - centroid (B, 3) of the real positions pos: (B, C, C), invariant under E(3)."""
        centred = virtual_pos - centroid.unsqueeze(-1)                          # (B, 3, C)
        with full_precision(pos):                                               # positions' products stay float32
            return centred.transpose(1, 2) @ centred

    def virtual_senders(self, ctx: GraphContext) -> Tensor | None:
        """Indices of the real nodes that exchange messages with the virtual nodes: the moving ones when
        ``virtual_walls`` is False and the graph has walls; None (every node) otherwise."""
        return None if self.virtual_walls else ctx.moving_index

    @staticmethod
    def rows(senders: Tensor | None, *per_node: Tensor) -> tuple[Tensor, ...]:
        """The senders' rows of each (N, ...) tensor (all rows when ``senders`` is None)."""
        return per_node if senders is None else tuple(v[senders] for v in per_node)

    @staticmethod
    def scattered(senders: Tensor | None, n: int, *per_sender: Tensor) -> tuple[Tensor, ...]:
        """Each (n_senders, ...) tensor back on all n real nodes, zero on the others."""
        if senders is None:
            return per_sender
        return tuple(v.new_zeros((n, *v.shape[1:])).index_copy(0, senders, v) for v in per_sender)

    def virtual_messages(self, h: Tensor, pos: Tensor, virtual_h: Tensor, virtual_pos: Tensor, gram: Tensor,
                         batch: Tensor, ctx: GraphContext) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(3) for the M real nodes of h and pos (every node, or the moving ones; ``batch`` (M,) their graphs):
        the two reductions of m_ic the layer uses, mean_c m_ic (M, H) and the per-graph sum over this process's
        nodes (B, C, H); x_i - z_c (M, 3, C); the heads phi_xv(m_ic), phi_X(m_ic) (M, 1, C).

        The first Linear of phi_ev is applied in pieces: the h_i block per real node, the s_c and g_c blocks
        per graph and channel, the distance as a rank-1 term; nothing (N, C, 2H + 1 + C) is built. With
        ``fused`` the MLP and both heads run in :class:`~dist_egnn.models.fused.VirtualMessages`, which
        builds no (N, C, H) tensor at all.
        """
        first = self.virtual_edge_mlp[0]
        w_h, w_s, w_dist, w_gram = split_columns(first, [self.hidden, self.hidden, 1, self.virtual_channels])
        to_virtual = pos.unsqueeze(-1) - virtual_pos[batch]                           # (N, 3, C)
        dist = torch.linalg.vector_norm(to_virtual, dim=1)                                # (N, C)
        with full_precision(pos):                                                         # geometry columns
            gram_part = gram @ w_gram.t()
        per_channel = virtual_h.transpose(1, 2) @ w_s.t() + gram_part + first.bias        # (B, C, H)
        if self.fused:
            channel_mean, graph_sum, pull, push = virtual_messages(
                h, per_channel, dist, w_h, w_dist.squeeze(1), batch, self.virtual_edge_mlp[2],
                self.virtual_coord_mlp, self.virtual_pos_mlp, ctx.edge_chunk_size)
            return channel_mean, graph_sum, to_virtual, pull.unsqueeze(1), push.unsqueeze(1)
        per_node = h @ w_h.t()                                                            # (N, H)
        pre = per_node.unsqueeze(1) + per_channel[batch] + dist.unsqueeze(-1) * w_dist.squeeze(1)
        message = self.virtual_edge_mlp[3](self.virtual_edge_mlp[2](self.virtual_edge_mlp[1](pre)))
        pull = self.virtual_coord_mlp(message).transpose(1, 2)                           # (N, 1, C)
        push = self.virtual_pos_mlp(message).transpose(1, 2)                             # (N, 1, C)
        message = message.to(pos.dtype)                                                  # sums in pos's dtype
        return (message.mean(dim=1), scatter_sum(message, batch, ctx.num_graphs), to_virtual, pull,
                push)

    def virtual_pull(self, to_virtual: Tensor, pull: Tensor) -> Tensor:
        """Virtual part of (4): mean_c (x_i - z_c) phi_xv(m_ic): (M, 3) for the M senders."""
        return (to_virtual * pull).mean(dim=2)

    def virtual_displacement(self, to_virtual: Tensor, push: Tensor) -> Tensor:
        """Per sender, the summand of (5): (z_c - x_i) phi_X(m_ic): (M, 3, C)."""
        return -to_virtual * push

    def virtual_feature_update(self, virtual_h: Tensor, virtual_message_mean: Tensor) -> Tensor:
        """(7) phi_hv([s_c, mean_i m_ic]): (B, H, C)."""
        inputs = torch.cat([virtual_h.transpose(1, 2), virtual_message_mean], dim=2)      # (B, C, 2H)
        return self.virtual_node_mlp(inputs).transpose(1, 2)


class FastEGNN(EquivariantModel):
    """FastEGNN: embedding Linear(F -> H), C virtual nodes, ``layers`` FastEGNN layers; outputs positions.

    Virtual coordinates start at the centroid of each graph's input positions (of its moving nodes); virtual
    features start from one learned (H, C) parameter shared by all graphs, which is what makes the C virtual
    nodes distinct.

    Args: as :class:`~dist_egnn.models.egnn.EGNN` (``external_field``, ``normalize`` included), plus
    ``virtual_channels`` (C) and ``virtual_walls`` (False: walls exchange no messages with the virtual nodes;
    module docstring, walls). With the defaults (F = 2, D = 2, A = 0, H = 64, 4 layers, C = 3) the model has
    284,804 trainable parameters; ``external_field`` adds phi_g to every layer (H² + 2H + 1 each).

    Call: ``model(node_features, pos, vel, edge_index, edge_attr, batch, num_graphs, node_attr, gravity,
    moving)`` -> ``Prediction(pos (N, 3), virtual_pos (B, 3, C))``; ``moving`` (N,) bool marks the nodes that
    are not walls (module docstring, walls), None: every node.
    """

    def __init__(self, node_features: int = 2, edge_features: int = 2, node_attrs: int = 0, hidden: int = 64,
                 layers: int = 4, virtual_channels: int = 3, edge_chunk_size: int | None = None, comm=None,
                 external_field: bool = False, normalize: bool = False, virtual_walls: bool = True):
        super().__init__(node_features, edge_features, node_attrs, hidden, layers, edge_chunk_size, comm,
                         external_field, normalize)
        if virtual_channels < 1:
            raise ValueError(f"FastEGNN: virtual_channels={virtual_channels} must be >= 1")
        self.virtual_channels = virtual_channels
        self.virtual_h_init = nn.Parameter(torch.randn(hidden, virtual_channels))
        self.layers = nn.ModuleList(FastEGNNLayer(hidden, edge_features, node_attrs, virtual_channels,
                                                  external_field=external_field, normalize=normalize,
                                                  virtual_walls=virtual_walls)
                                    for _ in range(layers))

    def forward(self, node_features: Tensor, pos: Tensor, vel: Tensor, edge_index: Tensor,
                edge_attr: Tensor | None = None, batch: Tensor | None = None, num_graphs: int | None = None,
                node_attr: Tensor | None = None, gravity: Tensor | None = None,
                moving: Tensor | None = None) -> Prediction:
        ctx = self.context(node_features, pos, vel, edge_index, edge_attr, batch, num_graphs, node_attr, gravity,
                           moving=moving)
        h = self.embed(node_features, pos)
        centroid = ctx.centroid(pos)                                                        # the moving nodes'
        virtual_pos = centroid.unsqueeze(-1).expand(-1, -1, self.virtual_channels)          # (B, 3, C)
        virtual_h = self.virtual_h_init.unsqueeze(0).expand(ctx.num_graphs, -1, -1)          # (B, H, C)
        for layer in self.layers:
            h, pos, virtual_h, virtual_pos = layer(h, pos, vel, virtual_h, virtual_pos, ctx)
        return Prediction(pos, virtual_pos)
