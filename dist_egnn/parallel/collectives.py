"""The autograd-aware collectives of graph parallelism, and the communicator that uses them.

:class:`GraphParallel` fulfils the model's :class:`~dist_egnn.parallel.seam.Communicator` contract when
the P ranks of a graph group each hold one part of every graph: ``sum_over_parts`` is an all-reduce
(:class:`AllReduceSum`), ``exchange_halo`` an all-to-all (:class:`HaloExchange`). Each is a
``torch.autograd.Function`` whose backward is the adjoint collective, so gradients are exactly those of one
device holding whole graphs (docs/maths.md §4-5).

Every collective is issued asynchronously and completed through a :class:`Pending` handle. That is where
injected delays live (:class:`Injection`, tests and benchmarks only): ``latency_s`` makes a collective
complete no sooner than that long after it was *issued*, like a network round trip, so work done between
issuing and waiting (the overlap below: interior edges while the halo exchange is in flight) hides it, while the
blocking use (issue, then wait at once: ``sum_over_parts``, ``exchange_halo``) puts all of it on the critical
path. ``slowdown`` and ``delay_s`` stand in for a slower rank (a straggler): its compute between collectives takes
``slowdown`` times as long, plus ``delay_s`` per forward pass.

Overlap (``distributed.overlap``): ``start_halo`` and ``start_sum`` return a handle at once and the model
computes what needs no remote rows (interior edges, FastEGNN's virtual terms) before it waits. Each is two
autograd nodes, :class:`IssueCollective` and :class:`CompleteCollective`; in backward they run in the opposite
order, so the adjoint collective is issued by the second and waited for by the first, and the backward of the
work done between them in the forward pass runs while it is in flight (:class:`InFlight`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from dist_egnn.parallel.seam import CommStats, Ready
from dist_egnn.partitioners.subgraphs import HaloPlan


@dataclass(frozen=True)
class Injection:
    """Delays injected into one rank: tests and benchmarks only (``distributed.inject_*``; none by default).

    * ``latency_s``: every collective of the model (all-reduce, halo exchange; forward and backward) completes
      no sooner than ``latency_s`` after it was issued (:meth:`Pending.wait`). The clock starts at the issue,
      not at the wait: compute placed between the two overlaps the latency as it would a network round trip.
    * ``slowdown``: this rank's compute between two collectives (and from the start of a forward pass to its
      first collective) takes ``slowdown`` times as long: before each collective it sleeps (slowdown − 1) × the
      time it computed since the previous one. A device at 1/slowdown of the others' speed, for the work the
      model does between collectives (not the optimizer step or the data path).
    * ``delay_s``: a fixed sleep at the start of every forward pass (:meth:`GraphParallel.set_halo_plan`),
      e.g. a busy host; unlike ``slowdown`` it does not shrink with the rank's share of the graph.

    Sleeps are measured on the host clock: meaningful on the CPU (gloo); on CUDA they delay kernel launches
    only.
    """

    latency_s: float = 0.0
    slowdown: float = 1.0
    delay_s: float = 0.0


class Pending:
    """A collective in flight (issued by :meth:`GraphParallel.issue`): :meth:`wait` completes it.

    ``wait`` waits for the collective, then until ``latency_s`` has passed since it was issued (that remainder,
    the latency nothing hid, is added to ``GraphParallel.exposed_latency_s``), counts it in the communicator's
    :class:`CommStats` and restarts the compute clock of :class:`Injection`'s slowdown.
    """

    def __init__(self, comm: "GraphParallel", work, started: float, counted: Tensor):
        self.comm, self.work, self.started, self.counted = comm, work, started, counted

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
        latency = self.comm.injection.latency_s
        if latency > 0:
            remaining = self.started + latency - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
                self.comm.exposed_latency_s += remaining
        self.comm.stats.add(self.started, self.counted)
        self.comm.computing_since = time.perf_counter()


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
    def forward(ctx, tensor: Tensor, comm: "GraphParallel") -> Tensor:
        ctx.comm = comm
        out = tensor.contiguous().clone()
        comm.issue(lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=comm.group, async_op=True), out).wait()
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        comm = ctx.comm
        grad = grad.contiguous().clone()
        comm.issue(lambda: dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=comm.group, async_op=True), grad).wait()
        return grad, None


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
    def forward(ctx, owned: Tensor, plan: HaloPlan, comm: "GraphParallel") -> Tensor:
        ctx.plan, ctx.comm, ctx.num_owned = plan, comm, owned.shape[0]
        send = owned.index_select(0, plan.send_index).contiguous()
        recv = owned.new_empty((plan.num_recv, *owned.shape[1:]))
        comm.issue(lambda: dist.all_to_all_single(recv, send, output_split_sizes=plan.recv_counts,
                                                  input_split_sizes=plan.send_counts, group=comm.group,
                                                  async_op=True), send).wait()
        return torch.cat([owned, recv])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        plan, comm = ctx.plan, ctx.comm
        grad_owned = grad[:ctx.num_owned].clone()
        grad_halo = grad[ctx.num_owned:].contiguous()
        back = grad.new_empty((plan.send_index.shape[0], *grad.shape[1:]))
        comm.issue(lambda: dist.all_to_all_single(back, grad_halo, output_split_sizes=plan.send_counts,
                                                  input_split_sizes=plan.recv_counts, group=comm.group,
                                                  async_op=True), grad_halo).wait()
        grad_owned.index_add_(0, plan.send_index, back)
        return grad_owned, None, None


class InFlight:
    """One collective between its issue and its completion, forward and (reversed) backward.

    ``kind`` says which collective (:class:`SumKind`, :class:`HaloKind`). Forward: :class:`IssueCollective`
    issues it and returns a token, :class:`CompleteCollective` (fed the token) waits and returns the result.
    Backward runs the two nodes the other way round: CompleteCollective's backward issues the adjoint
    collective, IssueCollective's backward waits for it and returns the input's gradient. Autograd's engine runs
    ready nodes with the highest sequence number first (on the CPU, in the calling thread), so the backward of
    the work created between the two in the forward pass runs while the adjoint is in flight.

    Every rank must issue its collectives in the same order. Forward: program order, the same on every rank.
    Backward: the engine's order, which depends only on the graph's shape, the same on every rank because the
    model runs the same ops on every rank (a rank without cut edges still runs the cut-edge block on zero edges,
    so its halo exchange stays in the graph and its adjoint is issued like everyone else's).
    """

    def __init__(self, kind):
        self.kind = kind
        self.result: Tensor | None = None
        self.pending: Pending | None = None

    def issue(self, tensor: Tensor) -> None:
        self.result, self.pending = self.kind.issue(tensor)

    def complete(self) -> Tensor:
        self.pending.wait()
        result, self.result, self.pending = self.result, None, None
        return result

    def issue_adjoint(self, grad: Tensor) -> None:
        self.result, self.pending = self.kind.issue_adjoint(grad)

    def complete_adjoint(self) -> Tensor:
        return self.kind.adjoint_result(self.complete())


class SumKind:
    """An all-reduce SUM of a flat tensor; its adjoint is the same all-reduce (the arithmetic and a worked
    example: :class:`AllReduceSum`)."""

    def __init__(self, comm: "GraphParallel"):
        self.comm = comm

    def issue(self, tensor: Tensor) -> tuple[Tensor, Pending]:
        out = tensor.contiguous().clone()
        comm = self.comm
        return out, comm.issue(lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=comm.group,
                                                       async_op=True), out)

    issue_adjoint = issue

    @staticmethod
    def adjoint_result(summed: Tensor) -> Tensor:
        return summed


class HaloKind:
    """The halo all-to-all of :class:`HaloExchange`, returning the halo rows alone (R, W); its adjoint is the
    reverse all-to-all, summed into the sent rows (the arithmetic and a worked example: :class:`HaloExchange`)."""

    def __init__(self, comm: "GraphParallel", plan: HaloPlan, num_owned: int):
        self.comm, self.plan, self.num_owned = comm, plan, num_owned

    def issue(self, owned: Tensor) -> tuple[Tensor, Pending]:
        plan, comm = self.plan, self.comm
        send = owned.index_select(0, plan.send_index).contiguous()
        recv = owned.new_empty((plan.num_recv, *owned.shape[1:]))
        return recv, comm.issue(lambda: dist.all_to_all_single(recv, send, output_split_sizes=plan.recv_counts,
                                                               input_split_sizes=plan.send_counts,
                                                               group=comm.group, async_op=True), send)

    def issue_adjoint(self, grad_halo: Tensor) -> tuple[Tensor, Pending]:
        plan, comm = self.plan, self.comm
        grad_halo = grad_halo.contiguous()
        back = grad_halo.new_empty((plan.send_index.shape[0], *grad_halo.shape[1:]))
        return back, comm.issue(lambda: dist.all_to_all_single(back, grad_halo, output_split_sizes=plan.send_counts,
                                                               input_split_sizes=plan.recv_counts,
                                                               group=comm.group, async_op=True), grad_halo)

    def adjoint_result(self, back: Tensor) -> Tensor:
        """The owned rows' gradient from the halo: a row sent to several ranks collects all their gradients."""
        grad = back.new_zeros((self.num_owned, *back.shape[1:]))
        return grad.index_add_(0, self.plan.send_index, back)


class IssueCollective(torch.autograd.Function):
    """Forward: issue ``flight``'s collective on ``tensor``, return an empty token for :class:`CompleteCollective`.
    Backward: wait for the adjoint collective that CompleteCollective's backward issued; ``tensor``'s gradient."""

    @staticmethod
    def forward(ctx, tensor: Tensor, flight: InFlight) -> Tensor:
        ctx.flight = flight
        flight.issue(tensor)
        return tensor.new_empty(0)

    @staticmethod
    def backward(ctx, _token_grad: Tensor) -> tuple[Tensor, None]:
        return ctx.flight.complete_adjoint(), None


class CompleteCollective(torch.autograd.Function):
    """Forward: wait for ``flight``'s collective, return its result. Backward: issue the adjoint collective."""

    @staticmethod
    def forward(ctx, token: Tensor, flight: InFlight) -> Tensor:
        ctx.flight = flight
        return flight.complete()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        ctx.flight.issue_adjoint(grad)
        return grad.new_zeros(0), None


class Started:
    """A handle of ``start_sum`` / ``start_halo``: :meth:`wait` returns the tensors (and records the autograd
    node that completes the collective); ``finish`` maps the collective's one result to them."""

    def __init__(self, token: Tensor, flight: InFlight, finish):
        self.token, self.flight, self.finish = token, flight, finish

    def wait(self) -> tuple[Tensor, ...]:
        return self.finish(CompleteCollective.apply(self.token, self.flight))


class GraphParallel:
    """The communicator of one rank of a graph group: P ranks, each holding one part of every graph.

    ``sum_over_parts`` is one :class:`AllReduceSum` over the group for all its arguments together (they are
    flattened into one buffer: one collective per call, not one per tensor). ``exchange_halo`` runs one
    :class:`HaloExchange` for all its arguments together (concatenated along columns) when a halo plan is
    set (exact mode, :meth:`set_halo_plan` before each forward); without one (drop mode) it is the
    identity, like :class:`SingleProcess`. ``injection``: delays for tests and benchmarks (:class:`Injection`).

    ``overlap`` (``distributed.overlap``) tells the model to use :meth:`start_halo` and :meth:`start_sum`, which
    return at once a handle whose ``wait()`` completes the collective, and to compute what needs no remote rows
    in between (docs/design.md, distributed section). Both are autograd-correct like their blocking twins.
    """

    def __init__(self, group, world_size: int, injection: Injection | None = None, overlap: bool = False):
        self.group = group
        self.world_size = world_size
        self.overlap = bool(overlap)
        self.plan: HaloPlan | None = None
        self.stats = CommStats()
        self.injection = injection or Injection()
        self.computing_since: float | None = None   # end of the last collective (start of the forward pass)
        self.exposed_latency_s = 0.0                 # injected latency waited for, not hidden by other work

    def set_halo_plan(self, plan: HaloPlan | None) -> None:
        """The halo plan of the next forward pass (None: drop mode); called once before every forward."""
        self.plan = plan
        if self.injection.delay_s > 0:
            time.sleep(self.injection.delay_s)
        self.computing_since = time.perf_counter()

    def issue(self, start, counted: Tensor) -> Pending:
        """Issue one collective: ``start()`` calls it with ``async_op=True`` and returns its work handle.

        First the injected slowdown of the compute since the previous collective (a slower rank arrives
        later); the returned :class:`Pending` completes it, with the injected latency counted from now.
        """
        slowdown = self.injection.slowdown
        if slowdown != 1.0 and self.computing_since is not None:
            time.sleep(max(0.0, (slowdown - 1.0) * (time.perf_counter() - self.computing_since)))
        started = self.stats.start(counted)
        return Pending(self, start(), started, counted)

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        if self.world_size == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        total = AllReduceSum.apply(flat, self)
        sizes = [t.numel() for t in tensors]
        return tuple(piece.view_as(t) for piece, t in zip(torch.split(total, sizes), tensors))

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]:
        if self.plan is None:
            return node_tensors
        widths = [t.shape[1] for t in node_tensors]
        both = HaloExchange.apply(torch.cat(node_tensors, dim=1), self.plan, self)
        return tuple(torch.split(both, widths, dim=1))

    def start_sum(self, *tensors: Tensor) -> Started | Ready:
        """:meth:`sum_over_parts` issued now and completed by the handle's ``wait()`` (one all-reduce)."""
        if self.world_size == 1:
            return Ready(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        flight = InFlight(SumKind(self))
        sizes = [t.numel() for t in tensors]

        def finish(total: Tensor) -> tuple[Tensor, ...]:
            return tuple(piece.view_as(t) for piece, t in zip(torch.split(total, sizes), tensors))
        return Started(IssueCollective.apply(flat, flight), flight, finish)

    def start_halo(self, *node_tensors: Tensor) -> Started | Ready:
        """Issue the halo exchange of :meth:`exchange_halo` now; the handle's ``wait()`` returns the halo rows
        alone, (R, W_k) for each input (R = 0 without a plan), in the order ``exchange_halo`` appends them."""
        if self.plan is None:
            return Ready(tuple(t[:0] for t in node_tensors))
        widths = [t.shape[1] for t in node_tensors]
        packed = torch.cat(node_tensors, dim=1)
        flight = InFlight(HaloKind(self, self.plan, packed.shape[0]))
        return Started(IssueCollective.apply(packed, flight), flight,
                       lambda rows: tuple(torch.split(rows, widths, dim=1)))
