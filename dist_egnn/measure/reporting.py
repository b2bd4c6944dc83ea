"""Results of many runs as files people read: JSON records, a Markdown table with seed spread, a PNG plot.

A record is one training run: a flat dict with at least ``study``, ``label``, ``seed`` and a metric such
as ``test_mse``. Runs that differ only by seed form a group; groups are summarised by mean ± sample
standard deviation over seeds, and compared with a baseline group by relative change of the mean.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np


def write_json(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write records as a JSON list, atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(list(records), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | os.PathLike) -> Path:
    """``rows`` as CSV with ``columns`` (other keys left out), the parent folder created; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def shrink_problem(path: str | os.PathLike, setting: Callable[[dict[str, str]], Hashable | None],
                   measured: set, rename: str, replace: str) -> str | None:
    """Why a measurement should not start (None: it may): the results table ``path`` (CSV) holds rows of settings
    it will not measure, so writing its results would replace them. ``setting`` maps a CSV row to what the
    measurement would reproduce (None: a row it does not compare); ``measured`` is the set of those it will
    produce; ``rename`` and ``replace`` name the switches that write elsewhere or replace the table anyway.
    Checked before any work: one measurement is one table (its ratios come from one run), so a smaller one goes
    under another name, not into the old one."""
    path = Path(path)
    if not path.exists():
        return None
    kept = set()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                kept.add(setting(row))
            except (KeyError, TypeError, ValueError):   # a table of an older layout: its rows cannot be compared
                kept.add("rows of an older table layout")
    kept.discard(None)
    lost = sorted(kept - measured, key=str)
    if not lost:
        return None
    return (f"{path} holds results this measurement would not repeat ({', '.join(map(str, lost))}): writing "
            f"there would replace them: write elsewhere ({rename}) or pass {replace} to replace them")


def summarise(records: Iterable[dict[str, Any]], metric: str = "test_mse",
              group_by: str = "label") -> list[dict[str, Any]]:
    """Per group (in first-seen order): n, mean, std (ddof=1; 0 for one seed), min and max of ``metric``, and
    ``by_seed`` (seed -> value) for records that carry a ``seed``."""
    groups: dict[str, list[float]] = {}
    seeds: dict[str, dict[Any, float]] = {}
    for record in records:
        if record.get(metric) is not None:
            groups.setdefault(record[group_by], []).append(float(record[metric]))
            if record.get("seed") is not None:
                seeds.setdefault(record[group_by], {})[record["seed"]] = float(record[metric])
    rows = []
    for name, values in groups.items():
        v = np.asarray(values)
        rows.append(dict(group=name, n=len(v), mean=float(v.mean()),
                         std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()), max=float(v.max()),
                         by_seed=seeds.get(name, {})))
    return rows


def change_vs(row: dict[str, Any], base: dict[str, Any]) -> float:
    """Relative change of ``row``'s mean vs ``base``'s over the seeds both have (both means over those seeds),
    so that a run trained on fewer seeds is not compared with a mean over others; all seeds when either lacks
    per-seed values."""
    shared = sorted(set(row.get("by_seed", {})) & set(base.get("by_seed", {})))
    if not shared:
        return relative_change(row["mean"], base["mean"])
    return relative_change(float(np.mean([row["by_seed"][s] for s in shared])),
                           float(np.mean([base["by_seed"][s] for s in shared])))


def relative_change(value: float, baseline: float) -> float:
    """(value − baseline) / baseline: −0.29 means 29% lower than the baseline."""
    return (value - baseline) / baseline if baseline else math.nan


def markdown_table(rows: Sequence[dict[str, Any]], metric: str = "test_mse", baseline: str | None = None,
                   extra_columns: dict[str, dict[str, Any]] | None = None) -> str:
    """A Markdown table of :func:`summarise` rows; ``extra_columns`` maps group -> {column: value}."""
    base = next((r for r in rows if r["group"] == baseline), None)
    extra_names = sorted({k for cols in (extra_columns or {}).values() for k in cols})
    header = ["run", *extra_names, f"{metric} mean ± std", "seeds", "min", "max"]
    if base is not None:
        header.append(f"vs {baseline} (same seeds)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cols = (extra_columns or {}).get(r["group"], {})
        cells = [r["group"], *(str(cols.get(k, "")) for k in extra_names),
                 f"{r['mean']:.4g} ± {r['std']:.2g}" if r["n"] > 1 else f"{r['mean']:.4g} (one seed)",
                 str(r["n"]), f"{r['min']:.4g}", f"{r['max']:.4g}"]
        if base is not None:
            cells.append(f"{100 * change_vs(r, base):+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_plot(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str, metric: str = "test_mse",
             log_scale: bool = False) -> Path:
    """Mean ± std per group as a bar chart (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(rows) + 2), 3.6))
    x = np.arange(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="tab:blue", alpha=0.8)
    ax.set_xticks(x, [r["group"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(title)
    return save_figure(fig, path)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write a matplotlib figure as a PNG (120 dpi) through a temporary sibling (never half-written); close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return path
