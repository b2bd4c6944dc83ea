"""The process runtime: where this process stands, process groups with timeouts, and small agreements.

Everything a multi-process launch needs around the model's collectives: reading rank and world size from
the launcher's environment (:class:`DistEnv`), starting the process groups with timeouts (so a dead rank
stops the others instead of hanging them, :func:`init_groups`), one run directory for every rank
(:func:`shared_run_stamp`), barriers, and reductions of a few numbers across ranks (:func:`agree`,
:func:`all_reduce_numbers`, ...). Every function here is the identity, or does nothing, in one process.
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.parallel.collectives import GraphParallel, Injection
from dist_egnn.parallel.seam import Communicator, SingleProcess

# What each launcher sets, by family: the first family whose rank variable is present is read, and only its own
# variables (a torchrun inside a Slurm job has SLURM_* too: RANK wins). Fields: rank, world size, local rank, ranks
# on this node, node index, node count; a tuple lists alternatives within the family, first present wins.
LAUNCHERS = {
    # torchrun (torch/distributed/elastic/agent/server/local_elastic_agent.py) and deepspeed's own launcher
    # (deepspeed/launcher/launch.py: LOCAL_SIZE, CROSS_RANK, CROSS_SIZE)
    "torchrun/deepspeed": ("RANK", "WORLD_SIZE", "LOCAL_RANK", ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"),
                           ("GROUP_RANK", "CROSS_RANK"), ("GROUP_WORLD_SIZE", "CROSS_SIZE")),
    # mpirun of Open MPI (deepspeed --launcher openmpi): no node index or count
    "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                ("OMPI_COMM_WORLD_LOCAL_SIZE",), (), ()),
    # MPICH / Intel MPI (deepspeed --launcher mpich|impi also exports LOCAL_SIZE)
    "mpich": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", ("MPI_LOCALNRANKS", "LOCAL_SIZE"), (), ()),
    # srun (deepspeed --launcher slurm; sbatch): ranks per node from --ntasks-per-node, else the step's layout
    "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
              ("SLURM_NTASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"),
              ("SLURM_NODEID",), ("SLURM_STEP_NUM_NODES", "SLURM_NNODES")),
}


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands, from the variables its launcher sets (:data:`LAUNCHERS`).

    ``local_world_size`` (ranks on this node), ``node`` and ``nodes`` are what the launcher says, never derived
    from one another: None where it says nothing (Open MPI and MPICH give no node index or count). A multi-process
    launch without a number of ranks per node is refused by :func:`check_layout`, naming the variables to set.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int | None = 1
    node: int | None = 0
    nodes: int | None = 1
    launcher: str = "none"                  # the family of LAUNCHERS that was read; "none": one process

    @classmethod
    def from_environ(cls, environ=os.environ) -> "DistEnv":
        for launcher, (rank, world, local_rank, local_world, node, nodes) in LAUNCHERS.items():
            if rank not in environ:
                continue
            first = lambda names: next((environ[n] for n in names if environ.get(n, "") != ""), None)  # noqa: E731
            node_index = first(node)
            return cls(rank=int(environ[rank]), world_size=int(environ.get(world, 1)),
                       local_rank=int(environ.get(local_rank, 0)),
                       local_world_size=_per_node(first(local_world), node_index),
                       node=None if node_index is None else int(node_index),
                       nodes=None if first(nodes) is None else int(first(nodes)), launcher=launcher)
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def export(self, environ=os.environ) -> None:
        """Set RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE where the launcher did not (mpirun, srun), for the
        libraries that read them (DeepSpeed needs LOCAL_RANK); variables already set are kept."""
        if not self.distributed:
            return
        for key, value in (("RANK", self.rank), ("WORLD_SIZE", self.world_size), ("LOCAL_RANK", self.local_rank),
                           ("LOCAL_WORLD_SIZE", self.local_world_size)):
            if value is not None:
                environ.setdefault(key, str(value))

    def layout(self) -> str:
        """The launch in words for messages, e.g. ``2 nodes × 1 rank per node, from torchrun/deepspeed variables``."""
        per_node = "? ranks" if self.local_world_size is None else \
            f"{self.local_world_size} rank{'s' * (self.local_world_size != 1)}"
        nodes = "? nodes" if self.nodes is None else f"{self.nodes} node{'s' * (self.nodes != 1)}"
        return f"{nodes} × {per_node} per node, from {self.launcher} variables"


def _per_node(value: str | None, node: str | None) -> int | None:
    """Ranks on this node from a count (``4``) or Slurm's per-node list (``2(x3),1``: this node's entry)."""
    if value is None:
        return None
    counts = []
    for entry in value.split(","):
        count, _, repeat = entry.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    if len(set(counts)) == 1:
        return counts[0]
    return counts[int(node)] if node is not None and int(node) < len(counts) else None


def check_layout(env: DistEnv, parts: int) -> None:
    """Every rank runs this before any collective: a launch that cannot hold P parts stops every rank, none hangs.

    Refused: a world size that is not a multiple of P; a multi-process launch whose launcher does not say how
    many ranks run on each node (the variables to set are named); nodes with different rank counts; and graph
    groups that straddle nodes unevenly (ranks per node neither a multiple nor a divisor of P: the halo traffic
    of some groups would cross the network and of others not). Every rank reaches the same verdict from its own
    environment, except under a launcher that gives nodes different rank counts: ranks whose own count fits
    then fail within ``distributed.timeout_s`` instead.
    """
    check_world(env.world_size, parts, env)
    if not env.distributed:
        return
    if env.local_world_size is None:
        wanted = " or ".join(v for v in LAUNCHERS.get(env.launcher, LAUNCHERS["torchrun/deepspeed"])[3])
        raise ConfigError(f"{env.world_size} ranks were launched ({env.launcher} variables) but nothing says how many "
                          f"run on this node: set {wanted} (torchrun sets LOCAL_WORLD_SIZE, deepspeed LOCAL_SIZE, "
                          f"mpirun OMPI_COMM_WORLD_LOCAL_SIZE, srun SLURM_NTASKS_PER_NODE with --ntasks-per-node); it "
                          f"is not guessed")
    local = env.local_world_size
    if env.nodes is not None and env.nodes * local != env.world_size:
        raise ConfigError(f"launch layout: {env.layout()}; {env.nodes} × {local} != {env.world_size} ranks, so "
                          f"nodes run different numbers of ranks; launch the same number of ranks on every node")
    if local % parts and parts % local:
        raise ConfigError(f"launch layout: {env.layout()}; it does not fit distributed.parts={parts}: graph groups of "
                          f"{parts} consecutive ranks would straddle nodes unevenly; run a multiple or a divisor of "
                          f"{parts} ranks per node (e.g. --nproc-per-node {parts}) or change distributed.parts")


def launcher_arguments(argv: list[str], env: DistEnv) -> list[str]:
    """The command line Hydra should see.

    The deepspeed launcher adds ``--local_rank=N`` (LOCAL_RANK is in the environment too): Hydra would
    reject it. Ranks other than 0 do not write Hydra's own files into the shared run directory.
    """
    args, skip = [argv[0]], False
    for arg in argv[1:]:
        if skip:
            skip = False
        elif arg.startswith("--local_rank") or arg.startswith("--local-rank"):
            skip = "=" not in arg
        else:
            args.append(arg)
    if env.rank > 0:
        args += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    return args


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

    def communicator(self, injection: Injection | None = None, overlap: bool = False) -> Communicator:
        """GraphParallel over this rank's graph group (with ``injection``'s test delays and ``overlap``, see
        ``distributed.overlap``), or SingleProcess."""
        return GraphParallel(self.graph, self.parts, injection, overlap) if self.parts > 1 else SingleProcess()


def check_world(world_size: int, parts: int, env: DistEnv | None = None) -> None:
    """Every rank runs this before any collective: a bad world size stops all of them, none hangs.

    One process accepts any P: it runs the P parts itself (``dist_egnn.training.rank_data``, sequential).
    ``env``: named in the message (the launch's layout, :func:`check_layout`).
    """
    if parts < 1:
        raise ConfigError(f"distributed.parts={parts} must be >= 1")
    if world_size > 1 and world_size % parts:
        layout = f" (launch layout: {env.layout()})" if env is not None else ""
        raise ConfigError(f"world size {world_size}{layout} is not a multiple of distributed.parts={parts}: launch "
                         f"P, 2P, 3P, ... ranks (e.g. deepspeed --num_gpus {parts} ...) or change distributed.parts")


class RendezvousTimeout(BadInput):
    """Nobody answered at the launch's rendezvous address (MASTER_ADDR:MASTER_PORT) in time: a launch mistake."""


def rendezvous_timeout_s(argv: list[str]) -> float:
    """``distributed.timeout_s`` as given on the command line (``launch/train.py`` joins the rendezvous before Hydra
    composes the configuration), else the schema's default: how long a rank waits for the others to arrive."""
    from dist_egnn.config import DistributedConfig

    given = [arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("distributed.timeout_s=")]
    try:
        return float(given[-1]) if given else float(DistributedConfig.timeout_s)
    except ValueError:
        raise ConfigError(f"distributed.timeout_s={given[-1]!r}: give a number of seconds") from None


def join_run(env: DistEnv, argv: list[str]) -> str:
    """:func:`shared_run_stamp` within ``distributed.timeout_s`` (:func:`rendezvous_timeout_s`): the first meeting of
    the ranks of a launch. A rendezvous nobody answers, or one the other ranks never reach, is
    :class:`RendezvousTimeout` naming the address and what to check, never a wait without end."""
    timeout_s = rendezvous_timeout_s(argv)
    try:
        return shared_run_stamp(env, timeout_s)
    except (dist.DistNetworkError, dist.DistStoreError) as error:
        err = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        where = f"MASTER_ADDR:MASTER_PORT={os.environ.get('MASTER_ADDR', '127.0.0.1')}:" \
                f"{os.environ.get('MASTER_PORT', '29500')}"
        what = (f"rank 0 waited {timeout_s:g} s at {where} but not every rank of {env.world_size} arrived ({err})"
                if env.rank == 0 else f"nobody answered at the rendezvous {where} within {timeout_s:g} s ({err})")
        raise RendezvousTimeout(f"{what}: start every node's launcher with the same rendezvous address and port "
                                f"(deepspeed --master_addr/--master_port, torchrun --rdzv-endpoint or --master-addr/"
                                f"--master-port), check that this node can reach it, or wait longer with "
                                f"distributed.timeout_s") from None


_STORE = None        # the rendezvous store of this process, when shared_run_stamp made it before the groups
_WAIT_GROUP = None   # every rank, with the long timeout of barrier(timeout_s) (e.g. while rank 0 prepares data)


def shared_run_stamp(env: DistEnv, timeout_s: float = 300.0) -> str:
    """Rank 0's start time as ``YYYY-mm-dd_HH-MM-SS``, the same string on every rank (one run directory).

    Uses the launcher's rendezvous address (MASTER_ADDR, MASTER_PORT) before any process group exists: the
    store made here is reused by :func:`init_groups`. Rank 0 serves it on MASTER_ADDR only
    (:func:`listen_socket`); a taken MASTER_PORT is :class:`~dist_egnn.errors.BadInput` naming the fix.
    Under ``torchrun --max-restarts`` the agent's store outlives a failed attempt, and the stamp of the first
    attempt is kept: a restarted run writes into the same run directory (and ``resume=auto`` finds its
    checkpoints).
    """
    global _STORE
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    if not env.distributed:
        return stamp
    # Under torchrun the launcher's agent already serves the store: every rank is a client then.
    host_it = env.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    host, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
    # Rank 0 serves on MASTER_ADDR only (TCPStore alone would listen on every interface): it binds the socket
    # itself and hands it over (master_listen_fd).
    listen_fd = listen_socket(os.environ.get("DIST_EGNN_LISTEN_ADDR") or host, port) if host_it else None
    _STORE = dist.TCPStore(host, port, env.world_size, host_it, timeout=datetime.timedelta(seconds=timeout_s),
                           master_listen_fd=listen_fd)
    if env.rank == 0 and not _STORE.check(["dist_egnn/run_stamp"]):
        _STORE.set("dist_egnn/run_stamp", stamp)
    return _STORE.get("dist_egnn/run_stamp").decode()


def listen_socket(host: str, port: int) -> int:
    """A TCP socket bound to ``host:port`` and listening, as a file descriptor a TCPStore takes over.

    ``host`` is the rendezvous address (MASTER_ADDR), so the store is reachable where the ranks look for it and
    nowhere else (``DIST_EGNN_LISTEN_ADDR=0.0.0.0`` asks for every interface). A taken port or an address that
    is not this machine's is bad input: :class:`~dist_egnn.errors.BadInput` naming it and the fix.
    """
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise BadInput(f"MASTER_ADDR={host} cannot be resolved ({err}): give the launcher the address of the node "
                       f"that runs rank 0 (deepspeed --master_addr, torchrun --master-addr)") from None
    found.sort(key=lambda info: info[0] != socket.AF_INET)            # IPv4 first, as the ranks connect
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # a port in TIME_WAIT, not a listening one
        sock.bind(address)
        sock.listen(max(128, socket.SOMAXCONN))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise BadInput(f"MASTER_PORT={port} on MASTER_ADDR={host} is in use by another process, so rank 0 cannot "
                           f"serve the launch's rendezvous there: pass another port to the launcher (deepspeed "
                           f"--master_port PORT ..., torchrun --master-port PORT ...), or stop the process holding "
                           f"it") from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise BadInput(f"MASTER_ADDR={host} is not an address of this machine, where rank 0 serves the "
                           f"rendezvous: give the launcher this node's address (deepspeed --master_addr, torchrun "
                           f"--master-addr)") from None
        raise
    return sock.detach()


def init_groups(env: DistEnv, parts: int, backend: str, timeout_s: float,
                wait_timeout_s: float | None = None) -> Groups:
    """Start the default process group (if the launcher has not) and the graph groups.

    Every collective inherits ``timeout_s``: a rank that dies mid-step makes the others fail with a timeout
    error instead of waiting forever. ``wait_timeout_s``: the timeout of :func:`barrier` with a timeout
    (a gloo group of every rank made here, while all ranks are present).
    """
    global _WAIT_GROUP
    check_layout(env, parts)
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
    buffer = (data.to(device) if dist.get_rank() == src
              else torch.empty(int(size.item()), dtype=torch.uint8, device=device))
    dist.broadcast(buffer, src)
    return bytes(buffer.cpu().tolist()).decode()


def check_same_batches(batch_ids: list, group, device="cpu", what: str = "this epoch") -> None:
    """Fail on every rank of ``group`` if its ranks would not work on the same samples.

    A mismatch would make the model's collectives combine parts of different graphs: silently wrong. The
    trainer calls this once per epoch with the epoch's batches (lists of sample ids): every rank of a graph
    group must have computed the same ones, so a 64-bit hash of them is the same on every rank. One small
    all-reduce MIN and MAX of the hash; a no-op without a group.
    """
    if group is None:
        return
    digest = hashlib.blake2b(digest_size=6)
    for ids in batch_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    value = float(int.from_bytes(digest.digest(), "little"))      # 48 bits: exact in float64
    low = torch.tensor([value], dtype=torch.float64, device=device)
    high = low.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if low.item() != high.item():
        first = list(batch_ids[0])[:8] if len(batch_ids) else []
        raise RuntimeError(f"rank {dist.get_rank()}: the ranks of one graph group disagree on the samples of "
                           f"{what} (this rank's first batch: {first}...); every rank of a group must use the "
                           f"same dataset, split, seed and batch size")


def all_gather_arrays(array, group, device="cpu") -> list:
    """Every rank's 1-D float64 NumPy array (lengths may differ), in rank order of ``group``."""
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
