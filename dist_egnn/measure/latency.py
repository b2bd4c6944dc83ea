"""Step time under injected network latency, real ranks: ``python -m dist_egnn.measure.latency``.

    python -m dist_egnn.measure.latency                       # P = 2 and 4, exact and drop, overlap off/on, 0/1/5/20 ms
    python -m dist_egnn.measure.latency --parts 2 --halo exact --overlap true --repeats 3 --out /tmp/latency

For each P and halo mode, one ``torchrun --standalone --nproc-per-node P`` launch runs :func:`worker` on every
rank: set-up as ``launch/train.py`` does it (``dist_egnn.training.setup.prepare``: stored partition, model, DDP
engine; the store and partition made on first use), one batch built once, then training steps
(``trainer.train_step``: forward, loss, backward, optimizer step) under each injected latency in turn
(``GraphParallel.injection``, the mechanism behind ``distributed.inject_latency_ms``) and with the overlap off and
on (``GraphParallel.overlap``, what ``distributed.overlap`` sets: the model reads it at every forward), the
settings interleaved and repeated so that drift in the machine's load hits them alike. Each step starts after a
barrier; its time is the slowest rank's wall time. Reported per setting: the fastest step (and the median), the
model's collectives per step (``CommStats.calls``, forward and backward), the time in them, the injected latency
the slowest rank waited for (``GraphParallel.exposed_latency_s``: what no other work hid; a clock of sleeps, so
other jobs on the machine hardly change it, unlike the step time), its CPU time, and the step time the blocking
model predicts,
T(0) + calls × latency: every collective completes ``latency`` after it is issued and the caller waits for it at
once, so the whole latency is on the critical path (an upper bound: a rank that would have waited for its partner
anyway absorbs part of it). With the overlap on, the halo exchange flies during the interior edges and FastEGNN's
all-reduces during the virtual terms and the cut edges (forward and backward): measured well below predicted.

Writes ``<out>.csv``, ``<out>.md`` (with this command line) and ``<out>.png``. :func:`worker` and
:func:`run_worker` are shared with ``dist_egnn.measure.straggler``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dist_egnn.measure.reporting import shrink_problem, write_csv

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LATENCIES_MS = (0.0, 1.0, 5.0, 20.0)
# Default: a 10,000-particle synthetic flow with Fluid113K's density (~24 neighbours, ~150K edges per graph), one graph
# per step: on this 2-core machine a P = 2 step takes ~1 s, long enough to time, short enough to repeat.
NODES = 10_000


def graph(nodes: int = NODES) -> list[str]:
    """Overrides for a synthetic flow of ``nodes`` particles with Fluid113K's density, stored as synthetic<N/1000>k."""
    return ["dataset=synthetic113k", f"dataset.name=synthetic{nodes // 1000}k",
            f"dataset.synthetic.num_particles={nodes}"]


COMMON = ["trainer.batch_size=1", "trainer.eval_batch_size=1", "trainer.progress=false", "engine=ddp"]


# ------------------------------------------------------------------------------------------ one rank
def worker(out: Path, run_dir: Path, settings: list[dict[str, Any]], steps: int, repeats: int,
           overrides: list[str]) -> None:
    """One rank under torchrun: set up as launch/train.py does, then time ``steps`` training steps (after one
    warm-up step) for every setting, ``repeats`` times in turn; rank 0 writes every rank's times to ``out``.

    A setting: ``label``, ``latency_ms`` (every rank), ``overlap`` (default: the configured one), ``slowdown`` and
    ``slow_ranks`` (the straggler)."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from dist_egnn.config import register
    from dist_egnn.parallel import runtime
    from dist_egnn.parallel.collectives import Injection
    from dist_egnn.training import setup
    from dist_egnn.training.trainer import train_step

    register()
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    env = runtime.DistEnv.from_environ()
    ready = setup.prepare(cfg, run_dir, env)
    rt, comm, engine = ready.runtime, ready.comm, ready.engine
    data = ready.data["train"]
    batch = data.build([0], cfg.trainer.seed, 1)
    engine.train()
    configured_overlap = comm.overlap if hasattr(comm, "overlap") else False
    rows = []
    for repeat in range(repeats):
        for setting in settings:
            slow = env.rank in setting.get("slow_ranks", [])
            comm.injection = Injection(latency_s=setting.get("latency_ms", 0.0) / 1e3,
                                       slowdown=setting.get("slowdown", 1.0) if slow else 1.0)
            comm.overlap = bool(setting.get("overlap", configured_overlap))
            for step in range(steps + 1):
                dist.barrier()
                comm.stats.reset()
                comm.exposed_latency_s = 0.0
                started, cpu = time.perf_counter(), time.process_time()
                train_step(engine, comm, batch, cfg, rt.device, rt.dtype, cfg.distributed.parts)
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                stats = comm.stats.reset()
                if step:                                                  # the first step of a setting warms up
                    rows.append(dict(label=setting["label"], repeat=repeat, step=step, rank=env.rank, wall_s=wall,
                                     cpu_s=cpu, comm_s=stats.seconds, calls=stats.calls,
                                     exposed_s=comm.exposed_latency_s,
                                     owned=int(batch.graph.pos.shape[0]), edges=int(batch.num_edges)))
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, rows)
    if env.rank == 0:
        out.write_text(json.dumps([row for rank_rows in gathered for row in rank_rows]))
    ready.lock.release()
    runtime.shutdown()


def run_worker(parts: int, overrides: list[str], settings: list[dict[str, Any]], steps: int, repeats: int,
               work: Path) -> list[dict[str, Any]]:
    """:func:`worker` on ``parts`` real ranks (torchrun, one thread each); every rank's rows."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "rows.json"
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={parts}", "-m", "dist_egnn.measure.latency",
           "worker", "--out", str(out), "--run-dir", str(work / "run"), "--settings", json.dumps(settings),
           "--steps", str(steps), "--repeats", str(repeats), "--", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per label: the fastest step (the slowest rank's wall time; other jobs on the machine only ever add time),
    the median and slowest too, and rank 0's median calls, time in collectives and CPU time per step."""
    by_step: dict[tuple, list[dict]] = {}
    for row in rows:
        by_step.setdefault((row["label"], row["repeat"], row["step"]), []).append(row)
    out: dict[str, dict[str, list[float]]] = {}
    for (label, _, _), ranks in by_step.items():
        slot = out.setdefault(label, {"step": [], "calls": [], "comm": [], "cpu_max": [], "cpu_min": [],
                                      "exposed": []})
        slot["step"].append(max(r["wall_s"] for r in ranks))
        first = min(ranks, key=lambda r: r["rank"])
        slot["calls"].append(first["calls"])
        slot["comm"].append(first["comm_s"])
        slot["exposed"].append(max(r.get("exposed_s", 0.0) for r in ranks))
        slot["cpu_max"].append(max(r["cpu_s"] for r in ranks))
        slot["cpu_min"].append(min(r["cpu_s"] for r in ranks))
    return {label: dict(step_time_s=min(v["step"]), step_median_s=statistics.median(v["step"]),
                        step_max_s=max(v["step"]), steps=len(v["step"]), calls=statistics.median(v["calls"]),
                        comm_s=statistics.median(v["comm"]), exposed_s=statistics.median(v["exposed"]),
                        cpu_max_s=statistics.median(v["cpu_max"]),
                        cpu_min_s=statistics.median(v["cpu_min"]))
            for label, v in out.items()}


# ------------------------------------------------------------------------------------------ the study
COLUMNS = ["parts", "halo", "overlap", "latency_ms", "step_time_s", "step_median_s", "step_max_s", "added_s",
           "vs_zero", "vs_blocking_zero", "calls", "predicted_s", "exposed_s", "comm_s", "cpu_max_s", "steps"]


def study(parts_list: list[int], halos: list[str], overlaps: list[bool], latencies: list[float], steps: int,
          repeats: int, overrides: list[str], work: Path) -> list[dict[str, Any]]:
    """One launch per P and halo mode; in it every (overlap, latency) setting, interleaved. Per row: added over
    the same overlap's first latency (``vs_zero``: the ratio), and the ratio to the blocking run at that latency
    (``vs_blocking_zero``) when the blocking one was measured."""
    rows = []
    for parts in parts_list:
        for halo in halos:
            settings = [dict(label=f"{overlap}-{latency:g}", latency_ms=latency, overlap=overlap)
                        for overlap in overlaps for latency in latencies]
            measured = summarize(run_worker(parts, [*overrides, f"distributed.parts={parts}",
                                                    f"distributed.halo={halo}"], settings, steps, repeats,
                                            work / f"p{parts}-{halo}"))
            blocking = measured.get(f"False-{latencies[0]:g}")
            for overlap in overlaps:
                base = measured[f"{overlap}-{latencies[0]:g}"]
                for latency in latencies:
                    m = measured[f"{overlap}-{latency:g}"]
                    rows.append(dict(parts=parts, halo=halo, overlap=overlap, latency_ms=latency, **m,
                                     added_s=m["step_time_s"] - base["step_time_s"],
                                     vs_zero=m["step_time_s"] / base["step_time_s"],
                                     vs_blocking_zero=(m["step_time_s"] / blocking["step_time_s"] if blocking
                                                       else float("nan")),
                                     predicted_s=base["step_time_s"] + m["calls"] * latency / 1e3))
            print(json.dumps(rows[-len(latencies) * len(overlaps):]), flush=True)
    return rows


def write(rows: list[dict[str, Any]], out: Path, command: str, notes: str) -> None:
    write_csv(rows, COLUMNS, out.with_suffix(".csv"))
    lines = ["# Step time under injected network latency", "", f"Made by `{command}`.", "", notes, "",
             "| P | halo | overlap | latency (ms) | step time (s) | median, slowest (s) | added (s) | × 0 ms | "
             "× 0 ms blocking | collectives per step | predicted, blocking (s) | latency waited for (s) | "
             "in collectives (s) | CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['parts']} | {r['halo']} | {'on' if r['overlap'] else 'off'} | {r['latency_ms']:g} | "
                     f"{r['step_time_s']:.3f} | {r['step_median_s']:.3f}, {r['step_max_s']:.3f} | "
                     f"{r['added_s']:+.3f} | {r['vs_zero']:.2f} | {r['vs_blocking_zero']:.2f} | {r['calls']:.0f} | "
                     f"{r['predicted_s']:.3f} | {r['exposed_s']:.3f} | {r['comm_s']:.3f} | {r['cpu_max_s']:.3f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    halos = [h for h in ("exact", "none") if any(r["halo"] == h for r in rows)]
    fig, axes = plt.subplots(2, len(halos), figsize=(6.0 * len(halos), 8.0), squeeze=False)
    for column, halo in enumerate(halos):
        top, bottom = axes[0][column], axes[1][column]
        for k, parts in enumerate(sorted({r["parts"] for r in rows})):
            color = f"C{k}"
            for overlap, marker, style in ((False, "o", "-"), (True, "s", "--")):
                sel = [r for r in rows if r["parts"] == parts and r["halo"] == halo and r["overlap"] == overlap]
                if not sel:
                    continue
                label = f"P = {parts}, overlap {'on' if overlap else 'off'}"
                latency = [r["latency_ms"] for r in sel]
                top.plot(latency, [r["step_time_s"] for r in sel], style, marker=marker, color=color, label=label)
                bottom.plot(latency, [r["exposed_s"] for r in sel], style, marker=marker, color=color, label=label)
                if not overlap:
                    top.plot(latency, [r["predicted_s"] for r in sel], ":", color=color,
                             label=f"P = {parts}: T(0) + calls × latency")
        top.set_title(f"halo {halo}: step time vs injected latency (real ranks, CPU)", fontsize=9)
        top.set_ylabel("step time (s, slowest rank, fastest step)")
        bottom.set_title(f"halo {halo}: injected latency no work hid, per step", fontsize=9)
        bottom.set_ylabel("latency waited for (s per step, median)")
        for ax in (top, bottom):
            ax.set_xlabel("injected latency per collective (ms)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def uptime() -> str:
    """``uptime``'s line (the load averages), or the load averages alone where the command is missing."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("worker")
        for name in ("--out", "--run-dir", "--settings"):
            parser.add_argument(name, required=True)
        parser.add_argument("--steps", type=int, required=True)
        parser.add_argument("--repeats", type=int, required=True)
        split = argv.index("--")
        args = parser.parse_args(argv[:split])
        worker(Path(args.out), Path(args.run_dir), json.loads(args.settings), args.steps, args.repeats,
               argv[split + 1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--halo", nargs="+", default=["exact", "none"])
    parser.add_argument("--overlap", nargs="+", choices=["false", "true"], default=["false", "true"],
                        help="distributed.overlap settings, interleaved in each launch")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=list(LATENCIES_MS))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--nodes", type=int, default=NODES, help="particles of the synthetic graph")
    parser.add_argument("--data", default=str(ROOT / "data"), help="paths.data")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "latency"))
    parser.add_argument("--overwrite", action="store_true", help="replace --out even if it holds other settings")
    parser.add_argument("overrides", nargs="*", help="more launch/train.py overrides")
    args = parser.parse_args(argv)
    problem = None if args.overwrite else shrink_problem(
        Path(args.out).with_suffix(".csv"),
        lambda row: (int(row["parts"]), row["halo"], row["overlap"] == "True", float(row["latency_ms"])),
        set(itertools.product(args.parts, args.halo, [o == "true" for o in args.overlap], args.latency_ms)),
        "--out PATH", "--overwrite")
    if problem:
        parser.error(problem)
    overrides = [*graph(args.nodes), *COMMON, f"paths.data={args.data}", *args.overrides]
    started = time.strftime("%Y-%m-%d %H:%M")
    uptime_before = uptime()
    with tempfile.TemporaryDirectory(prefix="latency-") as work:
        rows = study(args.parts, args.halo, [o == "true" for o in args.overlap], args.latency_ms, args.steps,
                     args.repeats, overrides, Path(work))
    notes = (f"{started}, this machine ({os.cpu_count()} cores; other jobs shared them: `uptime` before: "
             f"{uptime_before}; after: {uptime()}), one thread per rank (P = 4: four ranks on two cores), "
             f"{args.steps} timed steps × {args.repeats} repeats per setting, overlap off/on and latencies "
             f"interleaved in one launch per P and halo mode. Graph: {' '.join(graph(args.nodes)[1:])}, one graph "
             f"per step, FastEGNN defaults. "
             f"Step time: the fastest step's wall time on the slowest rank (other jobs only ever add time; the "
             f"median and slowest step beside it). Added and × 0 ms: over the same overlap setting's 0 ms row; × 0 ms "
             f"blocking: over the overlap-off 0 ms row. Predicted: T(0) + collectives per step × latency, all of it "
             f"on the critical path (issue, then wait at once). Latency waited for: the injected latency the slowest "
             f"rank slept through per step, what no work hid (median). CPU: the busiest rank's CPU time per step "
             f"(median). DDP's gradient all-reduce is not delayed (the injection is GraphParallel's).")
    write(rows, Path(args.out), "python -m dist_egnn.measure.latency " + " ".join(argv), notes)
    print(Path(args.out).with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
