"""Scaling study: step time and memory per rank of DistEGNN training for a list of P, both halo modes.

    python launch/scaling.py                                   # synthetic113k, P = 1, 2, 4, 8, METIS
    python launch/scaling.py data=fluid_small parts=[1,2,4] halo=[exact] partition=spatial

For every P and halo mode it reports two kinds of figures, and says which is which:

* ``real``: the real distributed training (``torchrun --nproc-per-node P launch/train.py engine=ddp ...``,
  a few steps), for P up to ``real_max_ranks`` (the machine's cores): these ran in parallel. P = 1 also
  runs with every core (``python launch/train.py``), the baseline a user would compare with.
* ``projected``: each part's step timed alone in turn with one thread (CPU time), the slowest taken, the
  measured communication cost added (``dist_egnn.measure.scaling``): what P ranks with a core each would take.

The projection at P = 2 is compared with the real 2-rank run. Speedups are always given with edges per
rank and the dropped-edge fraction beside them: a random split gives each rank ~E/P² edge work in drop
mode, which would inflate a speedup (docs/maths.md §5).

A large graph (``large_nodes``, e.g. ``data=synthetic1m``: a million nodes) changes the defaults left
unset: one timed step without warm-up, only the part with the most edges timed (every part's edges counted:
the slowest part is the one with the most edges when parts have equal node counts), real runs in exact mode
only. Then (``costs``) the study also times partitioning and reading one rank's sample, and projects the step
to ``target_nodes`` over ``target_ranks`` (``dist_egnn.measure.scaling_costs``, which states the model).

Writes ``<results_dir>/<name>.csv``, ``.md`` (the table) and ``.png`` (speedup and memory per rank vs P), and
with ``costs`` ``<name>-costs.csv`` (partitioning and loading). One table is one measurement: a table at that name
holding a P or halo mode this one will not measure is not replaced (exit 2 before any work) unless
``overwrite=true``; another ``name=`` writes beside it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dist_egnn.config import ScalingConfig, register, to_container  # noqa: F401  (ScalingConfig: the schema)
from dist_egnn.errors import ConfigError
from dist_egnn.measure.reporting import shrink_problem, write_csv
from dist_egnn.measure.scaling import count_parts, in_fresh_process, measure_links, measure_part, project
from dist_egnn.measure.scaling_costs import measure_load, measure_partition, project_larger
from dist_egnn.partitioners.artifacts import prepare_partitions
from dist_egnn.training.setup import load_splits, open_dataset_store

ROOT = Path(__file__).resolve().parents[2]         # the repository: launch/ is there
BIN = Path(sys.executable).parent


def train_overrides(cfg, parts: int, halo: str, steps: int = 4) -> list[str]:
    return [f"dataset={cfg.data}", f"distributed.parts={parts}", f"distributed.halo={halo}",
            f"distributed.partition={cfg.partition}", "trainer.batch_size=1", "trainer.eval_batch_size=1",
            "trainer.max_epochs=1", f"trainer.steps_per_epoch={steps + 1}", "trainer.progress=false",
            *cfg.overrides]


def training_config(cfg, parts: int, halo: str) -> dict[str, Any]:
    """The resolved launch/train.py configuration of one setting (inside ``main``'s Hydra context)."""
    return to_container(compose(config_name="config", overrides=train_overrides(cfg, parts, halo)))


def prepare(cfg, parts: int) -> dict[str, float]:
    """The dataset store and, for P > 1, its stored partition (reused when up to date); the largest graph's
    node count and the seconds each took (0 when reused)."""
    train_cfg = OmegaConf.create(training_config(cfg, parts, "exact"))
    started = time.perf_counter()
    info = open_dataset_store(train_cfg.dataset, progress=cfg.progress)
    store_s = time.perf_counter() - started
    splits = load_splits(train_cfg, info)
    started = time.perf_counter()
    if parts > 1:
        d = train_cfg.distributed
        prepare_partitions(splits, d.partition, parts, d.seed, progress=cfg.progress)
    nodes = max(int(np.diff(split.meta.scene_ptr).max()) for split in splits.values())
    return dict(nodes=nodes, store_s=store_s, partitions_s=time.perf_counter() - started)


def settings_of(cfg, nodes: int) -> dict[str, Any]:
    """The study's settings with the unset ones chosen by graph size (module docstring)."""
    if cfg.project_parts not in (None, "all", "largest"):
        raise ConfigError(f"project_parts={cfg.project_parts!r}: choose all (every part timed) or largest")
    large = nodes >= cfg.large_nodes
    real_halo = ["exact"] if large else list(cfg.halo)
    return dict(nodes=nodes, large=large,
                steps=cfg.steps if cfg.steps is not None else (1 if large else 4),
                warmup=cfg.warmup if cfg.warmup is not None else (0 if large else 1),
                project_parts=cfg.project_parts or ("largest" if large else "all"),
                real_halo=list(cfg.real_halo) if cfg.real_halo is not None else real_halo)


def real_run(cfg, parts: int, halo: str, out: Path, steps: int) -> dict[str, Any]:
    """A real training run with ``parts`` ranks; returns its first metrics.jsonl line."""
    run_dir = out / f"real-p{parts}-{halo}"
    if parts == 1:
        launcher = [sys.executable]
    else:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={parts}"]
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), *train_overrides(cfg, parts, halo, steps),
           f"hydra.run.dir={run_dir}", *(["engine=ddp"] if parts > 1 else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"real run P={parts} halo={halo} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def projected(cfg, parts: int, halo: str, links: dict[str, float], settings: dict[str, Any], bar) -> dict[str, Any]:
    """Every part timed alone (or only the part with the most edges, every part counted) and projected."""
    container = training_config(cfg, parts, halo)
    exact, steps, warmup = halo == "exact", settings["steps"], settings["warmup"]
    if parts == 1 or settings["project_parts"] == "all":
        results = []
        for part in range(parts):
            results.append(in_fresh_process(measure_part, container, part, parts, exact, steps, warmup))
            bar.update(1)
        row = project(results, links)
        row["timed_parts"] = "all"
        edges = [r["edges"] for r in results]
    else:
        counts = in_fresh_process(count_parts, container, parts, exact)
        largest = max(counts, key=lambda c: (c["edges"], c["halo_rows"]))["part"]
        results = [in_fresh_process(measure_part, container, largest, parts, exact, steps, warmup)]
        bar.update(1)
        row = project(results, links)
        edges = [c["edges"] for c in counts]
        row.update(edges_total=sum(edges), edges_per_rank=max(edges),
                   owned_per_rank=max(c["owned"] for c in counts),
                   halo_rows_per_rank=max(c["halo_rows"] for c in counts), timed_parts=f"{largest} (most edges)")
    row["edge_imbalance"] = max(edges) / (sum(edges) / parts)
    row["dropped_edge_fraction"] = 1.0 - row["edges_total"] / max(row["full_edges"], 1)
    row["slowest_part"] = max(results, key=lambda r: r["step_time_s"])      # its collectives (10M projection)
    return row


def rows_of(cfg, out: Path) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float]]:
    parts_list = sorted(set(cfg.parts))
    runs = [(p, h) for p in parts_list for h in (["exact"] if p == 1 else cfg.halo)]
    prepared = {p: prepare(cfg, p) for p in parts_list}
    settings = settings_of(cfg, max(v["nodes"] for v in prepared.values()))
    settings["prepare_s"] = {p: v["partitions_s"] for p, v in prepared.items()}
    links = measure_links(repeats=cfg.link_repeats)
    (out / "links.json").write_text(json.dumps(links, indent=1))
    # a large graph's real one-rank run would hold the whole graph with every core: left out (memory)
    real_runs = [(p, h) for p, h in runs if p <= cfg.real_max_ranks and (p == 1 or h in settings["real_halo"])
                 and not (p == 1 and settings["large"])]
    timed = sum(p if p == 1 or settings["project_parts"] == "all" else 1 for p, _ in runs)
    bar = tqdm(total=timed + len(real_runs), desc="scaling", unit="run", disable=not cfg.progress)
    rows = []
    for parts, halo in runs:
        rows.append(dict(kind="projected", halo=halo if parts > 1 else "-",
                         **projected(cfg, parts, halo, links, settings, bar)))
        if (parts, halo) in real_runs:
            real = real_run(cfg, parts, halo, out, settings["steps"])
            rows.append(dict(kind="real", halo=halo if parts > 1 else "-", parts=parts,
                             step_time_s=real["step_time_s"], comm_s=real.get("comm_time_s", 0.0),
                             edges_per_rank=real["edges_per_rank"], dropped_edge_fraction=real["dropped_edge_fraction"],
                             peak_mem_mb=real["peak_mem_mb"], threads_per_rank=max(1, cfg.real_max_ranks // parts)))
            bar.update(1)
    bar.close()
    base = {r["kind"]: r["step_time_s"] for r in rows if r["parts"] == 1}     # real_max_ranks=0: projections only
    for r in rows:
        if r["kind"] in base:
            r["speedup"] = base[r["kind"]] / r["step_time_s"]
            r["efficiency"] = r["speedup"] / r["parts"]
    return rows, settings, links


def costs_of(cfg, rows: list[dict[str, Any]], settings: dict[str, Any], links: dict[str, float]) -> dict[str, Any]:
    """Partitioning and loading at this size, and the projection to ``target_nodes`` over ``target_ranks``."""
    parts_list = sorted(set(cfg.parts))
    partitions = [in_fresh_process(measure_partition, training_config(cfg, p, "exact"), p)
                  for p in parts_list if p > 1]
    loads = [in_fresh_process(measure_load, training_config(cfg, p, "exact"), p, True) for p in parts_list]
    exact = sorted((r for r in rows if r["kind"] == "projected" and r["halo"] in ("exact", "-")),
                   key=lambda r: r["parts"])
    larger = []
    if exact[-1]["parts"] > 1:
        node_link = {f"{op}_{key}": value for op in ("allreduce", "alltoall")
                     for key, value in (("alpha_s", cfg.node_link_latency_s),
                                        ("beta_bytes_per_s", cfg.node_link_bandwidth))}
        node_name = f"{cfg.node_link_bandwidth * 8 / 1e9:g} Gb/s, {cfg.node_link_latency_s * 1e6:g} us"
        for name, link in (("this machine (loopback gloo)", links), (node_name, node_link)):
            larger.append(project_larger(exact[-1], exact[-1]["slowest_part"], exact, settings["nodes"],
                                         cfg.target_nodes, cfg.target_ranks, link, name))
    return dict(partitions=partitions, loads=loads, larger=larger)


COLUMNS = ["kind", "parts", "halo", "step_time_s", "speedup", "efficiency", "comm_s", "edges_per_rank",
           "dropped_edge_fraction", "peak_mem_mb", "added_mem_mb", "owned_per_rank", "halo_rows_per_rank",
           "threads_per_rank", "train_bytes_per_edge", "edge_imbalance", "timed_parts", "link"]
PARTITION_COLUMNS = ["parts", "method", "nodes", "edges", "graph_s", "partition_s", "total_s", "cut_fraction",
                     "max_halo_rows", "added_mem_mb", "peak_mem_mb"]
LOAD_COLUMNS = ["parts", "halo", "owned", "halo_rows", "edges", "read_s", "build_s", "read_peak_mb", "result_mb",
                "read_added_mb",
                "build_added_mb", "peak_mem_mb", "chunks_touched", "frame_chunks", "chunk_nodes", "sample_mb",
                "store_mb"]
FORMATS = {"step_time_s": "{:.3f}", "speedup": "{:.2f}", "efficiency": "{:.0%}", "comm_s": "{:.3f}",
           "edges_per_rank": "{:,.0f}", "dropped_edge_fraction": "{:.1%}", "peak_mem_mb": "{:,.0f}",
           "added_mem_mb": "{:,.0f}", "owned_per_rank": "{:,.0f}", "halo_rows_per_rank": "{:,.0f}",
           "train_bytes_per_edge": "{:,.0f}", "edge_imbalance": "{:.3f}", "nodes": "{:,}", "edges": "{:,.0f}",
           "graph_s": "{:.1f}", "partition_s": "{:.1f}", "total_s": "{:.1f}", "cut_fraction": "{:.2%}",
           "max_halo_rows": "{:,}", "owned": "{:,}", "halo_rows": "{:,}", "read_s": "{:.2f}", "build_s": "{:.2f}",
           "read_added_mb": "{:,.0f}", "read_peak_mb": "{:,.1f}", "result_mb": "{:,.1f}",
           "build_added_mb": "{:,.0f}", "sample_mb": "{:,.0f}", "store_mb": "{:,.0f}"}


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [FORMATS.get(c, "{}").format(r[c]) if r.get(c) is not None else "" for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header(cfg, argv: list[str], settings: dict[str, Any]) -> list[str]:
    """Command, date, machine and load, and the settings chosen for this graph size."""
    import os
    import platform

    import psutil

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    command = " ".join(["python launch/scaling.py", *argv])
    chosen = ", ".join(f"{k}={settings[k]}" for k in ("steps", "warmup", "project_parts", "real_halo"))
    return [f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}); machine: "
            f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB; `uptime` at the end: {uptime}.", "",
            f"Graph: {settings['nodes']:,} nodes (largest sample); settings: {chosen}"
            f"{' (a large graph: see dist_egnn/measure/scaling_study.py)' if settings['large'] else ''}.", ""]


def write_table(rows: list[dict[str, Any]], cfg, path: Path, argv: list[str] | None = None,
                settings: dict[str, Any] | None = None, costs: dict[str, Any] | None = None) -> None:
    columns = [c for c in COLUMNS[:-1] if any(r.get(c) is not None for r in rows)]
    lines = [f"# Scaling: {cfg.data}, {cfg.partition} partitions", ""]
    if settings is not None:
        lines += header(cfg, argv or [], settings)
    lines += ["`real`: ran in parallel here (P ranks sharing this machine's cores; wall time, so it includes "
              "whatever else ran on the machine); `projected`: each part's step alone with one thread (its "
              "CPU time), slowest part + modelled communication (dist_egnn/measure/scaling.py). Speedup is against "
              "P = 1 of the same kind. `train_bytes_per_edge`: the training step's own peak memory (over the "
              "resident set with the batch built) per edge of the rank.", "", *markdown(rows, columns)]
    check = [r for r in rows if r["parts"] == 2]
    for halo in cfg.halo:
        pair = {r["kind"]: r for r in check if r["halo"] == halo}
        if len(pair) == 2:
            lines += ["", f"Check, P = 2, halo {halo}: projected {pair['projected']['step_time_s']:.3f} s vs real "
                          f"{pair['real']['step_time_s']:.3f} s per step "
                          f"(ratio {pair['projected']['step_time_s'] / pair['real']['step_time_s']:.2f})."]
    if costs:
        lines += costs_text(cfg, rows, settings, costs)
    path.write_text("\n".join(lines) + "\n")


def costs_text(cfg, rows: list[dict[str, Any]], settings: dict[str, Any], costs: dict[str, Any]) -> list[str]:
    import psutil

    lines = ["", "## Partitioning (first training sample, fresh process per P)", "",
             "`graph_s`: the radius graph; `partition_s`: the partitioner on it; the stored partitions of every "
             "sample took " + ", ".join(f"P = {p}: {s:.0f} s" for p, s in settings["prepare_s"].items() if p > 1)
             + " (0: reused).", "", *markdown(costs["partitions"], PARTITION_COLUMNS),
             "", "## Reading one rank's sample (rank 0, exact halo; fresh process per P)", "",
             "`read_s`: the zarr/dask read of its owned and halo rows; `read_peak_mb`: the most memory that read "
             "held at once (tracemalloc: arrays and decompressed chunks), `result_mb`: what it returns, "
             "`read_added_mb`: the growth of the resident set (also the thread pools and codecs a first read sets "
             "up); `build_*`: read + radius graph + features, as training does; "
             "`store_mb`: the whole store uncompressed, `sample_mb`: one whole sample as read.", "",
             *markdown(costs["loads"], LOAD_COLUMNS)]
    big = max(costs["loads"], key=lambda r: r["parts"])
    lines += ["", f"The read is bounded by chunks: rank 0 of P = {big['parts']} held at most "
                  f"{big['read_peak_mb']:.1f} MB "
                  f"reading {big['owned'] + big['halo_rows']:,} rows ({big['result_mb']:.1f} MB) from "
                  f"{big['chunks_touched']} of the frame's {big['frame_chunks']} chunks ({big['chunk_nodes']:,} nodes "
                  f"each), against {big['sample_mb']:.0f} MB for a whole sample and {big['store_mb']:.0f} MB for "
                  "the store."]
    exact = [r for r in rows if r["kind"] == "projected" and r["halo"] in ("exact", "-")]
    per_edge = max(r["train_bytes_per_edge"] for r in exact)
    lines += ["", f"Training memory: at most {per_edge:,.0f} bytes per edge of a rank (`train_bytes_per_edge`, exact "
                  "rows), the step's own peak over the resident set with its batch built."]
    if costs["larger"]:
        first = costs["larger"][0]
        lines += ["", f"## Projection: {cfg.target_nodes:,} nodes over {cfg.target_ranks} ranks (exact halo, "
                      f"{cfg.partition})", "",
                  "Model (dist_egnn/measure/scaling_costs.py): the measured CPU time per edge of the largest P's "
                  f"slowest part ({first['per_edge_us']:.2f} us per edge, one thread) times the edges per rank at "
                  f"this graph's density and measured edge imbalance ({first['imbalance']:.3f}); halo rows and bytes "
                  f"from the measured ones scaled by surface/volume, (nodes per rank / measured nodes per rank)^(2/3) "
                  f"= {first['surface_factor']:.2f}; the study's communication model (all-reduce ⌈log2 R⌉(α + b/β), "
                  "halo all-to-all (R − 1)α + b/β, forward and backward) with the link named; memory per rank from a "
                  f"straight line through the measured exact rows: {first['mem_intercept_mb']:,.0f} MB + "
                  f"{first['bytes_per_edge_fit']:,.0f} B per edge of the rank. One rank: per-edge cost × all edges "
                  f"({first['one_rank_s']:,.0f} s per step, {first['one_rank_mem_gb']:,.0f} GB).", "",
                  *markdown(costs["larger"], ["kind", "link", "parts", "step_time_s", "comm_s", "speedup",
                                              "efficiency", "edges_per_rank", "owned_per_rank",
                                              "halo_rows_per_rank", "peak_mem_mb"])]
        fit_intercept, fit_slope = first["mem_intercept_mb"], first["bytes_per_edge_fit"]
        total_mb = psutil.virtual_memory().total / 2**20
        degree = first["edges_per_rank"] / first["imbalance"] / first["owned_per_rank"]
        edges_here = (0.8 * total_mb - fit_intercept) * 2**20 / fit_slope
        lines += ["", f"What fits (from the fit, 80 % of memory usable, {degree:.1f} edges per node): one rank of this "
                      f"machine's {total_mb / 1024:.0f} GiB trains about {edges_here / 1e6:.0f}M edges "
                      f"({edges_here / degree / 1e6:.1f}M nodes); P ranks with that memory each about P times as "
                      f"many, less the halo ({first['halo_rows_per_rank'] / first['owned_per_rank']:.1%} extra rows "
                      f"per rank at {cfg.target_ranks} ranks)."]
    return lines


def plot(rows: list[dict[str, Any]], cfg, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    parts = sorted({r["parts"] for r in rows})
    ax_speed.plot(parts, parts, "k:", label="ideal")
    for halo in cfg.halo:
        for kind, style in (("projected", "-o"), ("real", "s")):
            sel = sorted((r for r in rows if r["kind"] == kind and (r["halo"] == halo or r["parts"] == 1)),
                         key=lambda r: r["parts"])
            if len(sel) < 2:
                continue
            ax_speed.plot([r["parts"] for r in sel], [r["speedup"] for r in sel], style, label=f"{kind}, halo {halo}")
            ax_mem.plot([r["parts"] for r in sel], [r["peak_mem_mb"] for r in sel], style, label=f"{kind}, halo {halo}")
            if kind == "projected":
                for r in sel:
                    ax_speed.annotate(f"{r['edges_per_rank'] / 1e3:.0f}K e/rank\n{r['dropped_edge_fraction']:.0%} drop",
                                      (r["parts"], r["speedup"]), fontsize=6, textcoords="offset points",
                                      xytext=(4, -14 if halo == "none" else 4))
    for ax, label in ((ax_speed, "speedup vs P = 1"), (ax_mem, "peak memory per rank (MB, RSS)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(parts, [str(p) for p in parts])
        ax.set_xlabel("ranks P")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"DistEGNN scaling: {cfg.data}, {cfg.partition}")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def measured_setting(row: dict[str, str]) -> tuple[int, str] | None:
    """What a row of an earlier table measured (P and halo mode), or None for a row projected from them."""
    return (int(row["parts"]), row["halo"]) if row["kind"] in ("real", "projected") else None


def run(argv: list[str]) -> None:
    """The whole study for the ``launch/scaling.py`` command line ``argv`` (Hydra overrides)."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        cfg = compose(config_name="scaling", overrides=argv)
        out = Path(cfg.results_dir)
        problem = None if cfg.overwrite else shrink_problem(
            out / f"{cfg.name}.csv", measured_setting, {(p, h if p > 1 else "-") for p in cfg.parts for h in cfg.halo},
            "name=NEW", "overwrite=true")
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            raise SystemExit(2)
        out.mkdir(parents=True, exist_ok=True)
        work = Path(cfg.work_dir) / time.strftime("%Y-%m-%d_%H-%M-%S")
        work.mkdir(parents=True)
        rows, settings, links = rows_of(cfg, work)
        costs = costs_of(cfg, rows, settings, links) if cfg.costs else None
    write_csv(rows + (costs["larger"] if costs else []), COLUMNS, out / f"{cfg.name}.csv")
    if costs:
        write_csv([dict(r, table="partition") for r in costs["partitions"]]
                  + [dict(r, table="load") for r in costs["loads"]],
                  ["table", *dict.fromkeys(PARTITION_COLUMNS + LOAD_COLUMNS)], out / f"{cfg.name}-costs.csv")
    write_table(rows, cfg, out / f"{cfg.name}.md", argv, settings, costs)
    plot(rows, cfg, out / f"{cfg.name}.png")
    print((out / f"{cfg.name}.md").read_text())
    print(f"wrote {out / cfg.name}.{{csv,md,png}}{' and -costs.csv' if costs else ''}; runs in {work}")
