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

Writes ``<results_dir>/<name>.csv``, ``.md`` (the table) and ``.png`` (speedup and memory per rank vs P).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from dist_egnn.config import ScalingConfig, register, to_container  # noqa: F401  (ScalingConfig: the schema)
from dist_egnn.measure.reporting import write_csv
from dist_egnn.measure.scaling import in_fresh_process, measure_links, measure_part, project
from dist_egnn.partitioners.artifacts import prepare_partitions
from dist_egnn.training.setup import load_splits, open_dataset_store

ROOT = Path(__file__).resolve().parents[2]         # the repository: launch/ is there
BIN = Path(sys.executable).parent


def train_overrides(cfg, parts: int, halo: str) -> list[str]:
    return [f"dataset={cfg.data}", f"distributed.parts={parts}", f"distributed.halo={halo}",
            f"distributed.partition={cfg.partition}", "trainer.batch_size=1", "trainer.eval_batch_size=1",
            "trainer.max_epochs=1", f"trainer.steps_per_epoch={cfg.steps + 1}", "trainer.progress=false",
            *cfg.overrides]


def training_config(cfg, parts: int, halo: str) -> dict[str, Any]:
    """The resolved launch/train.py configuration of one setting (inside ``main``'s Hydra context)."""
    return to_container(compose(config_name="config", overrides=train_overrides(cfg, parts, halo)))


def prepare(cfg, parts: int) -> None:
    """The dataset store and, for P > 1, its stored partition (reused when up to date)."""
    train_cfg = OmegaConf.create(training_config(cfg, parts, "exact"))
    info = open_dataset_store(train_cfg.dataset, progress=cfg.progress)
    if parts > 1:
        d = train_cfg.distributed
        prepare_partitions(load_splits(train_cfg, info), d.partition, parts, d.seed, progress=cfg.progress)


def real_run(cfg, parts: int, halo: str, out: Path) -> dict[str, Any]:
    """A real training run with ``parts`` ranks; returns its first metrics.jsonl line."""
    run_dir = out / f"real-p{parts}-{halo}"
    if parts == 1:
        launcher = [sys.executable]
    else:
        launcher = [str(BIN / "torchrun"), "--standalone", f"--nproc-per-node={parts}"]
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), *train_overrides(cfg, parts, halo),
           f"hydra.run.dir={run_dir}", *(["engine=ddp"] if parts > 1 else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"real run P={parts} halo={halo} failed:\n{proc.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])


def projected(cfg, parts: int, halo: str, links: dict[str, float], bar) -> dict[str, Any]:
    container = training_config(cfg, parts, halo)
    results = []
    for part in range(parts):
        results.append(in_fresh_process(measure_part, container, part, parts, halo == "exact", cfg.steps))
        bar.update(1)
    row = project(results, links)
    row["dropped_edge_fraction"] = 1.0 - row["edges_total"] / max(row["full_edges"], 1)
    return row


def rows_of(cfg, out: Path) -> list[dict[str, Any]]:
    parts_list = sorted(set(cfg.parts))
    settings = [(p, h) for p in parts_list for h in (["exact"] if p == 1 else cfg.halo)]
    for p in parts_list:
        prepare(cfg, p)
    links = measure_links(repeats=cfg.link_repeats)
    (out / "links.json").write_text(json.dumps(links, indent=1))
    total = sum(p for p, _ in settings) + sum(1 for p, _ in settings if p <= cfg.real_max_ranks)
    bar = tqdm(total=total, desc="scaling", unit="run", disable=not cfg.progress)
    rows = []
    for parts, halo in settings:
        rows.append(dict(kind="projected", halo=halo if parts > 1 else "-", **projected(cfg, parts, halo, links, bar)))
        if parts <= cfg.real_max_ranks:
            real = real_run(cfg, parts, halo, out)
            rows.append(dict(kind="real", halo=halo if parts > 1 else "-", parts=parts,
                             step_time_s=real["step_time_s"], comm_s=real.get("comm_time_s", 0.0),
                             edges_per_rank=real["edges_per_rank"], dropped_edge_fraction=real["dropped_edge_fraction"],
                             peak_mem_mb=real["peak_mem_mb"], threads_per_rank=max(1, cfg.real_max_ranks // parts)))
            bar.update(1)
    bar.close()
    base = {r["kind"]: r["step_time_s"] for r in rows if r["parts"] == 1}     # real_max_ranks=0: projections only
    for r in rows:
        r["speedup"] = base[r["kind"]] / r["step_time_s"]
        r["efficiency"] = r["speedup"] / r["parts"]
    return rows


COLUMNS = ["kind", "parts", "halo", "step_time_s", "speedup", "efficiency", "comm_s", "edges_per_rank",
           "dropped_edge_fraction", "peak_mem_mb", "added_mem_mb", "owned_per_rank", "halo_rows_per_rank",
           "threads_per_rank"]


def write_table(rows: list[dict[str, Any]], cfg, path: Path) -> None:
    fmt = {"step_time_s": "{:.3f}", "speedup": "{:.2f}", "efficiency": "{:.0%}", "comm_s": "{:.3f}",
           "edges_per_rank": "{:,.0f}", "dropped_edge_fraction": "{:.1%}", "peak_mem_mb": "{:,.0f}",
           "added_mem_mb": "{:,.0f}", "owned_per_rank": "{:,.0f}", "halo_rows_per_rank": "{:,.0f}"}
    lines = [f"# Scaling: {cfg.data}, {cfg.partition} partitions", "",
             "`real`: ran in parallel here (P ranks sharing this machine's cores; wall time, so it includes "
             "whatever else ran on the machine); `projected`: each part's step alone with one thread (its "
             "CPU time), slowest part + modelled communication (dist_egnn/measure/scaling.py). Speedup is against "
             "P = 1 of the same kind.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [fmt.get(c, "{}").format(r[c]) if r.get(c) is not None else "" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    check = [r for r in rows if r["parts"] == 2]
    for halo in cfg.halo:
        pair = {r["kind"]: r for r in check if r["halo"] == halo}
        if len(pair) == 2:
            lines += ["", f"Check, P = 2, halo {halo}: projected {pair['projected']['step_time_s']:.3f} s vs real "
                          f"{pair['real']['step_time_s']:.3f} s per step "
                          f"(ratio {pair['projected']['step_time_s'] / pair['real']['step_time_s']:.2f})."]
    path.write_text("\n".join(lines) + "\n")


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


def run(argv: list[str]) -> None:
    """The whole study for the ``launch/scaling.py`` command line ``argv`` (Hydra overrides)."""
    register()
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        cfg = compose(config_name="scaling", overrides=argv)
        out = Path(cfg.results_dir)
        out.mkdir(parents=True, exist_ok=True)
        work = Path(cfg.work_dir) / time.strftime("%Y-%m-%d_%H-%M-%S")
        work.mkdir(parents=True)
        rows = rows_of(cfg, work)
    write_csv(rows, COLUMNS, out / f"{cfg.name}.csv")
    write_table(rows, cfg, out / f"{cfg.name}.md")
    plot(rows, cfg, out / f"{cfg.name}.png")
    print((out / f"{cfg.name}.md").read_text())
    print(f"wrote {out / cfg.name}.{{csv,md,png}}; runs in {work}")
