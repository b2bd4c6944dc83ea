"""Shared pieces of the benchmarks: graph sizes, graph builders, models by name, one training step, memory.

Sizes are named so that every benchmark file speaks of the same graphs:

    tiny        200 nodes, ~2.4K edges      (the pytest smoke run, DIST_EGNN_BENCH_TINY=1)
    small       5K nodes, ~60K edges
    20k         20K nodes, ~444K edges      (the graph the authors' model was timed on: ~13.7 s fwd+bwd)
    fluid113k   113K nodes, ~1.7M edges     (Fluid113K size)

Setting ``DIST_EGNN_BENCH_TINY=1`` replaces every size by ``tiny`` so the whole suite runs in seconds.
"""
from __future__ import annotations

import gc
import os
import re
import time

import numpy as np
import torch

from datasets.graphs import radius_graph

SIZES = {  # name: (nodes, target edges)
    "tiny": (200, 2_400),
    "small": (5_000, 60_000),
    "20k": (20_000, 444_000),
    "fluid113k": (113_000, 1_700_000),
}
TINY = os.environ.get("DIST_EGNN_BENCH_TINY", "") not in ("", "0")


def sizes(*names: str) -> list[str]:
    """The size names a benchmark is parametrised over (only ``tiny`` in a smoke run)."""
    return ["tiny"] if TINY else list(names)


def radius_graph_of_size(nodes: int, edges: int, seed: int = 0) -> dict:
    """Uniform points in a unit cube, radius chosen so that the radius graph has about ``edges`` edges.

    Returns float32 model inputs (node features [|v|, type], edge attributes [d, d] as in the authors'
    code), a target and a single-graph batch, edges sorted as cKDTree returns them (not by receiver).
    """
    rng = np.random.default_rng(seed)
    pos = rng.random((nodes, 3))
    radius = (edges / nodes / (4 / 3 * np.pi * nodes)) ** (1 / 3)
    for _ in range(4):                                   # the cube's boundary thins the neighbourhoods
        edge_index = radius_graph(pos, radius)
        if abs(edge_index.shape[1] - edges) < 0.01 * edges:
            break
        radius *= (edges / max(edge_index.shape[1], 1)) ** (1 / 3)
    vel = rng.normal(scale=0.01, size=(nodes, 3))
    dist = np.linalg.norm(pos[edge_index[0]] - pos[edge_index[1]], axis=1, keepdims=True)
    f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))   # noqa: E731
    return {
        "node_features": f32(np.concatenate([np.linalg.norm(vel, axis=1, keepdims=True),
                                             rng.integers(0, 2, (nodes, 1))], axis=1)),
        "pos": f32(pos), "vel": f32(vel),
        "edge_index": torch.from_numpy(edge_index),
        "edge_attr": f32(np.concatenate([dist, dist], axis=1)),
        "batch": torch.zeros(nodes, dtype=torch.long), "num_graphs": 1,
        "target": f32(pos + vel),
    }


def graph(size: str, seed: int = 0) -> dict:
    nodes, edges = SIZES[size]
    return radius_graph_of_size(nodes, edges, seed)


def model_inputs(g: dict) -> dict:
    return {k: v for k, v in g.items() if k != "target"}


def make_model(name: str, **kwargs) -> torch.nn.Module:
    """``fastegnn`` / ``egnn`` (ours) or ``reference-fastegnn`` / ``reference-egnn`` (the authors' structure)."""
    from dist_egnn.models import EGNN, FastEGNN

    from .reference import ReferenceEGNN, ReferenceFastEGNN
    builders = {"fastegnn": FastEGNN, "egnn": EGNN,
                "reference-fastegnn": ReferenceFastEGNN, "reference-egnn": ReferenceEGNN}
    torch.manual_seed(0)
    return builders[name](**kwargs)


def training_step(model: torch.nn.Module, g: dict) -> float:
    """One forward + backward (no optimiser step) of MSE on positions + a small virtual-position term."""
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(g))
    pos, virtual_pos = out[0], out[1]
    loss = (pos - g["target"]).square().mean()
    if virtual_pos is not None:
        loss = loss + 1e-3 * virtual_pos.square().mean()
    loss.backward()
    return float(loss.detach())


def median_time(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


# -- memory: the resident set's high-water mark, reset before the measured call (Linux) ------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def peak_memory_bytes(fn) -> int:
    """Peak resident memory added by ``fn()`` over what the process held before it, in bytes.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``), runs ``fn`` and reads ``VmHWM``. Memory
    the allocator keeps from earlier calls may be reused without growing the resident set, so measure one
    variant per fresh process when comparing (see ``compare.py``).
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return max(_status_kib("VmHWM") - before, 0) * 1024
