"""Accuracy studies: ``python launch/study.py study=NAME [study.budget=paper] [study.seeds=[0,1,2]] [train=false]``.

A study (``launch/conf/study/NAME.yaml``) is a list of labelled runs, each a set of ``launch/train.py``
overrides, trained once per seed on one dataset under one named budget. Every run is a separate process
(``python launch/train.py``, or ``deepspeed --num_gpus R launch/train.py`` for ``ranks: R``), so a study
trains exactly what a user would. Runs go seed by seed (every label's first seed, then the second...), and
finished runs are kept and skipped when the study is started again; an unfinished one resumes from its
newest checkpoint (``resume=auto``). A finished run whose recorded launch (``study_output.log``) asked for other
overrides than the study does now (its yaml, budget or common edited since) stops the study, naming the run and
what differs, rather than being tabulated under the new settings. ``wall_time_s`` is the time of the launch that
finished a run.
``jobs=J`` trains J runs at once (in the same order), each on ``cores // J`` threads unless its overrides set
``trainer.num_threads``: on a machine with more cores than one run uses, a study finishes J times sooner.
The records, and so the results files, keep the seed-major order whatever order the runs finish in, and hold
every finished run of the study's labels on disk, seeds outside ``study.seeds`` too: a study started again for one
more seed (``study.seeds=[2]``) adds it to the results instead of writing them again with that seed alone.
A run that fails stops the study (runs already going finish); with ``keep_going=true`` the others go on, the
failure is kept in the run's ``study_failed.txt`` and listed under the results table (a diverged run is a
result too), the study exits 1 at the end, and started again it retries the failed runs.

Writes, after every finished run:
    docs/results/<study>[-<budget>].json   one record per run: study, dataset, model, seed, test_mse, ...
    docs/results/<study>[-<budget>].md     mean ± std over seeds per run label, change vs the baseline
    docs/results/<study>[-<budget>].png    the same as a bar chart
    docs/results/<study>[-<budget>]-trivial.json   test MSE of zero motion and constant velocity (for scale)

A study with ``rollout_steps: K`` also rolls every finished run out K task steps on the test split
(``python launch/predict.py run=RUN_DIR steps=K``, as a user would; its own P parts and halo mode, the graph
and partition rebuilt every step) and adds the per-step MSE with constant velocity beside to the md, the
records and ``<study>[-<budget>]-rollout.png``; ``rollout_start: T`` starts every rollout at input frame T
(``start=T``) instead of the run's first input frame, e.g. from before the events a run was trained on. A run
whose rollout is missing, of another K or from another start frame is rolled out again when the study is
started again. A table of more than :data:`TABLE_COLUMNS` steps shows every n-th step and the last (the
records keep every step).

A split-wide rollout stops at the first scene that diverges, so it says little about how often a model's
rollouts fail. ``scene_rollouts: {data: STORE, splits: [test, val]}`` also rolls every run out on each scene of
those splits alone (``launch/predict.py ... data=STORE split=S scene_ids=[i]``, into the run's
``scene_rollouts/<split>-<i>/``; STORE a name under ``paths.data`` or a path ending in .zarr, default each run's
own store) with the study's K and start frame, and counts per label and split the rollouts on disk (every seed and
scene) that stayed whole and ended below constant velocity (md, ``scene_rollouts`` in the records,
``<study>[-<budget>]-scenes.png``). Tabulating reads the rollouts on disk and needs no store.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dist_egnn.config import StudyRoot, StudyRun, StudySpec  # noqa: F401  (the schema; registered by register())
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.keys import SPLITS
from dist_egnn.measure.baselines import trivial_baselines
from dist_egnn.measure.reporting import bar_plot, markdown_table, save_figure, summarise, write_json
from dist_egnn.training.checkpoint import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]         # the repository: launch/train.py is run from there


def train_command(spec: DictConfig, run: DictConfig, seed: int, run_dir: Path, data_dir: str,
                  threads: int | None = None) -> list[str]:
    """The exact command line of one run (``threads``: the cores it may use, shared by its ranks, unless the
    study's overrides set trainer.num_threads)."""
    if spec.budget not in spec.budgets:
        raise ConfigError(f"study.budget={spec.budget!r} is not defined in study {spec.name!r}: "
                         f"choose one of {sorted(spec.budgets)}")
    script = str(ROOT / "launch" / "train.py")
    if run.ranks > 1:
        deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
        launcher = [deepspeed, "--num_gpus", str(run.ranks), script]
    else:
        launcher = [sys.executable, script]
    overrides = [*spec.common, *spec.budgets[spec.budget], *run.overrides]
    if threads is not None and not any(o.startswith("trainer.num_threads=") for o in overrides):
        overrides.insert(0, f"trainer.num_threads={max(1, threads // run.ranks)}")
    return [*launcher, f"dataset={spec.dataset}", f"paths.data={data_dir}", *overrides,
            f"trainer.seed={seed}", f"hydra.run.dir={run_dir}",
            "trainer.progress=false", "resume=auto"]


LOCATION_OVERRIDES = ("trainer.num_threads=", "paths.data=", "hydra.run.dir=")   # where and how fast, not what


def train_overrides(cmd: list[str] | str) -> list[str]:
    """The overrides of a ``launch/train.py`` command line that decide what is trained (not where or how fast), as
    ``run_logged`` records it (joined by spaces)."""
    tokens = (cmd if isinstance(cmd, str) else " ".join(cmd)).split()
    script = next(i for i, token in enumerate(tokens) if token.endswith("launch/train.py"))
    return [token for token in tokens[script + 1:] if not token.startswith(LOCATION_OVERRIDES)]


def recorded_overrides(run_dir: Path) -> list[str] | None:
    """What the run's last launch in ``study_output.log`` was asked to train (None: no launch recorded)."""
    log = run_dir / "study_output.log"
    lines = [line[2:] for line in log.read_text(errors="replace").splitlines()
             if line.startswith("$ ") and "launch/train.py" in line] if log.exists() else []
    return train_overrides(lines[-1]) if lines else None


def changed_runs(spec: DictConfig, jobs: list[tuple[DictConfig, int]], base: Path, data_dir: str) -> list[str]:
    """Finished runs trained with other overrides than the study asks for now (its yaml, budget or common edited):
    one line each naming the run folder and what differs. Their results would be tabulated under the new
    description, so the study stops instead (a run without a recorded launch is not compared)."""
    changed = []
    for run, seed in jobs:
        run_dir = base / run.label / f"seed{seed}"
        recorded = recorded_overrides(run_dir) if finished_record(run_dir) is not None else None
        if recorded is None:
            continue
        wanted = train_overrides(train_command(spec, run, seed, run_dir, data_dir))
        if recorded != wanted:
            gone = [o for o in recorded if o not in wanted]
            new = [o for o in wanted if o not in recorded]
            what = "; ".join(filter(None, [f"trained with {' '.join(gone)}" if gone else "",
                                            f"now asked for {' '.join(new)}" if new else ""])) or "order differs"
            changed.append(f"{run_dir}: {what}")
    return changed


def finished_record(run_dir: Path) -> dict[str, Any] | None:
    """The test evaluation of a finished run (last line of metrics.jsonl), or None if unfinished."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return None
    lines = metrics.read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return last if "test_mse" in last else None


def rollout_record(spec: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """The run's ``predict/rollout.json`` when the study asks for rollouts and it is the study's: K, start frame,
    every scene of the test split (a ``launch/predict.py run=RUN split=val`` or ``scene_ids=[3]`` without ``out=``
    writes the same file); else None."""
    path = run_dir / "predict" / "rollout.json"
    if not spec.get("rollout_steps") or not path.exists():
        return None
    record = json.loads(path.read_text())
    options = record.get("config", {})
    if record.get("split", "test") != "test" or options.get("scene_ids") is not None or options.get("scenes"):
        return None
    start = spec.get("rollout_start")
    if start is not None and record.get("start_frame") != start:
        return None
    return record if record.get("requested_steps") == spec.rollout_steps else None


def run_finished(spec: DictConfig, run_dir: Path, data_dir: str) -> bool:
    """Trained (a test line in metrics.jsonl) and, when the study asks for it, rolled out (scene by scene too)."""
    if finished_record(run_dir) is None:
        return False
    if spec.get("rollout_steps") and rollout_record(spec, run_dir) is None:
        return False
    return all(scene_record(spec, run_dir, data_dir, *job) for job in scene_jobs(spec, run_dir, data_dir))


def predict_command(spec: DictConfig, run_dir: Path, threads: int | None = None) -> list[str]:
    """The rollout of one finished run: ``launch/predict.py`` with the study's K on the run's test split."""
    start = spec.get("rollout_start")
    return [sys.executable, str(ROOT / "launch" / "predict.py"), f"run={run_dir}", f"steps={spec.rollout_steps}",
            *([f"start={start}"] if start is not None else []),
            *([f"num_threads={threads}"] if threads else []), "progress=false"]


# -------------------------------------------------------------------------------------- scene-by-scene rollouts
SCENE_FOLDER = "scene_rollouts"      # in a run's folder: <split>-<scene>/, predict's out= of one scene's rollout


def scene_store(spec: DictConfig, run_dir: Path, data_dir: str) -> Path:
    """The store the scene rollouts read: ``study.scene_rollouts.data`` (a name under ``paths.data``, or a path
    ending in .zarr), else the store the run trained on (its config.yaml's ``dataset.store``)."""
    data = spec.scene_rollouts.get("data")
    if data is None:
        return Path(yaml.safe_load((run_dir / "config.yaml").read_text())["dataset"]["store"])
    return Path(data) if str(data).endswith(".zarr") else Path(data_dir) / f"{data}.zarr"


def scene_jobs(spec: DictConfig, run_dir: Path, data_dir: str) -> list[tuple[str, int]]:
    """(split, scene) of every scene the study rolls a run out on alone; [] without ``scene_rollouts``."""
    if not spec.get("scene_rollouts"):
        return []
    info = open_store(scene_store(spec, run_dir, data_dir))
    return [(split, scene) for split in spec.scene_rollouts.splits for scene in range(info.splits[split].num_scenes)]


def scenes_on_disk(spec: DictConfig, run_dir: Path) -> list[tuple[str, int]]:
    """(split, scene) of the run's scene rollouts on disk for the study's splits, in order: what the results
    count (tabulating needs no store, so runs copied to another machine still tabulate)."""
    if not spec.get("scene_rollouts"):
        return []
    found = []
    for split in spec.scene_rollouts.splits:
        names = (path.parent.name.removeprefix(f"{split}-")
                 for path in (run_dir / SCENE_FOLDER).glob(f"{split}-*/rollout.json"))
        found += [(split, scene) for scene in sorted(int(name) for name in names if name.isdigit())]
    return found


def scene_record(spec: DictConfig, run_dir: Path, data_dir: str, split: str, scene: int) -> dict[str, Any] | None:
    """The rollout.json of one scene's rollout when it is the study's (K, start frame, store); else None."""
    path = run_dir / SCENE_FOLDER / f"{split}-{scene}" / "rollout.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    start = spec.get("rollout_start")
    same = (record.get("requested_steps") == spec.rollout_steps and record.get("scenes") == [scene]
            and record.get("split") == split and (start is None or record.get("start_frame") == start)
            and Path(record["store"]).resolve() == scene_store(spec, run_dir, data_dir).resolve())
    return record if same else None


def scene_predict_command(spec: DictConfig, run_dir: Path, data_dir: str, split: str, scene: int,
                          threads: int | None = None) -> list[str]:
    """One scene's rollout: the study's rollout (:func:`predict_command`) on that scene alone, in its own folder."""
    return [*predict_command(spec, run_dir, threads), f"data={scene_store(spec, run_dir, data_dir)}",
            f"split={split}", f"scene_ids=[{scene}]", f"out={run_dir / SCENE_FOLDER / f'{split}-{scene}'}"]


def scene_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What the results keep of one scene's rollout: how far it got, and its MSE against constant velocity's and
    the share of its fluid outside the walls (None without walls) at its last step."""
    return dict(split=record["split"], scene=record["scenes"][0], steps=record["steps"],
                requested_steps=record["requested_steps"], stopped=record["stopped_early"],
                mse_last=record["mse"][-1] if record["mse"] else None,
                baseline_mse_last=record["baseline_mse"][-1] if record["baseline_mse"] else None,
                steps_below=int(sum(m < b for m, b in zip(record["mse"], record["baseline_mse"]))),
                outside_last=(record.get("outside_share") or [None])[-1])


def make_record(spec: DictConfig, run: DictConfig, seed: int, run_dir: Path, data_dir: str) -> dict:
    """One JSON record: what distinguishes the run, and its results."""
    final = finished_record(run_dir)
    rollout = rollout_record(spec, run_dir)
    scenes = [scene_summary(record) for record in (scene_record(spec, run_dir, data_dir, split, scene)
                                                   for split, scene in scenes_on_disk(spec, run_dir)) if record]
    wall_file = run_dir / "study_wall_time_s"
    wall_time_s = float(wall_file.read_text()) if wall_file.exists() else None
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    distributed = config.get("distributed", {})
    return dict(study=spec.name, budget=spec.budget, label=run.label, dataset=config["dataset"]["name"],
                model=config["model"]["name"], seed=seed, test_mse=final["test_mse"], val_mse=final.get("val_mse"),
                best_epoch=final.get("epoch"), val_rollout_mse=final.get("val_rollout_mse"),
                cutoff_rate=config["model"].get("cutoff_rate", 0.0),
                virtual_channels=config["model"].get("virtual_channels"), parts=distributed.get("parts", 1),
                halo=distributed.get("halo", "none"), partition=distributed.get("partition"),
                ranks=run.ranks, dropped_edge_fraction=final.get("dropped_edge_fraction"),
                edges_per_rank=final.get("edges_per_rank"), wall_time_s=wall_time_s, run_dir=str(run_dir),
                **({} if rollout is None else dict(rollout_mse=rollout["mse"],
                                                   rollout_baseline_mse=rollout["baseline_mse"],
                                                   rollout_start_frame=rollout["start_frame"],
                                                   rollout_edges_per_node=rollout.get("edges_per_node"),
                                                   rollout_spread_ratio=rollout.get("spread_ratio"),
                                                   rollout_outside_share=rollout.get("outside_share"),
                                                   rollout_command=rollout.get("command"),
                                                   rollout_stopped=rollout["stopped_early"])),
                **({} if not scenes else dict(scene_rollouts=scenes)))


def dropped_edges(records: list[dict], label: str) -> str:
    """Mean fraction of real edges a run never used (edge dropping r, or cut edges lost in drop mode)."""
    fractions = [r["dropped_edge_fraction"] for r in records
                 if r["label"] == label and r.get("dropped_edge_fraction") is not None]
    return f"{100 * sum(fractions) / len(fractions):.1f}%" if fractions else ""


def results_stem(spec: DictConfig) -> str:
    return spec.name if spec.budget == "default" else f"{spec.name}-{spec.budget}"


def trivial_reference(spec: DictConfig, run_dir: Path, results_dir: Path) -> dict[str, Any]:
    """Zero-motion and constant-velocity test MSE (dist_egnn.measure.baselines) on the study's data, computed once
    from a finished run's resolved configuration and kept in ``<stem>-trivial.json`` with the dataset
    settings it was computed for (recomputed when they change, e.g. the velocity unit)."""
    path = results_dir / f"{results_stem(spec)}-trivial.json"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    if path.exists():
        kept = json.loads(path.read_text())
        if kept.get("dataset_config") == config["dataset"]:
            return kept
    reference = dict(trivial_baselines(OmegaConf.create(config)), dataset_config=config["dataset"])
    write_text_atomic(json.dumps(reference, indent=1) + "\n", path)     # replaces a stale one: never half-written
    return reference


def write_results(spec: DictConfig, records: list[dict], results_dir: Path,
                  trivial: dict[str, Any] | None = None, failed: list[str] = ()) -> None:
    stem = results_stem(spec)
    write_json(records, results_dir / f"{stem}.json")
    rows = summarise(records)
    settings = {r["label"]: {"model": r["model"], "r": r["cutoff_rate"], "P": r["parts"], "halo": r["halo"],
                             "dropped edges": dropped_edges(records, r["label"])} for r in records}
    title = f"{spec.name} ({spec.dataset}, budget {spec.budget})"
    write_text_atomic(
        f"# Study: {title}\n\n{spec.description.strip()}\n\nTest MSE per run label over seeds "
        f"{sorted({r['seed'] for r in records})}; records in `{stem}.json`, command "
        f"`python launch/study.py study={spec.name} study.budget={spec.budget}`.\n\n"
        + markdown_table(rows, baseline=spec.baseline, extra_columns=settings)
        + ("" if trivial is None else
           f"\nPredictors that learn nothing, on the same {trivial['test_samples']} test samples: zero motion "
           f"(x(t + Δt) = x(t)) {trivial['zero_motion_mse']:.4g}; constant velocity (x(t) + αv(t), α = "
           f"{trivial['constant_velocity_alpha']:.4g} fitted on training samples) "
           f"{trivial['constant_velocity_mse']:.4g} (`{stem}-trivial.json`).\n")
        + failed_list(failed) + rollout_table(records, spec.rollout_steps, spec.get("rollout_start"))
        + scene_table(spec, records, stem),
        results_dir / f"{stem}.md")
    bar_plot(rows, results_dir / f"{stem}.png", title=title)
    if any("rollout_mse" in r for r in records):
        rollout_plot(records, results_dir / f"{stem}-rollout.png", title=f"{title}: rollouts")
    if any("scene_rollouts" in r for r in records):
        scene_plot(records, results_dir / f"{stem}-scenes.png", title=f"{title}: rollouts scene by scene")


def failed_list(failed: list[str]) -> str:
    """Markdown lines naming the runs that failed (``keep_going``) and each one's error."""
    if not failed:
        return ""
    return ("\nRuns that failed (not in the table; the error is the run's own, its output in `study_failed.txt` of "
            "its run folder):\n" + "".join(f"- {line}\n" for line in failed))


def rollout_means(records: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """Per label: per-step rollout MSE and constant velocity's, each the mean over the label's seeds (steps a
    rollout did not reach are left out of that step's mean), and how many seeds there are."""
    means = {}
    for label in dict.fromkeys(r["label"] for r in records if "rollout_mse" in r):
        runs = [r for r in records if r["label"] == label and "rollout_mse" in r]
        mse, base = (per_step_mean(runs, key) for key in ("rollout_mse", "rollout_baseline_mse"))
        means[label] = (mse, base, len(runs))
    return means


def per_step_mean(runs: list[dict], key: str) -> np.ndarray:
    """The per-step list ``key`` averaged over runs, steps a run did not reach left out (NaN where none did)."""
    steps = max(len(r.get(key) or []) for r in runs)
    rows = [list(r.get(key) or []) + [np.nan] * (steps - len(r.get(key) or [])) for r in runs]
    with np.errstate(all="ignore"):
        return np.nanmean(np.array(rows, float), axis=0) if steps else np.zeros(0)


TABLE_COLUMNS = 20        # a rollout table wider than this shows every n-th step and the last


def table_steps(width: int) -> list[int]:
    """The steps (1-based) a rollout table of ``width`` steps shows: all up to :data:`TABLE_COLUMNS`, else every
    n-th (n = ceil(width / TABLE_COLUMNS)) and the last."""
    every = -(-width // TABLE_COLUMNS)
    return sorted(set(range(every, width + 1, every)) | {width})


def _cells(values: np.ndarray, shown: list[int]) -> str:
    return " | ".join(f"{values[k - 1]:.4g}" if k <= len(values) else "" for k in shown)


def rollout_table(records: list[dict], steps: int | None, start: int | None = None) -> str:
    """A markdown table: per label the rollout MSE of every step (mean over seeds; of every n-th step beyond
    :data:`TABLE_COLUMNS`) and, below each label, constant velocity on the same samples; the last column counts
    the steps below constant velocity, over every step."""
    means = rollout_means(records)
    if not means:
        return ""
    width = max(len(m) for m, _, _ in means.values())
    shown = table_steps(width)
    origin = "its first input frame" if start is None else f"input frame {start}"
    command = f"steps={steps}" + ("" if start is None else f" start={start}")
    lines = [f"\nRollouts: {steps} task steps on the test split from {origin}, predictions fed back "
             f"(`python launch/predict.py run=RUN_DIR {command}`), MSE per step over moving nodes, mean over "
             f"seeds; `const. vel.` is constant velocity on the same samples"
             + ("" if len(shown) == width else f"; one step in {shown[0]} shown and the last, the records hold "
                                                f"every step") + ".\n",
             "| run | seeds | " + " | ".join(f"step {k}" for k in shown) + " | steps below const. vel. |",
             "|---|---|" + "---|" * len(shown) + "---|"]
    for label, (mse, base, seeds) in means.items():
        lines.append(f"| {label} | {seeds} | {_cells(mse, shown)} | {int(np.sum(mse < base))} of {len(mse)} |")
        lines.append(f"| {label}: const. vel. | {seeds} | {_cells(base, shown)} | |")
        rolled = [r for r in records if r["label"] == label and "rollout_mse" in r]
        for key, name in (("rollout_edges_per_node", "edges per moving node"),     # climbs when particles pile up
                          ("rollout_spread_ratio", "spread pred / true"),         # below 1: the fluid contracts
                          ("rollout_outside_share", "share outside the walls")):  # leaks through a wall
            values = per_step_mean(rolled, key)
            if len(values) and not np.isnan(values).all():             # e.g. no walls: no share outside them
                lines.append(f"| {label}: {name} | {seeds} | {_cells(values, shown)} | |")
    switches = {}                        # rollouts run by hand with options beyond the study's own command
    for r in records:
        extra = rollout_switches(r.get("rollout_command"), start)
        if extra:
            switches.setdefault(extra, []).append(f"{r['label']} seed {r['seed']}")
    if switches:
        lines += ["", "Rollouts run with further options (their `rollout.json` `command`):",
                  *(f"- `{extra}`: {', '.join(runs)}" for extra, runs in switches.items())]
    stopped = [f"- {r['label']} seed {r['seed']}: {r['rollout_stopped']}" for r in records if r.get("rollout_stopped")]
    if stopped:
        lines += ["", "Rollouts that stopped before the last step (`predict/rollout.json`, `stopped_early`):", *stopped]
    return "\n".join(lines) + "\n"


def scene_outcome(scene: dict[str, Any]) -> tuple[bool, bool]:
    """(whole: the rollout reached its last step; below: and its MSE there is under constant velocity's)."""
    whole = scene["steps"] == scene["requested_steps"] and not scene["stopped"]
    return whole, whole and scene["mse_last"] < scene["baseline_mse_last"]


def scene_table(spec: DictConfig, records: list[dict], stem: str) -> str:
    """Markdown: per label and split, of its scene rollouts (every seed) how many stayed whole and how many of those
    end below constant velocity, and which stopped where; "" when no record has scene rollouts."""
    rolled = [r for r in records if r.get("scene_rollouts")]
    if not rolled:
        return ""
    data = spec.scene_rollouts.get("data") or "each run's own store"
    start = spec.get("rollout_start")
    lines = ["", f"Scene by scene: every scene of {data} ({', '.join(spec.scene_rollouts.splits)}) rolled out alone, "
             f"{spec.rollout_steps} task steps from input frame {'the run’s first' if start is None else start} "
             f"(`launch/predict.py` with `scene_ids=[i]`, in each run's `{SCENE_FOLDER}/<split>-<i>/`; records "
             f"`scene_rollouts` in `{stem}.json`, picture `{stem}-scenes.png`). Whole: reached the last step. Below: "
             f"whole, and its MSE at the last step under constant velocity's. Counted over seeds and scenes; the last "
             f"column is the share of a whole rollout's fluid outside the walls at its last step, median and most "
             f"over the whole ones.", "",
             "| run | split | seeds | rollouts | whole | below const. vel. at the end | outside the walls: median, "
             "most |", "|---|---|---|---|---|---|---|"]
    stopped = []
    for label in dict.fromkeys(r["label"] for r in rolled):
        runs = [r for r in rolled if r["label"] == label]
        for split in dict.fromkeys(sc["split"] for r in runs for sc in r["scene_rollouts"]):
            scenes = [(r["seed"], sc) for r in runs for sc in r["scene_rollouts"] if sc["split"] == split]
            outcomes = [scene_outcome(sc) for _, sc in scenes]
            outside = [sc.get("outside_last") for _, sc in scenes if scene_outcome(sc)[0]]
            outside = [x for x in outside if x is not None and np.isfinite(x)]
            lines.append(f"| {label} | {split} | {len({seed for seed, _ in scenes})} | {len(scenes)} | "
                         f"{sum(w for w, _ in outcomes)} | {sum(b for _, b in outcomes)} | "
                         + (f"{100 * np.median(outside):.1f} %, {100 * max(outside):.1f} % |" if outside else "- |"))
            stopped += [f"- {label} seed {seed}, {split} scene {sc['scene']}: {sc['stopped']}"
                        for seed, sc in scenes if not scene_outcome(sc)[0]]
    if stopped:
        lines += ["", "Scene rollouts that stopped before the last step:", *stopped]
    return "\n".join(lines) + "\n"


def log_ratio(mse: float, baseline: float, bound: float = 1.0) -> float:
    """log10(mse / baseline) within ±bound (a baseline of 0, fluid at rest or exact constant velocity: +bound for
    any error, 0 for none)."""
    if baseline <= 0.0:
        return bound if mse > 0.0 else 0.0
    return float(np.clip(np.log10(max(mse, 1e-300) / baseline), -bound, bound))


def scene_plot(records: list[dict], path: Path, title: str) -> Path:
    """One cell per (run label and seed, scene): log10 of the MSE over constant velocity's at the last step of a
    whole rollout (blue: below it; within ±1), × where the rollout stopped early, blank where none is on disk
    (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rolled = [r for r in records if r.get("scene_rollouts")]
    columns = list(dict.fromkeys((sc["split"], sc["scene"]) for r in rolled for sc in r["scene_rollouts"]))
    grid = np.full((len(rolled), len(columns)), np.nan)
    for row, r in enumerate(rolled):
        for sc in r["scene_rollouts"]:
            if scene_outcome(sc)[0]:
                grid[row, columns.index((sc["split"], sc["scene"]))] = log_ratio(sc["mse_last"],
                                                                                 sc["baseline_mse_last"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(columns) + 4), max(2.5, 0.35 * len(rolled) + 1.5)))
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    for row, r in enumerate(rolled):
        for sc in r["scene_rollouts"]:
            if not scene_outcome(sc)[0]:
                ax.text(columns.index((sc["split"], sc["scene"])), row, "×", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(columns)), [f"{split} {scene}" for split, scene in columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rolled)), [f"{r['label']} s{r['seed']}" for r in rolled], fontsize=7)
    fig.colorbar(image, ax=ax).set_label("log10 (MSE / const. vel.), last step", fontsize=8)
    ax.set_title(title + " (×: stopped early)", fontsize=9)
    return save_figure(fig, path)


def rollout_switches(command: str | None, start: int | None = None) -> str:
    """The options of a predict command beyond what the study passes (run, steps, its ``start``, threads,
    progress)."""
    own = ("run=", "steps=", "num_threads=", "progress=")
    words = (command or "").split()[2:]                  # past `python launch/predict.py`
    return " ".join(w for w in words if not w.startswith(own) and w != f"start={start}")


def rollout_plot(records: list[dict], path: Path, title: str) -> Path:
    """Rollout MSE per step for every label (mean over seeds), constant velocity dashed (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    means = rollout_means(records)
    for label, (mse, _, _) in means.items():
        ax.plot(np.arange(1, len(mse) + 1), mse, "o-", ms=3, label=label)
    base = max((b for _, b, _ in means.values()), key=len)
    ax.plot(np.arange(1, len(base) + 1), base, "k--", label="constant velocity")
    ax.set_xlabel("rollout step (task steps)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("MSE (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


FAILED_FILE = "study_failed.txt"     # in a run's folder: the last output of its failed launch (keep_going)


class RunFailed(SystemExit):
    """A run's training or rollout process failed; the message ends with its last output."""


def fail_run(run_dir: Path, message: str) -> RunFailed:
    """Keep the failure in the run's folder (listed in the results with keep_going) and return the error."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED_FILE).write_text(message + "\n")
    return RunFailed(message)


def failure_line(run_dir: Path) -> str | None:
    """The failed run's own error (from its last line starting with "error" to the end, on one line, at most
    600 characters), or None when it has not failed."""
    path = run_dir / FAILED_FILE
    if not path.exists():
        return None
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    starts = [i for i, line in enumerate(lines) if i > 0 and line.startswith("error")]
    text = " ".join(lines[starts[-1]:] if starts else lines[-1:]) or "failed"
    return text if len(text) <= 600 else text[:597] + "..."


OUTPUT_FILE = "study_output.log"     # in a run's folder: everything its training and rollout processes printed


def run_logged(cmd: list[str], run_dir: Path) -> tuple[int, str]:
    """Run ``cmd``, appending its stdout and stderr to the run's :data:`OUTPUT_FILE` (a resumed or retried run
    adds to what is there), and return its exit code and the last 3,000 characters it printed.

    Kept because a run's own ``train.log`` holds only what went through ``logging``: lines a run prints to
    stderr (a pushforward unroll refused, a warning) would otherwise be lost with the study's pipe."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / OUTPUT_FILE
    with path.open("a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    with path.open("rb") as log:
        log.seek(max(start, path.stat().st_size - 3000))
        return code, log.read().decode(errors="replace")


def train_run(spec: DictConfig, run: DictConfig, seed: int, run_dir: Path, data_dir: str,
              threads: int | None, bar: tqdm) -> None:
    """Train one (run, seed) as its own process; a failure raises :class:`RunFailed` with the run's last output."""
    # resume=auto: a run cut short continues from its newest checkpoint (a new one starts fresh).
    cmd = train_command(spec, run, seed, run_dir, data_dir, threads)
    if finished_record(run_dir) is None:
        bar.write(f"running {run.label} seed {seed}: {' '.join(cmd)}")
        started = time.perf_counter()
        code, tail = run_logged(cmd, run_dir)
        if code != 0 or finished_record(run_dir) is None:
            raise fail_run(run_dir, f"error: run {run.label} seed {seed} failed (exit {code}); its output "
                                    f"ends:\n{tail}")
        (run_dir / "study_wall_time_s").write_text(f"{time.perf_counter() - started:.1f}\n")
    if spec.get("rollout_steps") and rollout_record(spec, run_dir) is None:
        cmd = predict_command(spec, run_dir, threads)
        bar.write(f"rolling out {run.label} seed {seed}: {' '.join(cmd)}")
        code, tail = run_logged(cmd, run_dir)
        if code != 0 or rollout_record(spec, run_dir) is None:
            raise fail_run(run_dir, f"error: the rollout of run {run.label} seed {seed} failed (exit "
                                    f"{code}); its output ends:\n{tail}")
    for split, scene in scene_jobs(spec, run_dir, data_dir):
        if scene_record(spec, run_dir, data_dir, split, scene) is None:
            cmd = scene_predict_command(spec, run_dir, data_dir, split, scene, threads)
            bar.write(f"rolling out {run.label} seed {seed} on {split} scene {scene}: {' '.join(cmd)}")
            code, tail = run_logged(cmd, run_dir)
            if code != 0 or scene_record(spec, run_dir, data_dir, split, scene) is None:
                raise fail_run(run_dir, f"error: the rollout of run {run.label} seed {seed} on {split} scene "
                                        f"{scene} failed (exit {code}); its output ends:\n{tail}")
    (run_dir / FAILED_FILE).unlink(missing_ok=True)          # a run retried after a failure that now finished


def tabulated_jobs(spec: DictConfig, base: Path) -> list[tuple[DictConfig, int]]:
    """The study's (run, seed) pairs and those of every other seed already on disk for its labels, seed-major: a
    study started with some of its seeds (``study.seeds=[3]``) or with ``train=false`` on a machine holding only
    some runs adds to its results and never writes them again with fewer runs than it has."""
    seeds = set(spec.seeds)
    for run in spec.runs:
        found = (path.name.removeprefix("seed") for path in (base / run.label).glob("seed*"))
        seeds |= {int(name) for name in found if name.isdigit()}
    return [(run, seed) for seed in sorted(seeds) for run in spec.runs]


def tabulate(cfg: DictConfig, base: Path) -> int:
    """Write the results of every finished (run, seed) on disk, in seed-major order; returns how many there are."""
    spec = cfg.study
    records, trivial, failed = [], None, []
    for run, seed in tabulated_jobs(spec, base):
        run_dir = base / run.label / f"seed{seed}"
        if finished_record(run_dir) is not None:
            records.append(make_record(spec, run, seed, run_dir, cfg.paths.data))
            trivial = trivial or trivial_reference(spec, run_dir, Path(cfg.results_dir))
        elif failure_line(run_dir) is not None:
            failed.append(f"{run.label} seed {seed}: {failure_line(run_dir)}")
    if records:
        write_results(spec, records, Path(cfg.results_dir), trivial, failed)
    return len(records)


def check_scene_rollouts(spec: DictConfig, data_dir: str, train: bool = True) -> None:
    """``study.scene_rollouts`` asks for something a study can do: it has ``rollout_steps``, distinct known splits,
    and (when it will roll out: ``train``) a store that exists."""
    scenes = spec.get("scene_rollouts")
    if not scenes:
        return
    if not spec.get("rollout_steps"):
        raise ConfigError("study.scene_rollouts rolls every run out scene by scene over study.rollout_steps task "
                          "steps, which is not set: set study.rollout_steps=K too, or leave scene_rollouts out")
    bad = [split for split in scenes.splits if split not in SPLITS]
    if bad or not scenes.splits or len(set(scenes.splits)) < len(scenes.splits):
        raise ConfigError(f"study.scene_rollouts.splits={list(scenes.splits)}: give one or more of {SPLITS}, each "
                          f"once")
    if train and scenes.get("data") is not None:
        open_store(scene_store(spec, Path(), data_dir))     # its error names the store and the prepare command


def run(cfg: DictConfig) -> None:
    """Train every missing (run, seed) of ``cfg.study`` and write its results (``launch/study.py``)."""
    spec = cfg.study
    if cfg.jobs < 1:
        raise ConfigError(f"jobs={cfg.jobs}: the number of runs trained at once must be at least 1")
    if spec.get("rollout_steps") is not None and spec.rollout_steps < 1:
        raise ConfigError(f"study.rollout_steps={spec.rollout_steps}: the task steps of each rollout must be at "
                          f"least 1 (or null: no rollouts)")
    if spec.get("rollout_start") is not None and spec.rollout_start < 0:
        raise ConfigError(f"study.rollout_start={spec.rollout_start}: an input frame is >= 0 (or null: each run's "
                          f"first input frame)")
    check_scene_rollouts(spec, cfg.paths.data, cfg.train)
    base = Path(cfg.paths.runs) / "studies" / f"{spec.name}-{spec.budget}"
    # Seed-major: every run's first seed before any second seed, so a study cut short already compares them all.
    jobs = [(run, seed) for seed in spec.seeds for run in spec.runs]
    changed = changed_runs(spec, tabulated_jobs(spec, base), base, cfg.paths.data)   # every run the results hold
    if changed:
        raise ConfigError(f"{len(changed)} finished run(s) of study {spec.name} were trained with other overrides "
                          f"than it asks for now, so their results would be written under the new settings:\n  "
                          + "\n  ".join(changed) + "\nrestore the study's overrides, or delete those run folders "
                          "to train them again with the new ones")
    def done(run_dir: Path) -> bool:     # train=false tabulates what is on disk: no scene store to open
        return run_finished(spec, run_dir, cfg.paths.data) if cfg.train else finished_record(run_dir) is not None

    missing = [(run, seed) for run, seed in jobs if not done(base / run.label / f"seed{seed}")]
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(missing), desc=f"study {spec.name}", unit="run",
               disable=not cfg.progress)
    if not cfg.train:
        for run, seed in missing:
            bar.write(f"skipping {run.label} seed {seed}: not finished (train=false)")
        missing = []
    threads = None if cfg.jobs == 1 else max(1, (os.cpu_count() or 1) // cfg.jobs)
    failures = 0
    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:
        pending = {pool.submit(train_run, spec, run, seed, base / run.label / f"seed{seed}", cfg.paths.data,
                               threads, bar) for run, seed in missing}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = [future.exception() for future in done if future.exception() is not None]
            if failed and not cfg.keep_going:  # runs already going finish (and are kept); none starts after it
                for future in pending:
                    future.cancel()
                raise failed[0]
            for error in failed:
                bar.write(f"{error}\n(keep_going=true: the other runs go on)")
            failures += len(failed)
            bar.update(len(done))
            tabulate(cfg, base)
    if tabulate(cfg, base):
        print(f"results: {Path(cfg.results_dir) / results_stem(spec)}.{{json,md,png}}")
    else:
        print("no finished runs yet: nothing written")
    if failures:
        raise SystemExit(f"error: {failures} run(s) failed (listed in the results; started again, the study "
                         f"retries them)")
