"""A straggler, and partitions weighted by rank speed: ``python -m dist_egnn.measure.straggler``.

    python -m dist_egnn.measure.straggler                     # P = 2 real ranks; P = 4 projected; slowdown 2

Real ranks (P = 2, exact halo mode): rank 0 computes ``--slowdown`` times slower (``distributed.inject_slowdown``:
it sleeps (slowdown − 1) × its compute between collectives). Two ``torchrun`` launches of
``dist_egnn.measure.latency.worker``: one on the uniform partition, one with ``distributed.part_weights=measured``
(each rank times the model on a probe graph at set-up, the injected slowdown included, and the partition is made
with shares ∝ speed). Each launch times training steps with and without the straggler, interleaved and repeated.

Lost step time: T(straggler, uniform) − T(no straggler, uniform); recovered: T(straggler, uniform) −
T(straggler, weighted); the table gives recovered / lost. The best any partition can do: the ranks' total speed
drops from P to P − 1 + 1/slowdown, so the perfectly balanced step takes P / (P − 1 + 1/slowdown) × the
no-straggler step; with compute-bound steps (T(straggler, uniform) = slowdown × T) that recovers at most
(slowdown − P / (P − 1 + 1/slowdown)) / (slowdown − 1) of the lost time: 2/3 at P = 2, slowdown 2; 6/7 at P = 4.

Projected (``--project``, P = 4 by default, as ``dist_egnn.measure.scaling`` projects: each part's training step
timed alone with one thread, CPU time): part 0's time × slowdown, the slowest part taken, the modelled
communication added, on the uniform partition and on shares ∝ speed. It shows what a core per rank would give
where this machine has too few, and it is the clean comparison: the real ranks of one machine share its caches
and memory bandwidth (and its cores with other jobs), so a rank that sleeps (the injected straggler, or a rank
with the smaller share waiting) speeds the other up, which mixes into the real numbers.

Writes ``<out>.csv`` and ``<out>.md`` (with the command line).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_egnn.measure.latency import COMMON, NODES, ROOT, graph, run_worker, summarize
from dist_egnn.measure.reporting import shrink_problem, write_csv

SETTINGS = lambda slowdown: [dict(label="no straggler"),  # noqa: E731
                             dict(label="straggler", slowdown=slowdown, slow_ranks=[0])]


def ideal_fraction(parts: int, slowdown: float) -> float:
    """The most of the lost step time any partition can recover (compute-bound steps; module docstring)."""
    balanced = parts / (parts - 1 + 1 / slowdown)
    return (slowdown - balanced) / (slowdown - 1)


def real(parts: int, slowdown: float, steps: int, repeats: int, overrides: list[str], work: Path) -> list[dict]:
    common = [*overrides, f"distributed.parts={parts}", "distributed.halo=exact", "distributed.inject_ranks=[0]",
              f"distributed.inject_slowdown={slowdown}"]     # set-up only: the probe of `measured` sees it
    uniform = summarize(run_worker(parts, [*common, "distributed.part_weights=uniform"], SETTINGS(slowdown), steps,
                                   repeats, work / "uniform"))
    weighted_rows = run_worker(parts, [*common, "distributed.part_weights=measured"], SETTINGS(slowdown), steps,
                               repeats, work / "measured")
    weighted = summarize(weighted_rows)
    owned = {}
    for row in weighted_rows:
        owned.setdefault(row["rank"], row["owned"])
    shares = [owned[r] / sum(owned.values()) for r in sorted(owned)]
    base, slow, fixed = (uniform["no straggler"]["step_time_s"], uniform["straggler"]["step_time_s"],
                         weighted["straggler"]["step_time_s"])
    common_row = dict(kind="real", parts=parts, slowdown=slowdown, ideal=ideal_fraction(parts, slowdown))
    return [dict(common_row, partition="uniform", straggler="no", shares="0.5, 0.5", step_time_s=base),
            dict(common_row, partition="uniform", straggler="yes", shares="0.5, 0.5", step_time_s=slow),
            dict(common_row, partition="measured", straggler="yes", shares=", ".join(f"{s:.2f}" for s in shares),
                 step_time_s=fixed, recovered=(slow - fixed) / (slow - base)),
            dict(common_row, partition="measured", straggler="no", shares=", ".join(f"{s:.2f}" for s in shares),
                 step_time_s=weighted["no straggler"]["step_time_s"])]


def projected(parts: int, slowdown: float, steps: int, overrides: list[str]) -> list[dict]:
    """Per-part steps timed alone (CPU time, one thread) on the uniform and the speed-weighted partition."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dist_egnn.config import register, to_container
    from dist_egnn.measure.scaling import communication_seconds, in_fresh_process, measure_links, measure_part
    from dist_egnn.partitioners.artifacts import prepare_partitions
    from dist_egnn.training.setup import load_splits, open_dataset_store
    from dist_egnn.training.weights import shares_from_seconds

    speeds = [1.0 / slowdown] + [1.0] * (parts - 1)
    weights = shares_from_seconds([1.0 / s for s in speeds])
    links = measure_links()
    rows = []
    register()
    for label, shares in (("uniform", None), ("speed-weighted", weights)):
        extra = [] if shares is None else ["distributed.part_weights=[" + ",".join(map(str, shares)) + "]"]
        with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
            container = to_container(compose("config", overrides=[*overrides, f"distributed.parts={parts}",
                                                                   "distributed.halo=exact", *extra]))
        cfg = OmegaConf.create(container)
        info = open_dataset_store(cfg.dataset, progress=False)
        prepare_partitions(load_splits(cfg, info), cfg.distributed.partition, parts, cfg.distributed.seed,
                           progress=False, weights=shares)
        results = [in_fresh_process(measure_part, container, part, parts, True, steps) for part in range(parts)]
        comm = max(communication_seconds(r, parts, links) for r in results)
        for straggler in ("no", "yes"):
            compute = [r["step_time_s"] * (slowdown if straggler == "yes" and r["part"] == 0 else 1.0)
                       for r in results]
            rows.append(dict(kind="projected", parts=parts, slowdown=slowdown, partition=label, straggler=straggler,
                             shares=", ".join(f"{r['owned'] / sum(x['owned'] for x in results):.2f}"
                                              for r in results),
                             step_time_s=max(compute) + comm, ideal=ideal_fraction(parts, slowdown)))
    base = next(r for r in rows if r["partition"] == "uniform" and r["straggler"] == "no")["step_time_s"]
    slow = next(r for r in rows if r["partition"] == "uniform" and r["straggler"] == "yes")["step_time_s"]
    fixed = next(r for r in rows if r["partition"] == "speed-weighted" and r["straggler"] == "yes")
    fixed["recovered"] = (slow - fixed["step_time_s"]) / (slow - base)
    return rows


COLUMNS = ["kind", "parts", "slowdown", "partition", "shares", "straggler", "step_time_s", "recovered", "ideal"]


def write(rows: list[dict[str, Any]], out: Path, command: str, notes: str) -> None:
    write_csv(rows, COLUMNS, out.with_suffix(".csv"))
    lines = ["# A straggler, and partitions weighted by rank speed", "", f"Made by `{command}`.", "", notes, "",
             "| kind | P | rank 0 slowdown | partition | node shares | straggler on | step time (s) | "
             "recovered of the lost time | best possible |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        recovered = f"{r['recovered']:.0%}" if r.get("recovered") is not None else ""
        best = f"{r['ideal']:.0%}" if r.get("recovered") is not None else ""
        lines.append(f"| {r['kind']} | {r['parts']} | {r['slowdown']:g} | {r['partition']} | {r['shares']} | "
                     f"{r['straggler']} | {r['step_time_s']:.3f} | {recovered} | {best} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slowdown", type=float, default=2.0)
    parser.add_argument("--parts", type=int, default=2, help="real ranks")
    parser.add_argument("--project", type=int, nargs="*", default=[4], help="projected P (none: skip)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and repeat")
    parser.add_argument("--project-steps", type=int, default=7, help="timed steps per part, projected")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=NODES, help="particles of the synthetic graph")
    parser.add_argument("--data", default=str(ROOT / "data"), help="paths.data")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "straggler"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other settings")
    parser.add_argument("overrides", nargs="*", help="more launch/train.py overrides")
    args = parser.parse_args(argv)
    problem = None if args.overwrite else shrink_problem(
        Path(args.out).with_suffix(".csv"), lambda row: (int(row["parts"]), float(row["slowdown"])),
        {(parts, args.slowdown) for parts in (args.parts, *args.project)}, "--out PATH", "--overwrite")
    if problem:
        parser.error(problem)
    overrides = [*graph(args.nodes), *COMMON, f"paths.data={args.data}", *args.overrides]
    started = time.strftime("%Y-%m-%d %H:%M")
    with tempfile.TemporaryDirectory(prefix="straggler-") as work:
        rows = real(args.parts, args.slowdown, args.steps, args.repeats, overrides, Path(work))
    for parts in args.project:
        rows += projected(parts, args.slowdown, args.project_steps, overrides)
    notes = (f"{started}, this machine ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end: "
             f"other jobs shared the cores). Graph: {' '.join(graph(args.nodes)[1:])}, one graph per step, "
             f"FastEGNN defaults, "
             f"exact halo mode, METIS. `real`: {args.parts} ranks with a thread each, {args.steps} timed steps × "
             f"{args.repeats} repeats per setting, with and without the straggler interleaved; step time: the "
             f"fastest step's wall time on the slowest rank (other jobs only ever add time). `projected`: each "
             f"part's step alone with one thread (CPU time, median of {args.project_steps} steps), part 0's × the "
             f"slowdown, slowest part + modelled communication (dist_egnn/measure/scaling.py). Recovered: "
             f"(T straggler uniform − T straggler weighted) / (T straggler uniform − T no straggler uniform); best "
             f"possible: the same for a perfectly balanced split of the remaining speed (module docstring of "
             f"dist_egnn/measure/straggler.py).")
    write(rows, Path(args.out), "python -m dist_egnn.measure.straggler " + " ".join(argv), notes)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
