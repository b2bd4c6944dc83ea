"""The external field (gravity), model.normalize and FastEGNN without wall-virtual messages (model.virtual_walls
false: the means of terms 5 and 7 over the moving nodes of all ranks) split over P = 2 gloo ranks in exact halo
mode: outputs, loss and gradients equal one process holding the whole graphs (docs/maths.md §5, §8).

g is per graph and the same on every rank holding part of a graph (no collective): each rank passes the (B, 3)
rows of its batch. Guards: a field indexed by the wrong rows on a rank (its local batch vector), a normalised
direction computed from halo rows differently than on one device.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.distributed as dist
from test_graph_parallel import SIZES, TOLERANCE, assert_close, edge_attr, graph_parts, make_problem, rank_batch

from dist_egnn.losses import objective
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.parallel.collectives import GraphParallel

from ranks import run_ranks

CASES = [("fastegnn", torch.float64, False, True, False), ("fastegnn", torch.float32, True, True, False),
         ("egnn", torch.float64, True, False, False), ("fastegnn", torch.float64, False, True, True),
         ("fastegnn", torch.float64, False, False, True)]   # (kind, dtype, normalize, fused, walls)


def moving_of(node_ids: np.ndarray, walls: bool) -> torch.Tensor | None:
    """Every fourth node (by its index in the whole problem) a wall, with ``walls``; None (no mask) without."""
    return torch.as_tensor(np.asarray(node_ids) % 4 != 0) if walls else None


def gravity_of(problem) -> np.ndarray:
    """A different field per graph (B, 3), so that rows taken from the wrong graph show."""
    return np.random.default_rng(5).normal(size=(len(SIZES), 3)) * np.array([[1.0], [3.0]])


def build_model(kind: str, dtype, normalize: bool, fused: bool, walls: bool):
    torch.manual_seed(3)
    cls = FastEGNN if kind == "fastegnn" else EGNN
    extra = dict(virtual_channels=3, virtual_walls=not walls) if kind == "fastegnn" else {}
    model = cls(hidden=16, layers=3, external_field=True, normalize=normalize, **extra).to(dtype)
    with torch.no_grad():                     # larger coordinate and field heads so every summand of (4) matters
        for name, param in model.named_parameters():
            if name.endswith("2.weight") and param.shape[0] == 1:
                param.mul_(20)
    model.set_fused(fused)
    return model


def loss_and_gradients(model, inputs, target, batch, comm=None, total_nodes=None, parts=1):
    pred = model(**inputs)
    terms = objective(pred.pos, target, pred.virtual_pos, batch, len(SIZES), mmd_weight=0.5, mmd_sigma=0.5,
                      comm=comm, total_nodes=total_nodes, parts=parts)
    terms.total.backward()
    grads = {k: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for k, p in model.named_parameters()}
    return pred.pos.detach(), terms.total.detach(), grads


def one_device(problem, kind, dtype, normalize, fused, walls):
    t = lambda a: torch.as_tensor(a, dtype=dtype)  # noqa: E731
    edges = problem["edge_index"]
    inputs = dict(node_features=t(problem["features"]), pos=t(problem["pos"]), vel=t(problem["vel"]),
                  edge_index=torch.as_tensor(edges), edge_attr=t(edge_attr(problem["pos"], edges)),
                  batch=torch.as_tensor(problem["batch"]), num_graphs=len(SIZES), gravity=t(gravity_of(problem)),
                  moving=moving_of(np.arange(len(problem["pos"])), walls))
    return loss_and_gradients(build_model(kind, dtype, normalize, fused, walls), inputs, t(problem["target"]),
                              inputs["batch"])


def _rank_worker(rank, world_size, problem, parts, kind, dtype, normalize, fused, walls):
    local = rank_batch(problem, [graph_parts[rank] for graph_parts in parts], dtype, halo=True)
    comm = GraphParallel(dist.group.WORLD, world_size)
    comm.set_halo_plan(local["plan"])
    model = build_model(kind, dtype, normalize, fused, walls)
    model.set_comm(comm)
    inputs = dict(node_features=local["features"], pos=local["pos"], vel=local["vel"], edge_index=local["edge_index"],
                  edge_attr=local["attr"], batch=local["batch"], num_graphs=len(SIZES),
                  gravity=torch.as_tensor(gravity_of(problem), dtype=dtype),      # the same (B, 3) on every rank
                  moving=moving_of(local["owned"], walls))
    pos, total, grads = loss_and_gradients(model, inputs, local["target"], local["batch"], comm=comm,
                                           total_nodes=float(sum(SIZES)), parts=world_size)
    for g in grads.values():
        dist.all_reduce(g)
    dist.all_reduce(total)
    return local["owned"], pos, total, grads


def _jobs(rank, world_size, jobs):
    return [_rank_worker(rank, world_size, *args) for args in jobs]


def case_problem():
    problem = make_problem(2)
    parts = graph_parts(problem, 2, "metis", halo=True)
    assert any(p.num_halo for g in parts for p in g), "the test needs cut edges"
    return problem, parts


@functools.lru_cache(maxsize=None)
def rank_results() -> list:
    """Every case on one set of 2 processes (starting them costs seconds, the cases milliseconds)."""
    problem, parts = case_problem()
    per_rank = run_ranks(_jobs, 2, [(problem, parts, *case) for case in CASES])
    return [[results[k] for results in per_rank] for k in range(len(CASES))]


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{k}-{str(d)[6:]}-normalize{n}-fused{f}-walls{w}"
                                                          for k, d, n, f, w in CASES])
def test_gravity_in_exact_mode_equals_one_device(index):
    kind, dtype, normalize, fused, walls = CASES[index]
    problem, _ = case_problem()
    ref_pos, ref_loss, ref_grads = one_device(problem, kind, dtype, normalize, fused, walls)
    tol = TOLERANCE[dtype]
    assert any(g.abs().sum() > 0 for name, g in ref_grads.items() if "field_mlp" in name)
    for owned, pos, total, grads in rank_results()[index]:
        assert_close(pos, ref_pos[owned], tol, "positions")
        assert_close(total, ref_loss, tol, "loss")
        for name, g in grads.items():
            assert_close(g, ref_grads[name], 10 * tol, f"gradient of {name}")
