"""Scaling measurements: real multi-rank steps, and per-rank critical-path projections where cores run out.

A machine with fewer cores than ranks cannot run P ranks in parallel. What it can do is run each rank's
step by itself, in turn: :func:`measure_part` times part p's training step (forward, loss, backward,
optimizer step) in a fresh process with one thread, as the CPU time the process used (what a core of its
own would take: unlike wall time, it does not grow when other jobs share the machine), with :class:`PartTwin`
standing in for the communicator: it returns the same shapes (local sums for the global means, halo rows
appended) and counts what the real collectives would move. A P-rank step then takes about

    T_P ≈ max_p T_compute(p) + T_comm(P)

the slowest rank (the others wait for it in the collectives) plus the communication, modelled from a
latency α and bandwidth β measured with real gloo collectives between two processes on this machine
(:func:`measure_links`): every all-reduce costs ⌈log2 P⌉ (α + bytes/β), every halo all-to-all
(P − 1) α + bytes/β, forward and backward. The projection is checked against the real 2-rank run
(``launch/scaling.py`` does both and writes the comparison).

Peak memory per rank comes from the same per-part process (its peak resident set, and the part above the
resident set it had after imports, which is what the rank itself adds).
"""
from __future__ import annotations

import math
import multiprocessing
import os
import resource
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

PROJECTION_THREADS = 1


class PartTwin:
    """Stands in for ``comm.GraphParallel`` when one part's step is timed alone: same shapes, no partners.

    ``sum_over_parts`` returns the local sums (the arithmetic of the real one minus the all-reduce);
    ``exchange_halo`` appends as many zero rows as the halo plan would receive. Both count the bytes the
    real collectives would move, per forward pass.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.plan = None
        self.allreduce_calls = self.allreduce_bytes = 0
        self.halo_calls = self.halo_bytes = 0

    def set_halo_plan(self, plan) -> None:
        self.plan = plan

    def sum_over_parts(self, *tensors):
        self.allreduce_calls += 1
        self.allreduce_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return tensors

    def exchange_halo(self, *node_tensors):
        if self.plan is None:
            return node_tensors
        width = sum(t.shape[1] for t in node_tensors)
        item = node_tensors[0].element_size()
        self.halo_calls += 1
        self.halo_bytes += (len(self.plan.send_index) + self.plan.num_recv) * width * item
        return tuple(torch.cat([t, t.new_zeros(self.plan.num_recv, t.shape[1])]) for t in node_tensors)

    def reset(self) -> None:
        self.allreduce_calls = self.allreduce_bytes = self.halo_calls = self.halo_bytes = 0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """The resident set now (MB)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure_part(cfg_container: dict, part: int, parts: int, halo: bool, steps: int,
                 warmup: int = 1) -> dict[str, Any]:
    """Time part ``part`` of ``parts`` alone for ``steps`` training steps after ``warmup`` untimed ones (one thread).

    Runs in its own process (see :func:`in_fresh_process`), so its peak memory is this part's alone.
    ``train_added_mb`` is the training step's own memory: the peak resident set over the resident set just
    before the first step, with that step's batch (read, graph, features) already built.
    """
    from omegaconf import OmegaConf

    from dist_egnn.engines.plain import PlainEngine
    from dist_egnn.partitioners.artifacts import artifact_path, load_assignments
    from dist_egnn.training.rank_data import RankData
    from dist_egnn.training.setup import DTYPES, build_model, has_external_field, load_splits, open_dataset_store
    from dist_egnn.training.trainer import train_step

    torch.set_num_threads(PROJECTION_THREADS)
    baseline = peak_rss_mb()
    cfg = OmegaConf.create(cfg_container)
    t, d = cfg.trainer, cfg.distributed
    info = open_dataset_store(cfg.dataset, progress=False)
    train = load_splits(cfg, info)["train"]
    if parts == 1:
        data = RankData(train)
    else:
        weights = d.get("part_weights", "uniform")               # a list: the stored partition of those shares
        weights = None if isinstance(weights, str) else list(weights)
        assignments = load_assignments(artifact_path(info.path, d.partition, parts, d.seed, weights), "train")
        # Edge dropping's global threshold needs the other ranks; alone, a part drops by its own lengths.
        data = RankData(train, part, parts, halo, assignments, gather=lambda values: [values])
    torch.manual_seed(t.seed)
    dtype = DTYPES[t.dtype]
    model = build_model(cfg.model, external_field=has_external_field(cfg.dataset)).to(dtype=dtype)
    twin = PartTwin(parts)
    model.set_comm(twin)
    groups = type("Groups", (), {"parts": parts, "env": None})()
    engine = PlainEngine(model, torch.optim.Adam(model.parameters(), lr=t.lr), groups)
    ids = data.batch_ids(t.batch_size, shuffle=True, seed=t.seed, epoch=1)
    times, walls, edges, nodes, rows, full = [], [], [], [], [], []
    before_training = None
    for k in range(steps + warmup):
        batch = None                                                   # one batch alive at a time
        batch = data.build(list(map(int, ids[k % len(ids)])), t.seed, 1)
        if before_training is None:
            before_training = rss_mb()
        twin.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        train_step(engine, twin, batch, cfg, torch.device("cpu"), dtype, parts)
        if k >= warmup:                                                # the first steps warm up
            times.append(time.process_time() - cpu_started)
            walls.append(time.perf_counter() - started)
        edges.append(batch.num_edges)
        nodes.append(batch.graph.pos.shape[0])
        rows.append(batch.plan.num_recv if batch.plan is not None else 0)
        full.append(batch.full_edges)
    return dict(part=part, parts=parts, halo=halo, step_time_s=statistics.median(times),
                wall_time_s=statistics.median(walls), steps=len(times),
                edges=float(np.mean(edges)), owned=float(np.mean(nodes)), halo_rows=float(np.mean(rows)),
                allreduce_calls=twin.allreduce_calls, allreduce_bytes=twin.allreduce_bytes,
                halo_calls=twin.halo_calls, halo_bytes=twin.halo_bytes,
                peak_rss_mb=peak_rss_mb(), baseline_rss_mb=baseline, full_edges=float(np.mean(full)),
                train_added_mb=peak_rss_mb() - before_training)


def count_parts(cfg_container: dict, parts: int, halo: bool) -> list[dict[str, float]]:
    """Edges, owned nodes and halo rows of every part of training sample 0, without a step (one process).

    Where only the part with the most edges is timed (large graphs), these say which part that is and give the
    table its totals (edges over all ranks, the dropped fraction).
    """
    from omegaconf import OmegaConf

    from dist_egnn.partitioners.artifacts import artifact_path, load_assignments
    from dist_egnn.training.rank_data import RankData
    from dist_egnn.training.setup import load_splits, open_dataset_store

    cfg = OmegaConf.create(cfg_container)
    d = cfg.distributed
    info = open_dataset_store(cfg.dataset, progress=False)
    train = load_splits(cfg, info)["train"]
    assignments = load_assignments(artifact_path(info.path, d.partition, parts, d.seed, None), "train")
    counts = []
    for part in range(parts):
        data = RankData(train, part, parts, halo, assignments, gather=lambda values: [values], report=False)
        batch = data.build([0])
        counts.append(dict(part=part, edges=float(batch.num_edges), owned=float(batch.graph.pos.shape[0]),
                           halo_rows=float(batch.plan.num_recv if batch.plan is not None else 0),
                           full_edges=float(batch.full_edges)))
        del batch
    return counts


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new spawned process (clean peak memory, no shared thread pools); returns its result."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ------------------------------------------------------------------------------------------- links
def _link_worker(rank: int, world_size: int, port: int, sizes: list[int], repeats: int, queue) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    result = {}
    for n in sizes:
        x = torch.ones(n)
        out = torch.empty(n)
        for name, op in (("allreduce", lambda: dist.all_reduce(x)),
                         ("alltoall", lambda: dist.all_to_all_single(out, x))):
            op()                                                        # warm-up
            samples = []
            for _ in range(repeats):
                dist.barrier()
                started = time.perf_counter()
                op()
                samples.append(time.perf_counter() - started)
            result[(name, n)] = statistics.median(samples)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(result)


def measure_links(sizes=(16, 4096, 1 << 20), repeats: int = 20) -> dict[str, float]:
    """Latency α (s) and bandwidth β (bytes/s) of gloo all-reduce and all-to-all between two local processes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_link_worker, args=(r, 2, port, list(sizes), repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    small, large = min(sizes), max(sizes)
    fit = {}
    for name in ("allreduce", "alltoall"):
        alpha = result[(name, small)]
        fit[f"{name}_alpha_s"] = alpha
        fit[f"{name}_beta_bytes_per_s"] = 4 * large / max(result[(name, large)] - alpha, 1e-9)
    return fit


def communication_seconds(part_result: dict[str, Any], parts: int, links: dict[str, float]) -> float:
    """Modelled time of one step's collectives for this part at P = ``parts`` (forward and backward)."""
    if parts == 1:
        return 0.0
    rounds = math.ceil(math.log2(parts))
    calls, volume = part_result["allreduce_calls"], part_result["allreduce_bytes"]
    allreduce = 2 * rounds * (calls * links["allreduce_alpha_s"] + volume / links["allreduce_beta_bytes_per_s"])
    calls, volume = part_result["halo_calls"], part_result["halo_bytes"]
    halo = 2 * (calls * (parts - 1) * links["alltoall_alpha_s"] + volume / links["alltoall_beta_bytes_per_s"])
    return allreduce + halo


def project(part_results: list[dict[str, Any]], links: dict[str, float]) -> dict[str, Any]:
    """The projected P-rank step from every part's own measurement: slowest part plus communication."""
    parts = part_results[0]["parts"]
    slowest = max(part_results, key=lambda r: r["step_time_s"])
    comm = max(communication_seconds(r, parts, links) for r in part_results)
    return dict(parts=parts, step_time_s=slowest["step_time_s"] + comm, compute_s=slowest["step_time_s"],
                comm_s=comm, edges_per_rank=max(r["edges"] for r in part_results),
                owned_per_rank=max(r["owned"] for r in part_results),
                halo_rows_per_rank=max(r["halo_rows"] for r in part_results),
                edges_total=sum(r["edges"] for r in part_results),
                full_edges=part_results[0]["full_edges"],
                peak_mem_mb=max(r["peak_rss_mb"] for r in part_results),
                added_mem_mb=max(r["peak_rss_mb"] - r["baseline_rss_mb"] for r in part_results),
                train_bytes_per_edge=max(r.get("train_added_mb", 0.0) * 2**20 / max(r["edges"], 1)
                                         for r in part_results),
                threads_per_rank=PROJECTION_THREADS, cores=os.cpu_count())
