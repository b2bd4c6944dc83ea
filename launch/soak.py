"""Soak test: train for several hundred steps and record every rank's resident memory (RSS) after each step.

    python launch/soak.py [overrides]                                    one process
    torchrun --nproc-per-node P launch/soak.py engine=ddp distributed.parts=P [overrides]

Same configuration as launch/train.py (checkpoints, evaluations and all); the default soak is 25 epochs of
the built-in N-body set (500 steps of 10 graphs), a resume point every 50 steps. Writes into
``<run dir>/soak/``: ``rank<R>.csv`` (step, rss_mb, elapsed_s) for every rank, and from rank 0
``memory.png`` (RSS against step, every rank) and ``summary.json``: RSS after warm-up (10% of the steps)
and at the end, the maximum, and the slope of a straight line fitted to the second half in MB per 100
steps. Flat memory means a slope near 0 and an end value close to the warm-up value.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import psutil
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import launcher_arguments  # noqa: E402  (launch/train.py, next to this file)

from dist_egnn import comm  # noqa: E402
from dist_egnn.config import register  # noqa: E402
from dist_egnn.train import Trainer  # noqa: E402

register()
SOAK_DEFAULTS = {"trainer.max_epochs": 25, "trainer.checkpoint_every_steps": 50, "trainer.patience": 1000}


class SoakTrainer(Trainer):
    """The trainer, sampling this process's RSS after every optimizer step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.process = psutil.Process()
        self.samples: list[tuple[int, float, float]] = []
        self.started = time.perf_counter()

    def step(self, *args, **kwargs):
        result = super().step(*args, **kwargs)
        self.samples.append((self.state["global_step"] + 1, self.process.memory_info().rss / 2**20,
                             time.perf_counter() - self.started))
        return result


def summarize(samples: np.ndarray) -> dict[str, float]:
    """RSS after warm-up and at the end, maximum, and the second half's slope (MB per 100 steps)."""
    steps, rss = samples[:, 0], samples[:, 1]
    warm = max(1, len(steps) // 10)
    half = len(steps) // 2
    slope = float(np.polyfit(steps[half:], rss[half:], 1)[0] * 100) if len(steps) - half >= 2 else 0.0
    return dict(steps=int(steps[-1]), rss_after_warmup_mb=float(rss[warm - 1]), rss_end_mb=float(rss[-1]),
                rss_max_mb=float(rss.max()), growth_after_warmup_mb=float(rss[-1] - rss[warm - 1]),
                slope_second_half_mb_per_100_steps=slope)


def plot(per_rank: list[np.ndarray], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank, samples in enumerate(per_rank):
        ax.plot(samples[:, 0], samples[:, 1], label=f"rank {rank}", lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    overridden = {o.split("=")[0].lstrip("+") for o in HydraConfig.get().overrides.task}
    with open_dict(cfg):
        for key, value in SOAK_DEFAULTS.items():
            if key not in overridden:
                parent, leaf = key.rsplit(".", 1)
                cfg[parent][leaf] = value
    env = comm.DistEnv.from_environ()
    trainer = SoakTrainer(cfg, run_dir, env)
    trainer.fit()
    out = run_dir / "soak"
    out.mkdir(exist_ok=True)
    samples = np.array(trainer.samples)
    np.savetxt(out / f"rank{env.rank}.csv", samples, delimiter=",", header="step,rss_mb,elapsed_s", comments="",
               fmt=["%d", "%.2f", "%.3f"])
    comm.barrier()
    if env.rank == 0:
        per_rank = [np.loadtxt(out / f"rank{r}.csv", delimiter=",", skiprows=1, ndmin=2)
                    for r in range(env.world_size)]
        summary = dict(world_size=env.world_size, engine=trainer.engine_name, model=cfg.model.name,
                       dataset=cfg.dataset.name, batch_size=cfg.trainer.batch_size,
                       checkpoint_every_steps=cfg.trainer.checkpoint_every_steps,
                       per_rank=[summarize(s) for s in per_rank])
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        worst = max(summary["per_rank"], key=lambda s: abs(s["slope_second_half_mb_per_100_steps"]))
        plot(per_rank, out / "memory.png",
             f"{cfg.model.name} on {cfg.dataset.name}, {env.world_size} rank(s), {trainer.engine_name}: "
             f"{worst['steps']} steps, slope of 2nd half {worst['slope_second_half_mb_per_100_steps']:+.2f} MB/100 steps")
        print(json.dumps(summary))
        print(f"soak results: {out}")
    comm.shutdown()


if __name__ == "__main__":
    _env = comm.DistEnv.from_environ()
    if _env.distributed and "DIST_EGNN_RUN_STAMP" not in os.environ:
        os.environ["DIST_EGNN_RUN_STAMP"] = comm.shared_run_stamp(_env)
    sys.argv = launcher_arguments(sys.argv, _env)
    main()
