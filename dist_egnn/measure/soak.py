"""Soak test: train for several hundred steps and record every rank's resident memory (RSS) after each step.

    python launch/soak.py [overrides]                                    one process
    torchrun --nproc-per-node P launch/soak.py engine=ddp distributed.parts=P [overrides]

Same configuration as launch/train.py (checkpoints, evaluations and all); the default soak is 25 epochs of
the built-in N-body set (500 steps of 10 graphs), a resume point every 50 steps. Writes into
``<run dir>/soak/``: ``rank<R>.csv`` (step, rss_mb, elapsed_s) for every rank, and from rank 0
``memory.png`` (RSS against step, every rank) and ``summary.json``: the mean RSS of each tenth of the run,
the growth from the first tenth after warm-up to the last, the maximum, and a straight line fitted after
warm-up (slope and standard error, MB per 100 steps). Flat memory: block means without a trend, a slope
within about two standard errors of 0.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import psutil
from omegaconf import DictConfig, open_dict

from dist_egnn.parallel import runtime
from dist_egnn.training.callbacks import Callback
from dist_egnn.training.trainer import Trainer

SOAK_DEFAULTS = {"trainer.max_epochs": 25, "trainer.checkpoint_every_steps": 50, "trainer.patience": 1000}


class MemorySampler(Callback):
    """Samples this process's RSS after every optimizer step."""

    def __init__(self):
        self.process = psutil.Process()
        self.samples: list[tuple[int, float, float]] = []
        self.started = time.perf_counter()

    def after_step(self, trainer, step: int) -> None:
        self.samples.append((step, self.process.memory_info().rss / 2**20, time.perf_counter() - self.started))


def summarize(samples: np.ndarray, blocks: int = 10) -> dict:
    """Mean RSS of each tenth of the run, the growth from the first block after warm-up (the first tenth) to
    the last, and a straight line fitted after warm-up (slope and its standard error, MB per 100 steps).

    RSS after a step swings by hundreds of MB with the allocator; block means and the slope's error say
    whether anything grows beneath that.
    """
    steps, rss = samples[:, 0], samples[:, 1]
    size = max(1, len(steps) // blocks)
    means = [float(rss[i:i + size].mean()) for i in range(0, len(rss) - size + 1, size)]
    after = slice(size, None)
    slope = stderr = 0.0
    if len(steps[after]) >= 3:
        coef, cov = np.polyfit(steps[after], rss[after], 1, cov=True)
        slope, stderr = float(coef[0] * 100), float(np.sqrt(cov[0, 0]) * 100)
    return dict(steps=int(steps[-1]), block_steps=size, block_mean_rss_mb=[round(m, 1) for m in means],
                rss_max_mb=float(rss.max()), growth_after_warmup_mb=(means[-1] - means[1]) if len(means) > 1 else 0.0,
                slope_after_warmup_mb_per_100_steps=slope, slope_stderr_mb_per_100_steps=stderr)


def plot(per_rank: list[np.ndarray], summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank, (samples, summary) in enumerate(zip(per_rank, summaries)):
        line, = ax.plot(samples[:, 0], samples[:, 1], lw=0.6, alpha=0.45, label=f"rank {rank}, after each step")
        size = summary["block_steps"]
        centres = [samples[i * size:(i + 1) * size, 0].mean() for i in range(len(summary["block_mean_rss_mb"]))]
        ax.plot(centres, summary["block_mean_rss_mb"], "o-", color=line.get_color(), lw=1.5, ms=3,
                label=f"rank {rank}, mean of {size} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(title, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(out: Path, world_size: int, about: dict) -> dict:
    """summary.json and memory.png from the ranks' CSV files in ``out``."""
    per_rank = [np.loadtxt(out / f"rank{r}.csv", delimiter=",", skiprows=1, ndmin=2) for r in range(world_size)]
    summaries = [summarize(s) for s in per_rank]
    summary = dict(world_size=world_size, **about, per_rank=summaries)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    worst = max(summaries, key=lambda s: s["slope_after_warmup_mb_per_100_steps"])
    plot(per_rank, summaries, out / "memory.png",
         f"{about.get('model')} on {about.get('dataset')}, {world_size} rank(s), {about.get('engine')}: "
         f"{worst['steps']} steps; after warm-up {worst['slope_after_warmup_mb_per_100_steps']:+.1f} "
         f"± {worst['slope_stderr_mb_per_100_steps']:.1f} MB per 100 steps")
    return summary


def run(cfg: DictConfig, run_dir: Path, overridden: set[str]) -> None:
    """Train with the soak defaults (where ``overridden`` does not name the key) and write ``run_dir/soak/``."""
    with open_dict(cfg):
        for key, value in SOAK_DEFAULTS.items():
            if key not in overridden:
                parent, leaf = key.rsplit(".", 1)
                cfg[parent][leaf] = value
    env = runtime.DistEnv.from_environ()
    sampler = MemorySampler()
    trainer = Trainer.from_config(cfg, run_dir, env, callbacks=[sampler])
    trainer.fit()
    out = run_dir / "soak"
    out.mkdir(exist_ok=True)
    samples = np.array(sampler.samples)
    np.savetxt(out / f"rank{env.rank}.csv", samples, delimiter=",", header="step,rss_mb,elapsed_s", comments="",
               fmt=["%d", "%.2f", "%.3f"])
    runtime.barrier()
    if env.rank == 0:
        summary = report(out, env.world_size, dict(engine=trainer.engine_name, model=cfg.model.name,
                                                   dataset=cfg.dataset.name, batch_size=cfg.trainer.batch_size,
                                                   checkpoint_every_steps=cfg.trainer.checkpoint_every_steps))
        print(json.dumps(summary))
        print(f"soak results: {out}")
    runtime.shutdown()

