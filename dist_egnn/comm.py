"""Communication: the only module of dist-egnn that calls torch.distributed collectives.

The model maths asks two things of its communicator, once per layer:

* ``sum_over_parts(*per_graph_sums)``: the sum, over every process holding a part of the same graphs, of
  per-graph quantities. Dividing such sums of per-node values by the summed node counts gives exact
  node-count-weighted global means: FastEGNN needs them for the centroid (SPEC §2 term 2), the virtual
  coordinate increment (term 5) and the mean real->virtual message (term 7).
* ``exchange_halo(*node_tensors)``: append, below the owned rows, the rows of the halo nodes (remote
  endpoints of cut edges) so that edges can read them (SPEC §5, exact mode).

Two communicators answer them: :class:`SingleProcess`, the default, where one process holds whole graphs
(the mean is a division, there is no halo), and :class:`GraphParallel`, where the P ranks of a *graph group*
each hold one part of every graph of the batch. Both are injected into the model (``model.set_comm``), so
the model code is the same for 1 and P ranks (DESIGN §2).

The rest of this module is what the trainer needs around them: reading rank and world size from the
launcher's environment (:class:`DistEnv`), starting the process groups with timeouts (so a dead rank stops
the others instead of hanging them), and small reductions of numbers across ranks.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


# ------------------------------------------------------------------------------------ single process
class SingleProcess:
    """No-op twin of :class:`GraphParallel`: whole graphs live in this process."""

    world_size = 1

    def sum_over_parts(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Sum each per-graph tensor over the processes that hold parts of the same graphs.

        Distributed: an autograd-aware all-reduce SUM. One process holds every part, so: identity.
        """
        return tensors

    def exchange_halo(self, *node_tensors: Tensor) -> tuple[Tensor, ...]:
        """Owned rows followed by halo rows. One process owns every node and has no halo: identity."""
        return node_tensors


# -------------------------------------------------------------------------------------- graph parallel
@dataclass
class CommStats:
    """Wall time and bytes spent in the model's collectives (forward and backward), for step-time breakdowns."""

    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0

    def add(self, started: float, tensor: Tensor) -> None:
        self.seconds += time.perf_counter() - started
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1

    def reset(self) -> "CommStats":
        """Return the counts so far and start again from zero."""
        snapshot = CommStats(self.seconds, self.bytes, self.calls)
        self.seconds, self.bytes, self.calls = 0.0, 0, 0
        return snapshot


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
        started = time.perf_counter()
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        stats.add(started, out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        started = time.perf_counter()
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        ctx.stats.add(started, grad)
        return grad, None, None


@dataclass
class HaloPlan:
    """Who sends which owned rows to whom, for one batch; ranks are numbered within the graph group.

    send_index:  (S,) local ids of owned rows to send, grouped by destination rank (0, 1, .., P-1).
    send_counts: (P,) rows sent to each rank (0 to itself).
    recv_counts: (P,) halo rows received from each rank, in the order the halo rows are stored: the halo
                 block from rank q is a contiguous run of rows (``partitioners.subgraphs`` orders them so).
    """

    send_index: Tensor
    send_counts: list[int]
    recv_counts: list[int]

    @property
    def num_recv(self) -> int:
        return int(sum(self.recv_counts))

    def to(self, device: torch.device | str) -> "HaloPlan":
        return HaloPlan(self.send_index.to(device), self.send_counts, self.recv_counts)


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
        started = time.perf_counter()
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
        started = time.perf_counter()
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


# --------------------------------------------------------------------------------- processes and groups
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands, from the variables every launcher sets (deepspeed, torchrun, mpirun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environ(cls, environ=os.environ) -> "DistEnv":
        world = int(environ.get("WORLD_SIZE", 1))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", environ.get("LOCAL_SIZE", 0)) or 0)
        if not local_world:
            # DeepSpeed's launcher on CPU sets neither: all ranks are local unless a node count is given.
            nodes = int(environ.get("CROSS_SIZE", environ.get("GROUP_WORLD_SIZE", 1)) or 1)
            local_world = max(1, world // max(nodes, 1))
        return cls(rank=int(environ.get("RANK", 0)), world_size=world,
                   local_rank=int(environ.get("LOCAL_RANK", 0)), local_world_size=local_world)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass
class Groups:
    """Process groups of a run: ``graph`` holds the P ranks sharing each graph; groups differ in samples.

    world_size = parts × data_parallel. Ranks g·P .. g·P + P − 1 form graph group g (so a group's ranks
    sit on one node when ranks are numbered node by node); ``part`` is this rank's part of every graph.
    """

    env: DistEnv
    parts: int
    graph: object | None          # torch ProcessGroup of this rank's graph group (None: one process)
    data: object | None           # the same ranks, for the data path's collectives (run from a reader thread)
    part: int
    data_index: int               # which graph group this rank is in: 0 .. data_parallel − 1
    data_parallel: int

    def communicator(self) -> SingleProcess | GraphParallel:
        return GraphParallel(self.graph, self.parts) if self.parts > 1 else SingleProcess()


def check_world(world_size: int, parts: int) -> None:
    """Every rank runs this before any collective: a bad world size stops all of them, none hangs.

    One process accepts any P: it runs the P parts itself (``dist_egnn.rank_data``, sequential).
    """
    if parts < 1:
        raise ValueError(f"distributed.parts={parts} must be >= 1")
    if world_size > 1 and world_size % parts:
        raise ValueError(f"world size {world_size} is not a multiple of distributed.parts={parts}: launch "
                         f"P, 2P, 3P, ... ranks (e.g. deepspeed --num_gpus {parts} ...) or change distributed.parts")


_STORE = None        # the rendezvous store of this process, when shared_run_stamp made it before the groups
_WAIT_GROUP = None   # every rank, with the long timeout of barrier(timeout_s) (e.g. while rank 0 prepares data)


def shared_run_stamp(env: DistEnv, timeout_s: float = 300.0) -> str:
    """Rank 0's start time as ``YYYY-mm-dd_HH-MM-SS``, the same string on every rank (one run directory).

    Uses the launcher's rendezvous address (MASTER_ADDR, MASTER_PORT) before any process group exists: the
    store made here is reused by :func:`init_groups`. Under ``torchrun --max-restarts`` the agent's store
    outlives a failed attempt, and the stamp of the first attempt is kept: a restarted run writes into the
    same run directory (and ``resume=auto`` finds its checkpoints).
    """
    global _STORE
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if not env.distributed:
        return stamp
    # Under torchrun the launcher's agent already serves the store: every rank is a client then.
    host_it = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    _STORE = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500)),
                           env.world_size, host_it, timeout=datetime.timedelta(seconds=timeout_s))
    if env.rank == 0 and not _STORE.check(["dist_egnn/run_stamp"]):
        _STORE.set("dist_egnn/run_stamp", stamp)
    return _STORE.get("dist_egnn/run_stamp").decode()


def init_groups(env: DistEnv, parts: int, backend: str, timeout_s: float,
                wait_timeout_s: float | None = None) -> Groups:
    """Start the default process group (if the launcher has not) and the graph groups.

    Every collective inherits ``timeout_s``: a rank that dies mid-step makes the others fail with a timeout
    error instead of waiting forever. ``wait_timeout_s``: the timeout of :func:`barrier` with a timeout
    (a gloo group of every rank made here, while all ranks are present).
    """
    global _WAIT_GROUP
    check_world(env.world_size, parts)
    if not env.distributed:                    # one process: whole graphs, or all P parts in sequence
        return Groups(env, 1, None, None, 0, 0, 1)
    data_parallel = env.world_size // parts
    if not dist.is_initialized():
        store = _STORE
        if store is not None:
            # One key space per torchrun attempt: the agent's store keeps the keys of a failed attempt, and
            # reusing them would point the new ranks at the dead ranks' addresses.
            store = dist.PrefixStore(f"dist_egnn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size, store=store,
                                timeout=datetime.timedelta(seconds=timeout_s))
    graph = data = None
    for g in range(data_parallel):            # every rank must create every group, in the same order
        ranks = list(range(g * parts, (g + 1) * parts))
        model_group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s))
        data_group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s), backend="gloo")
        if env.rank in ranks:
            graph, data = model_group, data_group
    if wait_timeout_s is not None:
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_timeout_s))
    return Groups(env, parts, graph, data, env.rank % parts, env.rank // parts, data_parallel)


def default_backend(device: torch.device) -> str:
    """gloo on CPU, nccl on CUDA."""
    return "nccl" if device.type == "cuda" else "gloo"


# ------------------------------------------------------------------------------ numbers across ranks
def all_reduce_numbers(values: list[float], op: str = "sum", group=None, device="cpu") -> list[float]:
    """Reduce a few Python numbers over ``group`` (default: every rank); identity without distribution."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor.tolist()


def agree(flags: list[bool], device="cpu") -> list[bool]:
    """Each flag true on any rank -> true on every rank (one small all-reduce MAX; identity in one process).

    The trainer's per-step verdict: non-finite loss, non-finite gradients, stop requested. Every rank must
    call it at the same point; a rank that got a signal or a NaN thus stops all of them at the same step.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return [bool(f) for f in flags]
    tensor = torch.tensor([float(bool(f)) for f in flags], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [v > 0 for v in tensor.tolist()]


def broadcast_text(text: str, src: int = 0, device="cpu") -> str:
    """Rank ``src``'s string on every rank (UTF-8 bytes; no pickling); identity in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return text
    data = torch.tensor(list(text.encode()) if dist.get_rank() == src else [], dtype=torch.uint8)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    dist.broadcast(size, src)
    buffer = data.to(device) if dist.get_rank() == src else torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src)
    return bytes(buffer.cpu().tolist()).decode()


def check_same_samples(sample_ids: list[int], group, device="cpu") -> None:
    """Fail on every rank of ``group`` if its ranks are not working on the same samples.

    A mismatch would make the collectives combine parts of different graphs, silently wrong; the check
    costs one small all-reduce per batch.
    """
    if group is None:
        return
    ids = torch.tensor([len(sample_ids), *sample_ids], dtype=torch.float64, device=device)
    low, high = ids.clone(), ids.clone()
    size = torch.tensor([ids.numel()], dtype=torch.float64, device=device)
    sizes = size.clone()
    dist.all_reduce(size, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    same = size.item() == sizes.item()
    if same:
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        same = bool(torch.equal(low, high))
    if not same:
        raise RuntimeError(f"rank {dist.get_rank()}: the ranks of one graph group disagree on the samples of "
                           f"this batch (this rank has {sample_ids[:8]}...); every rank of a group must use the "
                           f"same dataset, split, seed and batch size")


def all_gather_arrays(array, group, device="cpu") -> list:
    """Every rank's 1-D float64 NumPy array (lengths may differ), in rank order of ``group``."""
    import numpy as np

    values = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float64), device=device)
    size = torch.tensor([values.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.float64, device=device)
    padded[:values.numel()] = values
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded, group=group)
    return [g[:int(s.item())].cpu().numpy() for g, s in zip(gathered, sizes)]


def barrier(timeout_s: float | None = None) -> None:
    """Wait for every rank. With ``timeout_s`` (e.g. while rank 0 prepares data), wait on the group that
    :func:`init_groups` made with ``wait_timeout_s`` if there is one, else a monitored barrier (gloo)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if timeout_s is not None and _WAIT_GROUP is not None:
        dist.barrier(group=_WAIT_GROUP)
    elif timeout_s is not None and dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()


def shutdown() -> None:
    global _WAIT_GROUP
    _WAIT_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
