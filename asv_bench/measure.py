"""The headline numbers of asv_bench/RESULTS.md in one run: ours vs the authors' structure, side by side.

    .venv/bin/python asv_bench/measure.py --out asv_bench/measure.json

Everything is interleaved in one process (ours, reference, ours, reference, ...) and reported as medians,
so machine noise hits both variants alike; memory is measured per variant in a fresh process
(``common.memory_in_subprocess``). Times are given as wall clock at 2 threads and as process CPU time at
1 thread (the latter barely moves when other jobs share the machine).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks import common  # noqa: E402


def side_by_side(names, graph, reps, threads):
    torch.set_num_threads(threads)
    models = {name: common.make_model(name) for name in names}
    base = models[names[0]]
    for model in models.values():
        model.load_state_dict(base.state_dict())
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for model in models.values():                           # warm-up, not measured
        common.training_step(model, graph)
    for _ in range(reps):
        for name, model in models.items():
            w, c = time.perf_counter(), time.process_time()
            common.training_step(model, graph)
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {n: {"wall_s": float(np.median(wall[n])), "cpu_s": float(np.median(cpu[n])), "wall_all": wall[n]}
            for n in names}


def roofline(name, graph, reps, threads):
    torch.set_num_threads(threads)
    model = common.make_model(name)
    calls = common.record_matmuls(lambda: common.training_step(model, graph))
    replay = common.replay_matmuls(calls)
    step, gemm = [], []
    for _ in range(reps):
        step.append(common.median_time(lambda: common.training_step(model, graph), repeat=1))
        gemm.append(common.median_time(replay, repeat=1))
    step_s, gemm_s = float(np.median(step)), float(np.median(gemm))
    gflop = common.flops(calls) / 1e9
    return {"step_s": step_s, "gemm_s": gemm_s, "ratio": step_s / gemm_s, "gflop": gflop,
            "gemm_gflops": gflop / gemm_s, "matmul_calls": len(calls)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="asv_bench/measure.json")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=["speed", "memory", "fluid", "roofline"])
    parser.add_argument("--threads", nargs="*", type=int, default=[2, 1])
    args = parser.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}

    def save():
        out_path.write_text(json.dumps(results, indent=1))

    results["machine"] = {"threads_default": torch.get_num_threads(), "torch": torch.__version__}
    g20 = common.graph("20k")
    results["graph_20k"] = {"nodes": int(g20["pos"].shape[0]), "edges": int(g20["edge_index"].shape[1])}
    if "speed" in args.only:
        for model in ("fastegnn", "egnn"):
            for threads in (2, 1):
                key = f"speed_20k_{model}_{threads}t"
                r = side_by_side([model, f"reference-{model}"], g20, args.reps, threads)
                r["ratio_wall"] = r[f"reference-{model}"]["wall_s"] / r[model]["wall_s"]
                r["ratio_cpu"] = r[f"reference-{model}"]["cpu_s"] / r[model]["cpu_s"]
                results[key] = r
                print(key, json.dumps({k: v for k, v in r.items() if k.startswith("ratio")}), flush=True)
                save()
    if "memory" in args.only:
        for size, model in [("20k", "fastegnn"), ("20k", "egnn"), ("fluid113k", "fastegnn"), ("fluid113k", "egnn"),
                            ("small", "reference-fastegnn"), ("20k", "reference-fastegnn"),
                            ("20k", "reference-egnn"), ("small", "fastegnn")]:
            results[f"memory_{size}_{model}"] = common.memory_in_subprocess(size, model)
            print(f"memory_{size}_{model}", results[f"memory_{size}_{model}"], flush=True)
            save()
    if "fluid" in args.only:
        g113 = common.graph("fluid113k")
        results["graph_fluid113k"] = {"nodes": int(g113["pos"].shape[0]), "edges": int(g113["edge_index"].shape[1])}
        for threads in (2, 1):
            r = side_by_side(["fastegnn"], g113, max(2, args.reps - 1), threads)
            results[f"fluid113k_fastegnn_{threads}t"] = r["fastegnn"]
            print(f"fluid113k_fastegnn_{threads}t", r["fastegnn"], flush=True)
            save()
        del g113
    if "roofline" in args.only:
        for model in ("fastegnn", "reference-fastegnn"):
            for threads in args.threads:
                results[f"roofline_20k_{model}_{threads}t"] = roofline(model, g20, args.reps, threads)
                print(f"roofline_20k_{model}_{threads}t", results[f"roofline_20k_{model}_{threads}t"], flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
