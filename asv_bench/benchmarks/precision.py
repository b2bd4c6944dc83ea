"""Mixed precision: a training step with the forward under bf16 autocast, beside float32 and the reference.

A step here is what the trainer runs with ``trainer.precision=bf16``: forward under
``torch.autocast(dtype=torch.bfloat16)``, loss outside it, backward, Adam step; parameters and Adam state
float32 (``common.training_step(..., precision, optimizer)``). All variants of one comparison run interleaved
in one process (same graph, same starting parameters via ``load_state_dict``), medians reported.

``track_bf16_speedup``: our fp32 step time / our bf16 step time. ``track_bf16_vs_reference``: the reference's
(authors' structure, ``reference.py``) fp32 step / our bf16 step. ``track_bytes_per_edge``: peak memory of one
step (no optimiser, as ``ours_vs_reference.MemoryPerEdge``) over the edge count, fresh process per variant.
``Bf16Kernels``: the bf16 step with each way of running the fused blocks' elementwise work on bf16 rows
(``dist_egnn.models.native.BF16_PATH``: AVX512-BF16 kernels, float32 kernels with conversions, torch's ops).

The headline numbers of asv_bench/RESULTS.md come from the command line (``cd asv_bench``)::

    ../.venv/bin/python -m benchmarks.precision --size 20k --reps 5 --threads 2 1 --memory --paths
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from . import common

VARIANTS = {  # name: (model, precision)
    "ours-fp32": ("fastegnn", "fp32"),
    "ours-bf16": ("fastegnn", "bf16"),
    "reference-fp32": ("reference-fastegnn", "fp32"),
}


def _variants(model: str) -> dict:
    return {name: (m.replace("fastegnn", model), p) for name, (m, p) in VARIANTS.items()}


def interleaved(names: list[str], graph: dict, reps: int, model: str = "fastegnn", adam: bool = True,
                warmup: int = 1) -> dict:
    """Wall and process-CPU medians of training steps of the named variants, run in turn ``reps`` times."""
    variants = _variants(model)
    models, optimizers = {}, {}
    for name in names:
        net_name, _precision = variants[name]
        models[name] = common.make_model(net_name)
    first = next(iter(models.values()))
    for net in models.values():
        net.load_state_dict(first.state_dict())            # same parameters, same function
    for name, net in models.items():
        optimizers[name] = torch.optim.Adam(net.parameters(), lr=1e-4) if adam else None
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for _ in range(warmup):
        for name in names:
            common.training_step(models[name], graph, variants[name][1], optimizers[name])
    for _ in range(reps):
        for name in names:
            w, c = time.perf_counter(), time.process_time()
            common.training_step(models[name], graph, variants[name][1], optimizers[name])
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {n: {"wall_s": float(np.median(wall[n])), "cpu_s": float(np.median(cpu[n])),
                "wall_all": [round(t, 3) for t in wall[n]], "cpu_all": [round(t, 3) for t in cpu[n]]} for n in names}


class Bf16Speedup:
    params = [common.sizes("small", "20k"), ["fastegnn", "egnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = 1
    timeout = 1800
    unit = "x (time of the other / time of our bf16 step)"

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def track_bf16_speedup(self, graphs, size, model):
        t = interleaved(["ours-fp32", "ours-bf16"], graphs[size], reps=3, model=model)
        return t["ours-fp32"]["wall_s"] / t["ours-bf16"]["wall_s"]

    def track_bf16_vs_reference(self, graphs, size, model):
        t = interleaved(["reference-fp32", "ours-bf16"], graphs[size], reps=3, model=model)
        return t["reference-fp32"]["wall_s"] / t["ours-bf16"]["wall_s"]


class Bf16MemoryPerEdge:
    params = [common.sizes("small", "20k", "fluid113k"), ["fastegnn", "egnn"], list(common.PRECISIONS)]
    param_names = ["size", "model", "precision"]
    number = 1
    repeat = 1
    timeout = 1800
    unit = "bytes per edge"

    def track_bytes_per_edge(self, size, model, precision):
        return common.memory_in_subprocess(size, model, precision)["bytes_per_edge"]


class Bf16Kernels:
    """Our FastEGNN bf16 step with each ``native.BF16_PATH``: AVX512-BF16 kernels / float32 kernels on converted
    rows / torch's bfloat16 ops."""
    params = [common.sizes("20k"), ["native", "convert", "torch"]]
    param_names = ["size", "path"]
    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0.0
    timeout = 900

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, path):
        from dist_egnn.models import native
        if path == "native" and native.bf16_library() is None:
            raise NotImplementedError("the AVX512-BF16 kernels do not apply here")
        self.saved = native.BF16_PATH
        native.BF16_PATH = path
        self.graph = graphs[size]
        self.model = common.make_model("fastegnn")

    def teardown(self, graphs, size, path):
        from dist_egnn.models import native
        native.BF16_PATH = self.saved

    def time_step(self, graphs, size, path):
        common.training_step(self.model, self.graph, "bf16")


def _paths(graph: dict, reps: int) -> dict:
    """Our bf16 step under each BF16_PATH, interleaved (plus the fp32 step for scale)."""
    from dist_egnn.models import native
    model = common.make_model("fastegnn")
    paths = ["native", "convert", "torch"]
    cpu = {p: [] for p in ["fp32", *paths]}
    saved = native.BF16_PATH
    try:
        for rep in range(reps + 1):
            for p in cpu:
                native.BF16_PATH = "native" if p == "fp32" else p
                c = time.process_time()
                common.training_step(model, graph, "fp32" if p == "fp32" else "bf16")
                if rep:                                     # the first round warms up
                    cpu[p].append(time.process_time() - c)
    finally:
        native.BF16_PATH = saved
    return {p: float(np.median(v)) for p, v in cpu.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20k")
    parser.add_argument("--model", default="fastegnn", choices=["fastegnn", "egnn"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="*", default=[2, 1])
    parser.add_argument("--memory", action="store_true", help="also bytes per edge, fp32 and bf16, 1 and 2 threads")
    parser.add_argument("--paths", action="store_true", help="also the BF16_PATH comparison (1 thread, CPU time)")
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args(argv)
    graph = common.graph(args.size)
    result = {"size": args.size, "edges": int(graph["edge_index"].shape[1]), "model": args.model,
              "torch": torch.__version__, "load_before": os.getloadavg()}
    for threads in args.threads:
        torch.set_num_threads(threads)
        t = interleaved(list(VARIANTS), graph, args.reps, model=args.model)
        key = "wall_s" if threads > 1 else "cpu_s"
        t["ratios"] = {"basis": key,
                       "fp32_over_bf16": t["ours-fp32"][key] / t["ours-bf16"][key],
                       "reference_over_bf16": t["reference-fp32"][key] / t["ours-bf16"][key],
                       "reference_over_fp32": t["reference-fp32"][key] / t["ours-fp32"][key]}
        result[f"{threads}t"] = t
        print(json.dumps({f"{threads}t": t}, indent=1), flush=True)
    if args.paths:
        torch.set_num_threads(1)
        result["bf16_paths_cpu_s_1t"] = _paths(graph, max(3, args.reps - 1))
        print(json.dumps({"bf16_paths_cpu_s_1t": result["bf16_paths_cpu_s_1t"]}), flush=True)
    if args.memory:
        for threads in (1, 2):
            os.environ["DIST_EGNN_PROBE_THREADS"] = str(threads)
            for precision in common.PRECISIONS:
                m = common.memory_in_subprocess(args.size, args.model, precision)
                result[f"memory_{precision}_{threads}t"] = m
                print(json.dumps({f"memory_{precision}_{threads}t": m}), flush=True)
    result["load_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
