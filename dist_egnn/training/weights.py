"""Part weights: how much of every graph each part gets (``distributed.part_weights``), for ranks of different speeds.

* ``uniform``: 1/P each (None here: the partitioners' unweighted path).
* a list: P positive shares summing to 1 (checked by ``dist_egnn.config.check``), used as given.
* ``measured``: every rank times the model on the same probe graph (:func:`probe_seconds`: a synthetic radius
  graph of :data:`PROBE_NODES` nodes, forward and backward, the fastest of a few steps after a warm-up: other jobs
  on the machine only ever add time), with this rank's threads and its injected slowdown; part p's share is
  proportional to the speed of the slowest rank holding part p in any graph group, rounded to 1 %. Speeds within
  :data:`EQUAL_WITHIN` of each other count as equal (uniform parts: timing noise must not make a new stored
  partition each run). Every rank computes the shares from the same gathered times, so all agree. The probe
  measures the work that grows with the graph; per-step costs that do not (the optimizer step, the virtual
  nodes) are not in it, so a very slow rank with a small share stays a little behind.

A slower rank then owns fewer nodes: with a rank at half speed, P = 2, shares 1/3 and 2/3 make both take as long
(docs/results/straggler.md measures it).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from dist_egnn.errors import ConfigError

PROBE_NODES = 4096        # nodes of the probe graph (~15 neighbours each: ~60K directed edges)
PROBE_NEIGHBOURS = 15.0
PROBE_STEPS = 5           # timed forward + backward passes, after one warm-up; the fastest counts
EQUAL_WITHIN = 0.10       # speeds within 10 % of the fastest count as equal


def resolve_part_weights(cfg, rt) -> list[float] | None:
    """The shares of ``distributed.part_weights`` for this run (None: uniform); ``measured`` probes every rank.

    Every rank of the launch must call it (``measured`` gathers one number from every rank)."""
    d = cfg.distributed
    value = d.get("part_weights", "uniform")
    if d.parts == 1 or value == "uniform":
        return None
    if value != "measured":
        shares = [float(w) for w in value]
        return None if len(set(shares)) == 1 else shares
    if not rt.env.distributed:
        raise ConfigError("distributed.part_weights=measured compares the speeds of P ranks, but this is one process "
                          "(it runs every part itself, at one speed): launch P ranks, or give the shares as a list")
    from dist_egnn.parallel import runtime
    from dist_egnn.training.setup import build_model

    model = build_model(cfg.model, rt.device).to(rt.device, rt.dtype)
    seconds = probe_seconds(model, cfg.model, rt.device, rt.dtype, injected_slowdown(cfg, rt.env.rank))
    mine = [0.0] * rt.env.world_size
    mine[rt.env.rank] = seconds
    every = runtime.all_reduce_numbers(mine, "sum", device=rt.collective_device)       # by global rank
    slowest = np.zeros(d.parts)
    for rank, value in enumerate(every):
        slowest[rank % d.parts] = max(slowest[rank % d.parts], value)
    shares = shares_from_seconds(slowest)
    if rt.is_main:
        print(f"distributed.part_weights=measured: probe step {', '.join(f'{s * 1e3:.0f}' for s in slowest)} ms "
              f"on parts 0..{d.parts - 1} -> shares {shares if shares is not None else 'uniform'}", flush=True)
    return shares


def shares_from_seconds(seconds) -> list[float] | None:
    """Shares proportional to speed (1 / seconds), rounded to 1 % and summing to 1; None when every speed is within
    :data:`EQUAL_WITHIN` of the fastest."""
    speed = 1.0 / np.asarray(seconds, dtype=np.float64)
    if speed.min() >= (1.0 - EQUAL_WITHIN) * speed.max():
        return None
    cents = np.maximum(np.round(100 * speed / speed.sum()).astype(np.int64), 1)
    cents[int(np.argmax(cents))] += 100 - int(cents.sum())          # the rounding remainder to the largest share
    return [int(c) / 100 for c in cents]


def injected_slowdown(cfg, rank: int) -> tuple[float, float]:
    """(slowdown, delay in s) that ``distributed.inject_slowdown`` / ``inject_delay_ms`` give this rank."""
    d = cfg.distributed
    if rank not in list(d.get("inject_ranks", [0])):
        return 1.0, 0.0
    return float(d.get("inject_slowdown", 1.0)), float(d.get("inject_delay_ms", 0.0)) / 1e3


def probe_seconds(model: torch.nn.Module, model_cfg, device: torch.device, dtype: torch.dtype,
                  injected: tuple[float, float] = (1.0, 0.0), nodes: int = PROBE_NODES,
                  steps: int = PROBE_STEPS) -> float:
    """Seconds of one forward and backward of ``model`` on a synthetic radius graph (one process, no collectives),
    the fastest of ``steps`` after a warm-up, the injected slowdown and delay added as the rank's collectives would
    add them."""
    from dist_egnn.datasets.graphs import radius_graph

    rng = np.random.default_rng(0)
    pos = rng.uniform(0.0, 1.0, (nodes, 3))
    radius = (3.0 * PROBE_NEIGHBOURS / (4.0 * np.pi * nodes)) ** (1.0 / 3.0)
    edges = torch.as_tensor(radius_graph(pos, radius), device=device)
    as_tensor = lambda a: torch.as_tensor(a, dtype=dtype, device=device)  # noqa: E731
    positions = as_tensor(pos)
    inputs = dict(node_features=as_tensor(rng.normal(size=(nodes, model_cfg.node_features))), pos=positions,
                  vel=as_tensor(rng.normal(size=(nodes, 3))), edge_index=edges,
                  edge_attr=as_tensor(rng.normal(size=(edges.shape[1], model_cfg.edge_features))),
                  batch=torch.zeros(nodes, dtype=torch.long, device=device), num_graphs=1)
    if model_cfg.node_attrs:
        inputs["node_attr"] = as_tensor(rng.normal(size=(nodes, model_cfg.node_attrs)))
    slowdown, delay = injected
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        (model(**inputs).pos - positions).square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute = time.perf_counter() - started
        time.sleep((slowdown - 1.0) * compute + delay)
        if step:
            times.append(time.perf_counter() - started)
    model.zero_grad(set_to_none=True)
    return min(times)
