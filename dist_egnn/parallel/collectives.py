"""The autograd-aware collectives of graph parallelism, and the communicator that uses them.

:class:`GraphParallel` fulfils the model's :class:`~dist_egnn.parallel.seam.Communicator` contract when
the P ranks of a graph group each hold one part of every graph: ``sum_over_parts`` is an all-reduce
(:class:`AllReduceSum`), ``exchange_halo`` an all-to-all (:class:`HaloExchange`). Each is a
``torch.autograd.Function`` whose backward is the adjoint collective, so gradients are exactly those of one
device holding whole graphs (docs/maths.md §4-5).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from dist_egnn.parallel.seam import CommStats
from dist_egnn.partitioners.subgraphs import HaloPlan


class AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x over a process group; backward: dL/dx = Σ_ranks dL_r/dy (an all-reduce SUM again).

    Why the adjoint is the same all-reduce: the training loss is the sum of every rank's share,
    L = Σ_r L_r, and every rank's y is the same sum S = Σ_q x_q. So dL/dx_q = Σ_r ∂L_r/∂S · ∂S/∂x_q
    = Σ_r ∂L_r/∂S: each rank needs the gradient that *all* ranks computed for S, summed.

    Worked example, P = 2, a graph of 4 nodes whose centroid is needed: rank 0 owns 3 nodes with coordinate
    sum x_0 = 6.0, rank 1 owns 1 node with x_1 = 2.0. Forward: both get S = 8.0 (and, from the node counts,
    N = 4, so the centroid S / N = 2.0 on both). Backward: suppose rank 0's loss share gives ∂L_0/∂S = 0.5
    and rank 1's gives ∂L_1/∂S = 0.25. The all-reduce hands both ranks 0.75, which is exactly
    dL/dx_0 = dL/dx_1 = ∂(L_0 + L_1)/∂S, what one device holding all 4 nodes computes.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group, stats: CommStats) -> Tensor:
        ctx.group, ctx.stats = group, stats
        out = tensor.contiguous().clone()
        started = stats.start(out)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        stats.add(started, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.contiguous().clone()
        started = ctx.stats.start(grad)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        ctx.stats.add(started, grad)
        return grad, None, None


class HaloExchange(torch.autograd.Function):
    """[owned rows; halo rows] from owned rows: an all-to-all; backward: the reverse all-to-all, summed.

    Forward: rank p sends ``owned[send_index]`` (the rows other ranks hold as halo) and appends the rows it
    receives. Backward: the gradient of p's halo rows goes back to the ranks that own them (the same
    all-to-all with send and receive swapped), where it is added to the gradient of the rows that were
    sent; a row sent to several ranks collects all their gradients (``index_add_``).

    Worked example, P = 2: rank 0 owns global nodes [0, 1], rank 1 owns [2, 3], one cut edge 1 <- 2 and its
    twin 2 <- 1. Rank 0 sends its local row 1 (global 1), rank 1 sends its local row 0 (global 2). After
    the forward, rank 0 holds rows [g0, g1, g2] and rank 1 holds [g2, g3, g1]. If rank 0's loss gives
    gradient 0.3 to its halo row (g2) and rank 1's own use of g2 gives 0.1, rank 1 ends with 0.1 + 0.3 = 0.4
    for g2: the full gradient, as on one device.
    """

    @staticmethod
    def forward(ctx, owned: Tensor, plan: HaloPlan, group, stats: CommStats) -> Tensor:
        ctx.plan, ctx.group, ctx.stats, ctx.num_owned = plan, group, stats, owned.shape[0]
        send = owned.index_select(0, plan.send_index).contiguous()
        recv = owned.new_empty((plan.num_recv, *owned.shape[1:]))
        started = stats.start(send)
        dist.all_to_all_single(recv, send, output_split_sizes=plan.recv_counts,
                               input_split_sizes=plan.send_counts, group=group)
        stats.add(started, send)
        return torch.cat([owned, recv])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        plan = ctx.plan
        grad_owned = grad[:ctx.num_owned].clone()
        grad_halo = grad[ctx.num_owned:].contiguous()
        back = grad.new_empty((plan.send_index.shape[0], *grad.shape[1:]))
        started = ctx.stats.start(grad_halo)
        dist.all_to_all_single(back, grad_halo, output_split_sizes=plan.send_counts,
                               input_split_sizes=plan.recv_counts, group=ctx.group)
        ctx.stats.add(started, grad_halo)
        grad_owned.index_add_(0, plan.send_index, back)
        return grad_owned, None, None, None


class GraphParallel:
    """The communicator of one rank of a graph group: P ranks, each holding one part of every graph.

    ``sum_over_parts`` is one :class:`AllReduceSum` over the group for all its arguments together (they are
    flattened into one buffer: one collective per call, not one per tensor). ``exchange_halo`` runs one
    :class:`HaloExchange` for all its arguments together (concatenated along columns) when a halo plan is
    set (exact mode, :meth:`set_halo_plan` before each forward); without one (drop mode) it is the
    identity, like :class:`SingleProcess`.
    """

    def __init__(self, group, world_size: int):
        self.group = group
        self.world_size = world_size
        self.plan: HaloPlan | None = None
        self.stats = CommStats()

    def set_halo_plan(self, plan: HaloPlan | None) -> None:
        self.plan = plan

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.world_size == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        total = AllReduceSum.apply(flat, self.group, self.stats)
        sizes = [t.numel() for t in tensors]
        return tuple(piece.view_as(t) for piece, t in zip(torch.split(total, sizes), tensors))

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]:
        if self.plan is None:
            return node_tensors
        widths = [t.shape[1] for t in node_tensors]
        both = HaloExchange.apply(torch.cat(node_tensors, dim=1), self.plan, self.group, self.stats)
        return tuple(torch.split(both, widths, dim=1))


