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
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dist_egnn.datasets.graphs import radius_graph

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


PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device_type: str = "cpu"):
    """The forward's context for ``precision``, as the trainer sets it (``trainer.precision``): bf16 autocast, or
    nothing (an autocast that is off) for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {PRECISIONS}")
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def training_step(model: torch.nn.Module, g: dict, precision: str = "fp32", optimizer=None) -> float:
    """One forward + backward of MSE on positions + a small virtual-position term, the forward under
    ``precision`` (bf16: autocast, loss outside it, as the trainer does), then ``optimizer.step()`` if given."""
    model.zero_grad(set_to_none=True)
    with autocast(precision):
        out = model(**model_inputs(g))
    pos, virtual_pos = out[0], out[1]
    loss = (pos - g["target"]).square().mean()
    if virtual_pos is not None:
        loss = loss + 1e-3 * virtual_pos.square().mean()
    loss.backward()
    if optimizer is not None:
        optimizer.step()
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


def memory_in_subprocess(size: str, model: str, precision: str = "fp32", **model_kwargs) -> dict:
    """Peak memory of one training step of ``model`` on graph ``size``, measured in a fresh process.

    A fresh interpreter per measurement keeps one variant's freed memory from hiding another's peak. glibc's
    malloc is pinned to a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_=65536``) so large tensors go back to
    the system when freed and the high-water mark tracks live tensors, as a GPU allocator's peak would.
    The probe runs with torch's default thread count (``DIST_EGNN_PROBE_THREADS`` overrides it): each
    worker thread of the fused blocks holds its own node-sized gradient accumulators. ``precision``: the step's
    forward under bf16 autocast or not (:func:`training_step`).
    Returns ``{"edges", "nodes", "step_bytes", "bytes_per_edge", "process_peak_bytes"}``.
    """
    code = ("import json, sys; from benchmarks.common import _memory_probe; "
            "print(json.dumps(_memory_probe(*json.loads(sys.argv[1]))))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code, json.dumps([size, model, model_kwargs, precision])], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _memory_probe(size: str, model: str, model_kwargs: dict, precision: str = "fp32") -> dict:
    if os.environ.get("DIST_EGNN_PROBE_THREADS"):
        torch.set_num_threads(int(os.environ["DIST_EGNN_PROBE_THREADS"]))
    g = graph(size)
    net = make_model(model, **model_kwargs)
    training_step(net, graph("tiny"), precision)   # first-call allocations (pools, kernels) out of the measurement
    step = peak_memory_bytes(lambda: training_step(net, g, precision))
    edges = int(g["edge_index"].shape[1])
    return {"edges": edges, "nodes": int(g["pos"].shape[0]), "step_bytes": step,
            "bytes_per_edge": step / max(edges, 1), "process_peak_bytes": _status_kib("VmHWM") * 1024}


# -- the dense matrix multiplies of a step, recorded and replayed alone ---------------------------------
_MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "mv", "addmv", "addmv_"}


def record_matmuls(fn) -> list[tuple[str, tuple]]:
    """The (op, operand shapes) of every matrix multiply that ``fn()`` dispatches, backward included."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in _MATMULS:
                calls.append((name, tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a
                                          for a in args[:3])))
            return func(*args, **(kwargs or {}))

    from dist_egnn.models import fused
    parallel = fused.PARALLEL_CHUNKS
    fused.PARALLEL_CHUNKS = False          # dispatch modes are per thread: keep every multiply in this one
    try:
        with Recorder():
            fn()
    finally:
        fused.PARALLEL_CHUNKS = parallel
    return calls


def replay_matmuls(calls: list[tuple[str, tuple]], dtype=torch.float32):
    """A function that runs the recorded multiplies again on random operands of the same shapes."""
    gen = torch.Generator().manual_seed(0)
    prepared = []
    for name, shapes in calls:
        operands = [torch.randn(s, generator=gen, dtype=dtype) if isinstance(s, tuple) else s for s in shapes]
        op = getattr(torch, name.rstrip("_"))
        prepared.append((op, operands))

    def run():
        for op, operands in prepared:
            op(*operands)
    return run


def flops(calls: list[tuple[str, tuple]]) -> float:
    """Floating-point operations of recorded multiplies (2 per multiply-add)."""
    total = 0.0
    for name, shapes in calls:
        a, b = (shapes[1], shapes[2]) if name.startswith(("add", "badd")) else (shapes[0], shapes[1])
        if len(a) == 1:                                          # matrix-vector
            total += 2.0 * b[0] * a[0] if name.endswith("mv") else 0.0
        elif len(a) == 3:
            total += 2.0 * a[0] * a[1] * a[2] * b[2]
        else:
            total += 2.0 * a[0] * a[1] * b[-1]
    return total
