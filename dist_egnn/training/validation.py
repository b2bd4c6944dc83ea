"""Validation rollouts, and which validation number picks the best model.

A model fitted on one-step MSE can score well on one step and still fall apart when its predictions are fed
back: on the fluids, the runs with training noise validated best on their earliest, barely trained weights
(docs/results/README.md), and the one-step number chose those. Learned simulators (GNS, LagrangeBench) select
on a rollout instead. With ``trainer.val_rollout_steps`` = K > 0 every evaluation also rolls the weights being
evaluated out K task steps on the validation split (``dist_egnn.inference.rollout``: the same rollout as
``launch/predict.py run=RUN split=val steps=K``) and records

    val_rollout_mse            the mean over the K steps of the per-step MSE (every moving node and coordinate
                               of the chosen scenes); inf when the rollout diverged (NaN/Inf, or flew apart)
                               before step K: a model that cannot finish is worse than any that can
    val_rollout_baseline_mse   the same mean for constant velocity on the same scenes (it does not change
                               during training: the reference line)
    val_rollout_steps          the steps completed (K unless it diverged)
    val_rollout_outside        the share of the predicted moving nodes outside the walls' box at the last
                               completed step (stores with walls only)
    val_rollout_time_s         the rollout's wall time (the trainer measures it)

``trainer.select_on`` names the number that picks ``best.pt``, counts early stopping's patience and drives the
plateau schedule: ``val_mse`` (one step, the default) or ``val_rollout_mse``. Measured once, on the small fluid
(docs/results/README.md, "Selecting on a validation rollout"): a 74-frame mean over its 2 validation scenes swung by
up to 2.6x between evaluations and picked models whose test rollouts were worse than the last epoch's; whether a
rollout judges better than one step depends on its horizon and scenes, so the default stays ``val_mse``.

The rollout runs on every rank of a launch whose ranks hold whole graphs (``distributed.parts=1``; data parallel
over ranks is fine): each rank rolls out the same scenes with the same weights, and rank 0's numbers are
broadcast so that every rank takes the same decision. Parts of graphs are refused (``dist_egnn.config.check``):
the rollout builds whole graphs from the model's own predictions, which the stored partitions do not cover.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig

from dist_egnn.datasets.store import StoreInfo
from dist_egnn.errors import ConfigError
from dist_egnn.inference.rollout import (
    Parts,
    Rollout,
    RolloutError,
    available_steps,
    first_input_frame,
    plan_rollout,
    rollout,
)
from dist_egnn.parallel import runtime

SPLIT = "val"


@dataclass(frozen=True)
class ValidationRollout:
    """K task steps from input frame ``start`` of the validation split's first ``scenes`` scenes (None: all)."""

    steps: int
    start: int
    scenes: int | None

    @classmethod
    def from_config(cls, cfg: DictConfig, info: StoreInfo) -> "ValidationRollout | None":
        """The run's validation rollout (None with ``trainer.val_rollout_steps=0``), checked against the store:
        the split must hold K steps of ground truth after the start frame, and the scenes asked for."""
        t = cfg.trainer
        steps = int(t.get("val_rollout_steps", 0) or 0)
        if steps == 0:
            return None
        start = first_input_frame(cfg) if t.get("val_rollout_start") is None else int(t.val_rollout_start)
        meta = info.splits[SPLIT]
        delta_t = int(cfg.dataset.delta_t)
        available = available_steps(info, SPLIT, start, delta_t)
        if available < steps:
            raise ConfigError(
                f"trainer.val_rollout_steps={steps}: {info.path}/{SPLIT} holds frames 0..{meta.num_frames - 1}, so "
                f"from input frame {start} (trainer.val_rollout_start, else the first input frame of training) it "
                f"has ground truth for {available} task steps of dataset.delta_t={delta_t} frames; set "
                f"trainer.val_rollout_steps <= {available} or an earlier trainer.val_rollout_start")
        scenes = t.get("val_rollout_scenes")
        if scenes is not None and int(scenes) > meta.num_scenes:
            raise ConfigError(f"trainer.val_rollout_scenes={scenes}: {info.path}/{SPLIT} holds {meta.num_scenes} "
                              f"scenes; set it to at most {meta.num_scenes}, or null for all of them")
        scenes = None if scenes is None else int(scenes)
        try:                                   # what else a rollout checks (an input velocity that needs the past)
            plan_rollout(cfg, info, SPLIT, steps, start, scenes, None, Parts())
        except RolloutError as err:
            raise ConfigError(f"trainer.val_rollout_start={start}: {err}") from err
        return cls(steps=steps, start=start, scenes=scenes)

    def score(self, model: Callable[..., Any], cfg: DictConfig, info: StoreInfo, device: torch.device,
              dtype: torch.dtype, collective_device: torch.device | str = "cpu") -> dict[str, float]:
        """Roll ``model`` (called as in training, inputs and outputs in the store's units) out and return the
        numbers above, rank 0's on every rank."""
        result = rollout(model, cfg, info, SPLIT, self.steps, start=self.start, scenes=self.scenes,
                         batch_size=cfg.trainer.get("eval_batch_size"), device=device, dtype=dtype)
        text = json.dumps(summarize(result, self.steps))
        return json.loads(runtime.broadcast_text(text, device=collective_device))


def summarize(result: Rollout, steps: int) -> dict[str, float]:
    """A rollout's validation numbers (module docstring); ``steps`` = K asked for."""
    done = result.steps
    numbers = dict(val_rollout_mse=float(np.mean(result.mse)) if done == steps else math.inf,
                   val_rollout_baseline_mse=float(np.mean(result.baseline_mse[:done])) if done else math.nan,
                   val_rollout_steps=done)
    if done and not math.isnan(result.outside_share[-1]):
        numbers["val_rollout_outside"] = float(result.outside_share[-1])
    return numbers


def better(record: dict[str, Any], best: dict[str, Any], metric: str) -> bool:
    """Whether an evaluation beats the best so far on ``metric`` (a best without it: nothing saved yet).

    On ``val_rollout_mse`` a rollout that diverged (inf) ranks by the steps it completed, so that a run whose
    every rollout diverges still keeps its furthest-reaching model rather than none; any finished rollout beats
    every diverged one. On ``val_mse`` only a smaller number wins (NaN never does)."""
    def key(numbers: dict[str, Any]) -> tuple[float, ...]:
        value = numbers.get(metric, math.inf)
        if metric == "val_rollout_mse":
            return (value, -numbers.get("val_rollout_steps", 0))
        return (value,)
    return key(record) < key(best)
