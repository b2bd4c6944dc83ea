"""The authors' computational structure, re-implemented: the speed and memory baseline of the benchmarks.

This is a clean-room re-implementation written from docs/maths.md, laid out the way the authors' research code
(GLAD-RUC/FastEGNN, GLAD-RUC/DistEGNN) computes a layer, so that "ours vs theirs" compares two ways of
computing the SAME function with the SAME parameters on the SAME graph:

* the input of phi_e is concatenated per edge, ``cat([h_i, h_j, |x_i - x_j|^2, e_ij])`` (E, 2H + 1 + D),
  and fed to one Linear over all edges;
* the input of phi_ev is concatenated per (real node, virtual node) pair, (N, 2H + 1 + C, C), permuted to
  (N, C, 2H + 1 + C) for the MLP and back;
* every intermediate (E, H) and (N, H, C) tensor stays alive for autograd (no recomputation);
* segment means are ``scatter_add_`` of the values and of a tensor of ones of the same shape, over an
  index expanded to (E, H), then a division; per-graph means the same over ``batch``.

The maths is docs/maths.md §2 as implemented by ``dist_egnn.models``: parameter names match our modules, so
``Reference*.load_state_dict(ours.state_dict())`` gives the same function (checked in
``tests/measure/test_benchmarks.py``). It is used only by the benchmarks in this folder, never by the library.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_egnn.models.blocks import coordinate_mlp, message_mlp, update_mlp, velocity_mlp


def unsorted_segment_sum(data: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """(M, K) -> (num_segments, K) through ``scatter_add_`` over an index expanded to (M, K)."""
    result = data.new_zeros((num_segments, data.size(1)))
    return result.scatter_add_(0, segment_ids.unsqueeze(-1).expand(-1, data.size(1)), data)


def unsorted_segment_mean(data: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Segment mean with a count tensor of the same shape as ``data``; 0 for an empty segment."""
    index = segment_ids.unsqueeze(-1).expand(-1, data.size(1))
    result = data.new_zeros((num_segments, data.size(1))).scatter_add_(0, index, data)
    count = data.new_zeros((num_segments, data.size(1))).scatter_add_(0, index, torch.ones_like(data))
    return result / count.clamp(min=1)


class ReferenceLayer(nn.Module):
    """One EGNN (``virtual_channels=0``) or FastEGNN layer in the authors' computational structure."""

    def __init__(self, hidden: int, edge_features: int, node_attrs: int, virtual_channels: int):
        super().__init__()
        self.hidden = hidden
        self.virtual_channels = virtual_channels
        virtual = virtual_channels > 0
        self.edge_mlp = message_mlp(2 * hidden + 1 + edge_features, hidden)
        self.coord_mlp = coordinate_mlp(hidden)
        self.velocity_mlp = velocity_mlp(hidden)
        self.node_mlp = update_mlp((3 if virtual else 2) * hidden + node_attrs, hidden)
        if virtual:
            self.virtual_edge_mlp = message_mlp(2 * hidden + 1 + virtual_channels, hidden)
            self.virtual_coord_mlp = coordinate_mlp(hidden)
            self.virtual_pos_mlp = coordinate_mlp(hidden)
            self.virtual_node_mlp = update_mlp(2 * hidden, hidden)

    def forward(self, h, pos, vel, virtual_h, virtual_pos, edge_index, edge_attr, batch, num_graphs, node_attr):
        n = h.shape[0]
        recv, send = edge_index
        coord_diff = pos[recv] - pos[send]                                          # (E, 3)
        radial = (coord_diff ** 2).sum(dim=1, keepdim=True)                         # (E, 1)
        edge_feat = self.edge_mlp(torch.cat([h[recv], h[send], radial, edge_attr], dim=1))   # (E, H)

        trans = coord_diff * self.coord_mlp(edge_feat)
        pos_new = pos + unsorted_segment_mean(trans, recv, n) + self.velocity_mlp(h) * vel
        agg = unsorted_segment_mean(edge_feat, recv, n)                             # (N, H)

        if not self.virtual_channels:
            h_new = h + self.node_mlp(_cat([h, agg], node_attr))
            return h_new, pos_new, None, None

        c = self.virtual_channels
        virtual_diff = virtual_pos[batch] - pos.unsqueeze(-1)                       # (N, 3, C)  z_c - x_i
        virtual_radial = torch.norm(virtual_diff, p=2, dim=1, keepdim=True)         # (N, 1, C)
        centroid = unsorted_segment_mean(pos, batch, num_graphs)                    # (B, 3)
        centred = virtual_pos - centroid.unsqueeze(-1)                              # (B, 3, C)
        gram = torch.einsum("bij,bjk->bik", centred.permute(0, 2, 1), centred)      # (B, C, C)
        virtual_in = torch.cat([h.unsqueeze(-1).repeat(1, 1, c), virtual_h[batch], virtual_radial, gram[batch]],
                               dim=1)                                               # (N, 2H + 1 + C, C)
        virtual_feat = self.virtual_edge_mlp(virtual_in.permute(0, 2, 1)).permute(0, 2, 1)   # (N, H, C)

        pull = self.virtual_coord_mlp(virtual_feat.permute(0, 2, 1)).permute(0, 2, 1)       # (N, 1, C)
        pos_new = pos_new + torch.mean(-virtual_diff * pull, dim=-1)
        push = virtual_diff * self.virtual_pos_mlp(virtual_feat.permute(0, 2, 1)).permute(0, 2, 1)
        virtual_pos_new = virtual_pos + unsorted_segment_mean(push.reshape(n, -1), batch,
                                                              num_graphs).reshape(-1, 3, c)

        h_new = h + self.node_mlp(_cat([h, agg, virtual_feat.mean(dim=-1)], node_attr))
        virtual_agg = unsorted_segment_mean(virtual_feat.reshape(n, -1), batch,
                                            num_graphs).reshape(-1, self.hidden, c)   # (B, H, C)
        virtual_update = self.virtual_node_mlp(torch.cat([virtual_h, virtual_agg], dim=1).permute(0, 2, 1))
        virtual_h_new = virtual_h + virtual_update.permute(0, 2, 1)
        return h_new, pos_new, virtual_h_new, virtual_pos_new


def _cat(parts, node_attr):
    return torch.cat(parts if node_attr is None else [*parts, node_attr], dim=1)


class ReferenceModel(nn.Module):
    """Embedding + layers; ``virtual_channels=0`` is EGNN. Returns (pos (N, 3), virtual_pos (B, 3, C) or None).

    Same constructor arguments and call as ``dist_egnn.models.FastEGNN`` / ``EGNN``.
    """

    def __init__(self, node_features: int = 2, edge_features: int = 2, node_attrs: int = 0, hidden: int = 64,
                 layers: int = 4, virtual_channels: int = 3):
        super().__init__()
        self.virtual_channels = virtual_channels
        self.embedding = nn.Linear(node_features, hidden)
        if virtual_channels:
            self.virtual_h_init = nn.Parameter(torch.randn(hidden, virtual_channels))
        self.layers = nn.ModuleList(ReferenceLayer(hidden, edge_features, node_attrs, virtual_channels)
                                    for _ in range(layers))

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None,
                node_attr=None):
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long)
            num_graphs = 1
        elif num_graphs is None:
            num_graphs = int(batch.max()) + 1
        h = self.embedding(node_features)
        virtual_h = virtual_pos = None
        if self.virtual_channels:
            c = self.virtual_channels
            virtual_h = self.virtual_h_init.unsqueeze(0).repeat(num_graphs, 1, 1)             # (B, H, C)
            virtual_pos = unsorted_segment_mean(pos, batch, num_graphs).unsqueeze(-1).repeat(1, 1, c)
        for layer in self.layers:
            h, pos, virtual_h, virtual_pos = layer(h, pos, vel, virtual_h, virtual_pos, edge_index, edge_attr,
                                                   batch, num_graphs, node_attr)
        return pos, virtual_pos


def ReferenceFastEGNN(**kwargs) -> ReferenceModel:
    """The authors' structure for FastEGNN (C = 3 by default)."""
    return ReferenceModel(**kwargs)


def ReferenceEGNN(**kwargs) -> ReferenceModel:
    """The authors' structure for the EGNN baseline (no virtual nodes)."""
    return ReferenceModel(**{**kwargs, "virtual_channels": 0})
