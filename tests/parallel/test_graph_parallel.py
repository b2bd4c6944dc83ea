"""P gloo ranks holding one part each of every graph compute what one device computes (docs/maths.md §4-5).

Exact halo mode: outputs, loss and gradients of P ranks equal the single-process FastEGNN on the whole
graphs (float64 to 1e-10, float32 to 1e-5 relative). Drop mode: they equal one process running the whole
graphs with the cut edges removed, which is "the P parts in sequence with the same global virtual-node
means". Also: the distributed forward is E(3)-equivariant, and the collectives' gradients are exact.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dist_egnn.datasets.graphs import radius_graph
from dist_egnn.losses import objective
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.parallel.collectives import GraphParallel, Injection
from dist_egnn.partitioners import partition
from dist_egnn.partitioners.subgraphs import HaloPlan, halo_mask, part_nodes, split_graph, stack_parts

from ranks import run_ranks

SIZES = (41, 30)          # two graphs of different sizes in one batch
RADIUS = 0.45
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_problem(seed: int = 0):
    """Two random radius graphs as one batch: NumPy arrays, global ids."""
    rng = np.random.default_rng(seed)
    pos = [rng.uniform(0, 1, (n, 3)) for n in SIZES]
    edges = [radius_graph(p, RADIUS) for p in pos]
    offsets = np.cumsum([0, *SIZES])
    n = offsets[-1]
    return dict(pos=np.concatenate(pos), vel=rng.normal(size=(n, 3)), features=rng.normal(size=(n, 2)),
                target=np.concatenate(pos) + 0.1 * rng.normal(size=(n, 3)), graph_pos=pos, graph_edges=edges,
                offsets=offsets, edge_index=np.concatenate([e + o for e, o in zip(edges, offsets)], axis=1),
                batch=np.repeat(np.arange(len(SIZES)), SIZES))


def edge_attr(pos: np.ndarray, edge_index: np.ndarray) -> np.ndarray:
    d2 = np.square(pos[edge_index[0]] - pos[edge_index[1]]).sum(1, keepdims=True)
    return np.concatenate([np.sqrt(d2), d2], axis=1)


def build_model(kind: str, dtype):
    torch.manual_seed(3)
    model = (FastEGNN(hidden=16, layers=3, virtual_channels=3) if kind == "fastegnn"
             else EGNN(hidden=16, layers=3)).to(dtype)
    with torch.no_grad():                     # larger coordinate heads so coordinates really move
        for name, param in model.named_parameters():
            if name.endswith("2.weight") and param.shape[0] == 1:
                param.mul_(20)
    return model


def forward_loss(model, features, pos, vel, edge_index, attr, batch, target, comm=None, total_nodes=None,
                 parts=1):
    pred = model(features, pos, vel, edge_index, attr, batch, len(SIZES))
    terms = objective(pred.pos, target, pred.virtual_pos, batch, len(SIZES), mmd_weight=0.5, mmd_sigma=0.5,
                      comm=comm, total_nodes=total_nodes, parts=parts)
    return pred, terms


def one_device(kind: str, dtype, problem, edge_index=None):
    """Reference: the whole batch in this process. Returns predictions, loss and gradients."""
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    edge_index = problem["edge_index"] if edge_index is None else edge_index
    model = build_model(kind, dtype)
    pred, terms = forward_loss(model, t(problem["features"]), t(problem["pos"]), t(problem["vel"]),
                               torch.as_tensor(edge_index), t(edge_attr(problem["pos"], edge_index)),
                               torch.as_tensor(problem["batch"]), t(problem["target"]))
    terms.total.backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for k, p in model.named_parameters()}
    virtual = None if pred.virtual_pos is None else pred.virtual_pos.detach()
    return pred.pos.detach(), virtual, terms.total.detach(), grads


def rank_batch(problem, parts_of_rank, dtype, halo: bool):
    """This rank's batch: its part of every graph, stacked (owned rows first, halo rows after)."""
    stacked = stack_parts(parts_of_rank)
    offsets = problem["offsets"]
    owned = np.concatenate([offsets[b] + p.owned for b, p in enumerate(parts_of_rank)])
    rows = np.empty(stacked.num_rows, dtype=np.int64)          # batch row -> global id in the whole batch
    rows[:stacked.num_owned] = owned
    for b, p in enumerate(parts_of_rank):
        rows[stacked.halo_rows[b]] = offsets[b] + p.halo
    edges = np.concatenate([stacked.batch_rows(b, p.edge_index.reshape(-1)).reshape(2, -1)
                            for b, p in enumerate(parts_of_rank)], axis=1)
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    plan = stacked.halo_plan() if halo else None
    global_edges = rows[edges]
    return dict(owned=owned, plan=plan, edge_index=torch.as_tensor(edges),
                features=t(problem["features"][owned]), pos=t(problem["pos"][owned]), vel=t(problem["vel"][owned]),
                target=t(problem["target"][owned]), batch=torch.as_tensor(problem["batch"][owned]),
                attr=t(edge_attr(problem["pos"], global_edges)))


def _rank_worker(rank, world_size, kind, dtype, problem, parts, halo, injection=None, overlap=False, fused=True):
    """One rank: forward, loss share and backward on its parts; gradients summed over ranks as DDP would.
    ``overlap``: the communicator's distributed.overlap (start the collectives early); ``fused``: the model's."""
    local = rank_batch(problem, [graph_parts[rank] for graph_parts in parts], dtype, halo)
    comm = GraphParallel(dist.group.WORLD, world_size, injection, overlap=overlap)
    comm.set_halo_plan(local["plan"])
    model = build_model(kind, dtype)
    model.set_fused(fused)
    model.set_comm(comm)
    pred, terms = forward_loss(model, local["features"], local["pos"], local["vel"], local["edge_index"],
                               local["attr"], local["batch"], local["target"], comm=comm,
                               total_nodes=float(sum(SIZES)), parts=world_size)
    terms.total.backward()
    grads = {}
    for name, p in model.named_parameters():    # parameters the output does not use have no gradient
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        dist.all_reduce(grads[name])
    total = terms.total.detach().clone()
    dist.all_reduce(total)
    virtual = None if pred.virtual_pos is None else pred.virtual_pos.detach()
    return local["owned"], pred.pos.detach(), virtual, total, grads


def assert_close(got, want, tol, what):
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    scale = want.abs().max().clamp(min=1e-12)
    err = ((got - want).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def compare(results, reference, dtype):
    ref_pos, ref_virtual, ref_loss, ref_grads = reference
    tol = TOLERANCE[dtype]
    for owned, pos, virtual, total, grads in results:
        assert_close(pos, ref_pos[owned], tol, "positions")
        if ref_virtual is not None:
            assert_close(virtual, ref_virtual, tol, "virtual positions")
        assert_close(total, ref_loss, tol, "loss")
        for name, g in grads.items():
            assert_close(g, ref_grads[name], 10 * tol, f"gradient of {name}")


def graph_parts(problem, num_parts: int, method: str, halo: bool, weights=None):
    return [split_graph(e, partition(p, num_parts, method, edge_index=e, seed=1, weights=weights).assignment,
                        num_parts, halo)
            for p, e in zip(problem["graph_pos"], problem["graph_edges"])]


EXACT = [(2, "metis", torch.float64, "fastegnn"), (2, "random", torch.float32, "fastegnn"),
         (4, "metis", torch.float32, "fastegnn"), (2, "spatial", torch.float64, "egnn")]
PLAIN_OVERLAP = [(2, "metis", torch.float64, "fastegnn"), (2, "spatial", torch.float64, "egnn")]
DROP = [(2, "metis"), (4, "random")]


def exact_case(world_size, method, dtype, kind):
    problem = make_problem()
    parts = graph_parts(problem, world_size, method, halo=True)
    assert any(p.num_halo for g in parts for p in g), "the test needs cut edges"
    return problem, parts


def drop_case(world_size, method):
    """The problem, its parts, and the edges drop mode keeps: those whose two ends are in one part."""
    problem = make_problem(1)
    parts = graph_parts(problem, world_size, method, halo=False)
    keep = np.concatenate([problem["offsets"][b] + p.local_to_global[p.edge_index]
                           for b, graph in enumerate(parts) for p in graph], axis=1)
    assert keep.shape[1] < problem["edge_index"].shape[1], "the test needs cut edges"
    return problem, parts, keep


def _jobs(rank, world_size, jobs):
    return [fn(rank, world_size, *args) for fn, args in jobs]


@functools.lru_cache(maxsize=None)
def rank_results(world_size: int) -> dict:
    """Every multi-rank job of this file for one world size, run in ONE set of processes (starting P
    Python processes costs seconds; the jobs themselves take milliseconds)."""
    jobs = {}
    for case in EXACT:
        if case[0] == world_size:
            problem, parts = exact_case(*case)
            for overlap in (False, True):
                jobs[("exact", *case, overlap)] = (_rank_worker, (case[3], case[2], problem, parts, True, None,
                                                                  overlap))
    for case in DROP:
        if case[0] == world_size:
            problem, parts, _ = drop_case(*case)
            for overlap in (False, True):
                jobs[("drop", *case, overlap)] = (_rank_worker, ("fastegnn", torch.float64, problem, parts, False,
                                                                 None, overlap))
    for case in PLAIN_OVERLAP:
        if case[0] == world_size:
            problem, parts = exact_case(*case)
            jobs[("plain-overlap", *case)] = (_rank_worker, (case[3], case[2], problem, parts, True, None, True,
                                                              False))
    if world_size == 2:
        problem, parts = weighted_case()
        jobs["weighted-injected"] = (_rank_worker, ("fastegnn", torch.float64, problem, parts, True, INJECTED))
        jobs["weighted-injected-overlap"] = (_rank_worker, ("fastegnn", torch.float64, problem, parts, True,
                                                            INJECTED, True))
        problem, parts = lonely_case()
        jobs["lonely-overlap"] = (_rank_worker, ("fastegnn", torch.float64, problem, parts, True, None, True))
        jobs["overlap-latency"] = (_overlap_latency_worker, ())
        jobs["adjoints-started"] = (_collectives_worker, (True,))
        jobs["latency"] = (_latency_worker, ())
        jobs["equivariance"] = (_equivariance_worker, equivariance_case())
        jobs["adjoints"] = (_collectives_worker, ())
        jobs["disagree"] = (_disagreeing_worker, ())
    per_rank = run_ranks(_jobs, world_size, list(jobs.values()))
    return {key: [results[k] for results in per_rank] for k, key in enumerate(jobs)}


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("world_size, method, dtype, kind", EXACT)
def test_exact_mode_equals_one_device(world_size, method, dtype, kind, overlap):
    """Guards the halo exchange, the global means and the loss scaling: P ranks == the whole graph; with
    distributed.overlap also the interior/cut edge split and the collectives started early (both directions)."""
    problem, _ = exact_case(world_size, method, dtype, kind)
    results = rank_results(world_size)[("exact", world_size, method, dtype, kind, overlap)]
    compare(results, one_device(kind, dtype, problem), dtype)


@pytest.mark.parametrize("world_size, method, dtype, kind", PLAIN_OVERLAP)
def test_overlap_with_plain_autograd_equals_one_device(world_size, method, dtype, kind):
    """Guards the overlap path of the unfused (plain autograd) edge block: the compact cut-edge rows."""
    problem, _ = exact_case(world_size, method, dtype, kind)
    compare(rank_results(world_size)[("plain-overlap", world_size, method, dtype, kind)],
            one_device(kind, dtype, problem), dtype)


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("world_size, method", DROP)
def test_drop_mode_equals_whole_graph_without_cut_edges(world_size, method, overlap):
    """Guards drop mode (the paper's DistEGNN): only the cut edges differ from one device."""
    problem, _, keep = drop_case(world_size, method)
    results = rank_results(world_size)[("drop", world_size, method, overlap)]
    compare(results, one_device("fastegnn", torch.float64, problem, edge_index=keep), torch.float64)


def lonely_case():
    """Two graphs whose parts leave rank 1 without any cut edge it receives while rank 0 still receives from it:
    rank 1's halo exchange has nothing to read, yet its adjoint must be issued (one-sided cut edges)."""
    problem = make_problem(5)
    parts = []
    for b, (pos, edges) in enumerate(zip(problem["graph_pos"], problem["graph_edges"])):
        assignment = partition(pos, 2, "metis", edge_index=edges, seed=1).assignment
        edges = edges[:, ~((assignment[edges[0]] == 1) & (assignment[edges[1]] == 0))]   # none 0 -> 1
        problem["graph_edges"][b] = edges
        parts.append(split_graph(edges, assignment, 2, True))
    problem["edge_index"] = np.concatenate([e + o for e, o in zip(problem["graph_edges"], problem["offsets"])],
                                           axis=1)
    assert sum(g[1].num_halo for g in parts) == 0 < sum(g[0].num_halo for g in parts)
    return problem, parts


def test_overlap_with_a_rank_without_cut_edges_equals_one_device():
    """Guards the overlap path when one rank receives no halo rows: it still joins the adjoint exchange."""
    problem, _ = lonely_case()
    compare(rank_results(2)["lonely-overlap"], one_device("fastegnn", torch.float64, problem), torch.float64)


WEIGHTS = [0.3, 0.7]
# rank 0 twice as slow plus 1 ms per forward; every collective 2 ms late: none of it may change a number
INJECTED = Injection(latency_s=0.002, slowdown=2.0, delay_s=0.001)


def weighted_case():
    problem = make_problem(4)
    return problem, graph_parts(problem, 2, "metis", halo=True, weights=WEIGHTS)


def test_weighted_parts_with_injected_delays_equal_one_device():
    """Guards weighted partitions (distributed.part_weights) and the injected latency and slowdown: exact mode
    still equals one device, and the parts have the asked shares."""
    problem, parts = weighted_case()
    owned = [sum(len(graph[p].owned) for graph in parts) for p in range(2)]
    assert abs(owned[0] / sum(owned) - WEIGHTS[0]) < 0.05, owned
    compare(rank_results(2)["weighted-injected"], one_device("fastegnn", torch.float64, problem), torch.float64)
    compare(rank_results(2)["weighted-injected-overlap"], one_device("fastegnn", torch.float64, problem),
            torch.float64)


def _latency_worker(rank, world_size, latency=0.2):
    """Seconds of: an all-reduce with latency L waited for at once; one with L of other work between issue and
    wait (an overlap); a halo exchange's forward and backward with L each. The compute clock of the slowdown too."""
    timed = {}
    comm = GraphParallel(dist.group.WORLD, world_size, Injection(latency_s=latency))
    x = torch.ones(4, dtype=torch.float64)
    for name, overlap in (("blocking", 0.0), ("overlapped", latency)):
        dist.barrier()
        started = time.perf_counter()
        pending = comm.issue(lambda: dist.all_reduce(x, async_op=True), x)
        time.sleep(overlap)                           # work done while the collective is in flight
        pending.wait()
        timed[name] = time.perf_counter() - started
    send, send_counts, recv_counts = PLANS[rank]
    comm.set_halo_plan(HaloPlan(torch.tensor(send), send_counts, recv_counts))
    rows = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    dist.barrier()
    started = time.perf_counter()
    comm.exchange_halo(rows)[0].sum().backward()
    timed["halo forward and backward"] = time.perf_counter() - started
    timed["calls"] = comm.stats.calls
    slow = GraphParallel(dist.group.WORLD, world_size, Injection(slowdown=3.0 if rank == 0 else 1.0))
    slow.set_halo_plan(None)
    time.sleep(0.1)                                   # 0.1 s of "compute": rank 0 adds 0.2 s before its collective
    dist.barrier()
    started = time.perf_counter()
    slow.sum_over_parts(x)
    timed["waited for the slow rank"] = time.perf_counter() - started
    return timed


def test_injected_latency_is_counted_from_the_issue():
    """Guards distributed.inject_latency_ms: every collective completes L after it was issued, so a blocking one
    takes L, one with L of work between issue and wait adds nothing, and forward and backward each pay it; and
    distributed.inject_slowdown: the slow rank arrives (slowdown − 1) × its compute late at the next collective."""
    for timed in rank_results(2)["latency"]:
        assert 0.2 <= timed["blocking"] < 0.35, timed
        assert 0.2 <= timed["overlapped"] < 0.3, timed          # not 0.4: the latency ran during the work
        assert 0.4 <= timed["halo forward and backward"] < 0.7, timed
        assert timed["calls"] == 4, timed
    fast = rank_results(2)["latency"][1]["waited for the slow rank"]
    assert 0.15 <= fast < 0.4, fast


class Sleep(torch.autograd.Function):
    """Identity that sleeps ``seconds`` in forward and again in backward: work of known length."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


def _overlap_latency_worker(rank, world_size, latency=0.2):
    """Seconds of a halo exchange started, L of work, then waited for: forward alone, forward and backward."""
    timed = {}
    comm = GraphParallel(dist.group.WORLD, world_size, Injection(latency_s=latency), overlap=True)
    send, send_counts, recv_counts = PLANS[rank]
    comm.set_halo_plan(HaloPlan(torch.tensor(send), send_counts, recv_counts))
    rows = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    dist.barrier()
    started = time.perf_counter()
    handle = comm.start_halo(rows)
    work = Sleep.apply(rows, latency)               # made between issue and wait: its backward runs in between too
    (halo,) = handle.wait()
    timed["forward"] = time.perf_counter() - started
    (halo.sum() + work.sum()).backward()
    timed["forward and backward"] = time.perf_counter() - started
    timed["calls"] = comm.stats.calls
    return timed


def test_started_halo_exchange_hides_latency_in_both_directions():
    """Guards distributed.overlap's mechanism: work placed between start_halo and wait hides the injected latency,
    and autograd runs that work's backward while the adjoint exchange is in flight (2 L in all, not 4 L)."""
    for timed in rank_results(2)["overlap-latency"]:
        assert 0.2 <= timed["forward"] < 0.3, timed
        assert 0.4 <= timed["forward and backward"] < 0.6, timed
        assert timed["calls"] == 2, timed


def _equivariance_worker(rank, world_size, problem, parts, rotation, shift):
    local = rank_batch(problem, [g[rank] for g in parts], torch.float64, True)
    comm = GraphParallel(dist.group.WORLD, world_size)
    comm.set_halo_plan(local["plan"])
    model = build_model("fastegnn", torch.float64)
    model.set_comm(comm)
    args = (local["features"], local["edge_index"], local["attr"], local["batch"])
    plain = model(args[0], local["pos"], local["vel"], args[1], args[2], args[3], len(SIZES))
    moved = model(args[0], local["pos"] @ rotation.T + shift, local["vel"] @ rotation.T, args[1], args[2], args[3],
                  len(SIZES))
    return (plain.pos @ rotation.T + shift - moved.pos).abs().max().item()


def equivariance_case():
    problem = make_problem(2)
    parts = graph_parts(problem, 2, "metis", halo=True)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rotation = q * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)     # improper: includes a reflection
    return problem, parts, rotation, torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)


def test_distributed_forward_is_equivariant():
    """Guards the collectives against breaking E(3) equivariance (rotation with reflection, translation)."""
    assert max(rank_results(2)["equivariance"]) < 1e-10


PLANS = {0: ([2, 0], [0, 2], [0, 1]), 1: ([1], [1, 0], [2, 0])}
"""Rank 0 sends its rows [2, 0] to rank 1; rank 1 sends its row [1] to rank 0 (send_index, send, recv counts)."""


def _collectives_worker(rank, world_size, started=False):
    def inputs(r):
        g = torch.Generator().manual_seed(r)
        return [torch.randn(*shape, dtype=torch.float64, generator=g) for shape in ((3, 2), (3, 1), (5, 2), (2,))]

    def loss(r, x, halo_rows, total):
        _, w, a, b = inputs(r)
        return (torch.cat([x, halo_rows]).square() * a[:3 + len(halo_rows)]).sum() + (total.pow(3) * b).sum()

    comm = GraphParallel(dist.group.WORLD, world_size)
    send, send_counts, recv_counts = PLANS[rank]
    comm.set_halo_plan(HaloPlan(torch.tensor(send), send_counts, recv_counts))
    x = inputs(rank)[0].requires_grad_()
    if started:                                       # distributed.overlap's handles: both in flight at once
        halo, summed = comm.start_halo(x), comm.start_sum((x * inputs(rank)[1]).sum(0))
        (halo_rows,), (total,) = halo.wait(), summed.wait()
    else:
        (rows,) = comm.exchange_halo(x)
        (total,) = comm.sum_over_parts((x * inputs(rank)[1]).sum(0))
        halo_rows = rows[3:]
    loss(rank, x, halo_rows, total).backward()

    # The same arithmetic in one process, every rank's inputs at hand: L = L_0 + L_1.
    xs = [inputs(r)[0].requires_grad_() for r in range(2)]
    whole = sum((xs[r] * inputs(r)[1]).sum(0) for r in range(2))
    halos = [xs[1][PLANS[1][0]], xs[0][PLANS[0][0]]]
    (loss(0, xs[0], halos[0], whole) + loss(1, xs[1], halos[1], whole)).backward()
    return (x.grad - xs[rank].grad).abs().max().item()


def test_collective_adjoints_match_one_process():
    """Guards the backward of the all-reduce and of the halo all-to-all against one process's autograd, blocking
    and started (start_halo, start_sum: the overlap's autograd nodes)."""
    assert max(rank_results(2)["adjoints"]) < 1e-12
    assert max(rank_results(2)["adjoints-started"]) < 1e-12


def _disagreeing_worker(rank, world_size):
    from dist_egnn.parallel.runtime import check_same_batches

    check_same_batches([[4, 7], [1, 2]], dist.group.WORLD)          # agree: passes
    try:
        check_same_batches([[4, 7], [1, 2 + rank]], dist.group.WORLD)
    except RuntimeError as err:
        return str(err)
    return "no error"


def test_ranks_that_disagree_on_the_samples_all_stop():
    """Guards against silently mixing parts of different graphs: every rank raises, none hangs."""
    messages = rank_results(2)["disagree"]
    assert all("disagree on the samples" in m for m in messages)


def test_stored_halo_mask_gives_the_split_graph_parts():
    """Guards the path a rank takes without the whole graph: assignment + halo mask == split_graph."""
    problem = make_problem(3)
    pos, edges = problem["graph_pos"][0], problem["graph_edges"][0]
    for num_parts, method in [(2, "metis"), (5, "random")]:
        assignment = partition(pos, num_parts, method, edge_index=edges, seed=0).assignment
        mask = halo_mask(edges, assignment, num_parts)
        for whole in split_graph(edges, assignment, num_parts, halo=True):
            nodes = part_nodes(assignment, mask, whole.part, num_parts)
            assert np.array_equal(nodes.owned, whole.owned) and np.array_equal(nodes.halo, whole.halo)
            assert np.array_equal(nodes.halo_owner, whole.halo_owner)
            assert whole.send.keys() == nodes.send.keys()
            assert all(np.array_equal(whole.send[q], nodes.send[q]) for q in whole.send)
