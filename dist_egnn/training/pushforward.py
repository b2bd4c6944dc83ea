"""Pushforward training: the loss sees inputs the model made itself, as a rollout feeds them back.

A model trained on one-step MSE only ever sees stored states as inputs. Rolled out, it is fed its own
predictions, whose errors it never learned to correct; on the SPH fluid every one-step model contracts the
fluid a little per step and the contraction compounds (docs/results/README.md). The pushforward trick
(Brandstetter, Worrall and Welling, ICLR 2022; LagrangeBench's ``pushforward`` settings) trains on such inputs:

* a training batch of samples (scene s, input frame t, target t + Δt) is, with probability
  ``trainer.pushforward_prob`` from epoch ``trainer.pushforward_start_epoch`` on, *unrolled* u steps, u drawn
  uniformly from 1 .. ``trainer.pushforward_unrolls``: it starts from the stored state at frame t − u·Δt and the
  model, without gradient, predicts u task steps, each fed back exactly as ``dist_egnn.inference.rollout`` does
  (positions = the prediction, walls held; velocity = the last predicted displacement in the training units;
  the graph rebuilt from the predicted positions by the loader's own ``make_sample``);
* the loss of the batch is then the ordinary one-step loss from that predicted state to the *true* target
  t + Δt, with the gradient through the last step only (the "pushforward" of the error distribution; no
  back-propagation through the unroll, which keeps a step's memory that of one step).

A rolled-forward state that makes no sense is refused and the batch trains on its stored inputs instead (a line
on stderr says so; ``Pushforward.refused`` counts them): NaN/Inf, or a particle moved in one step farther than
``DISPLACEMENT_LIMIT`` (3) times the largest displacement per task step the stored data shows for this batch (its
start state's velocity, its average step from the start to frame t, its true step t -> t + Δt). Measured on the SPH
fluid (docs/results/README.md): a model in its fourth epoch, given a splash where stored particles move 17 m per
task step (p99: 5 m), moved one particle 1,288 m; fed back as its velocity, that input made the loss non-finite
and stopped three of four pushforward runs. Training on such an input teaches nothing a rollout needs.

u is lowered, for the whole batch, to what its samples allow: a start frame before the split's first input
frame is never used (a batch of first frames trains as usual). The draw is a function of (seed, epoch, batch
index) only, so a resumed run unrolls the same batches as one that never stopped. Unrolled batches take no
``trainer.input_noise``: the model's own errors are their noise; their target is the stored frame t + Δt, also
under ``trainer.noise_target=shifted`` (whose shift follows input noise the unrolled batch does not have).

Whole graphs only (``distributed.parts=1``; data parallel over ranks is fine): the stored partitions and halos
were made from the stored frames and do not cover predicted positions (``dist_egnn.config.check`` refuses
the combination).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig

from dist_egnn.datasets.loader import GraphBatch, TrajectoryDataset, collate
from dist_egnn.training.rank_data import RankBatch

DRAW_STREAM = 0x5F  # keeps the unroll draws apart from every other (seed, epoch, ...) stream
DISPLACEMENT_LIMIT = 3.0  # a predicted step beyond this many times the stored data's largest is refused


class Pushforward:
    """Unrolls training batches on the model's own predictions (see the module docstring).

    Args:
        dataset: the training split (whole graphs).
        unrolls: the most task steps a batch is unrolled (>= 1).
        probability: the chance a batch is unrolled at all. start_epoch: the first epoch that unrolls.
        seed: ``trainer.seed``.
    """

    def __init__(self, dataset: TrajectoryDataset, unrolls: int, probability: float, start_epoch: int = 1,
                 seed: int = 0):
        self.dataset, self.unrolls, self.probability = dataset, int(unrolls), float(probability)
        self.start_epoch, self.seed = int(start_epoch), int(seed)
        self.first_frame = int(dataset.frames.min())
        self.refused = 0  # unrolled states refused since this object was made (this process)

    @classmethod
    def from_config(cls, cfg: DictConfig, dataset: TrajectoryDataset) -> "Pushforward | None":
        """The run's pushforward, or None when ``trainer.pushforward_unrolls`` is 0 (off)."""
        t = cfg.trainer
        unrolls = int(t.get("pushforward_unrolls", 0) or 0)
        if unrolls == 0:
            return None
        return cls(dataset, unrolls, t.get("pushforward_prob", 0.5), t.get("pushforward_start_epoch", 1), t.seed)

    def unrolls_for(self, sample_ids, epoch: int, index: int) -> int:
        """Task steps batch ``index`` of ``epoch`` (samples ``sample_ids``) is unrolled: 0 (trained as stored)
        or 1 .. ``unrolls``, lowered to what the batch's earliest input frame allows."""
        if epoch < self.start_epoch:
            return 0
        rng = np.random.default_rng([self.seed, epoch, index, DRAW_STREAM])
        unrolled, drawn = rng.random() < self.probability, int(rng.integers(1, self.unrolls + 1))
        if not unrolled:
            return 0
        earliest = min(self.dataset.locate(i)[1] for i in sample_ids)
        return min(drawn, (earliest - self.first_frame) // self.dataset.delta_t)

    def planned_share(self, batches: list, epoch: int) -> float:
        """The share of an epoch's batches (lists of sample ids, in order) that are unrolled: what the epoch
        record reports (a function of the draw alone, so resumes report the same)."""
        if not batches:
            return 0.0
        return sum(self.unrolls_for(ids, epoch, i) > 0 for i, ids in enumerate(batches)) / len(batches)

    def apply(self, batch: RankBatch, epoch: int, index: int,
              predict: Callable[[GraphBatch], torch.Tensor]) -> RankBatch:
        """``batch`` (whole graphs), or when it is drawn for unrolling the same batch with its inputs the model's
        own u-step prediction and its target kept. ``predict(graph)`` returns the model's positions (N, 3),
        walls held, without gradient. A rolled-forward state that makes no sense (NaN/Inf, or a step beyond
        ``DISPLACEMENT_LIMIT`` times the stored data's largest: see the module docstring) gives back ``batch``
        unchanged, with a line on stderr."""
        steps = self.unrolls_for(batch.sample_ids, epoch, index)
        if steps == 0:
            return batch
        d = self.dataset
        located = [d.locate(i) for i in batch.sample_ids]
        # the start states and, from the input frames' own states, the clean targets: a batch whose noise shifted
        # its target (trainer.noise_target=shifted) keeps no input noise once unrolled, so neither may its target
        read = d.read_states([(scene, frame - steps * d.delta_t) for scene, frame in located] + located)
        states, targets = read[:len(located)], [s[2] for s in read[len(located):]]
        pos = [s[0] for s in states]
        vel = [s[1] for s in states]
        scalars = [s[3] for s in states]
        sizes = np.cumsum([0] + [len(p) for p in pos])
        limit = DISPLACEMENT_LIMIT * self.largest_stored_step(batch, np.concatenate(pos), np.concatenate(vel), steps)
        for k in range(steps, 0, -1):                       # input frames t − k·Δt, k = steps .. 1
            graph = collate([d.make_sample(scene, frame - k * d.delta_t, p, v, p, sc)
                             for (scene, frame), p, v, sc in zip(located, pos, vel, scalars)])
            with torch.no_grad():
                predicted = predict(graph).detach().to("cpu", torch.float32).numpy()
            step = np.linalg.norm(predicted - np.concatenate(pos), axis=1).max(initial=0.0)
            if not np.isfinite(step) or step > limit:
                return self.refuse(batch, epoch, index, steps - k + 1, step, limit)
            new = [predicted[a:b] for a, b in zip(sizes[:-1], sizes[1:])]
            vel = [((n - p) * np.float32(d.per_displacement)).astype(np.float32) for n, p in zip(new, pos)]
            pos = new
        final = collate([d.make_sample(scene, frame, p, v, target, sc)
                         for (scene, frame), p, v, target, sc in zip(located, pos, vel, targets, scalars)])
        return replace(batch, graph=final)

    def largest_stored_step(self, batch: RankBatch, start_pos: np.ndarray, start_vel: np.ndarray,
                            steps: int) -> float:
        """The largest displacement per task step (store units) the stored data shows for a batch unrolled
        ``steps`` steps: the start state's velocity, the average step from the start to the input frame t, and
        the true step from t to the target (moving nodes; walls are at rest)."""
        g = batch.graph
        pos, target = g.pos.numpy(), g.target.numpy()
        moving = np.ones(len(pos), bool) if g.moving is None else g.moving.numpy()
        candidates = [np.linalg.norm(start_vel[moving], axis=1) / self.dataset.per_displacement,
                      np.linalg.norm(pos[moving] - start_pos[moving], axis=1) / steps,
                      np.linalg.norm(target[moving] - pos[moving], axis=1)]
        return float(max(c.max(initial=0.0) for c in candidates))

    def refuse(self, batch: RankBatch, epoch: int, index: int, step: int, moved: float, limit: float) -> RankBatch:
        """``batch`` as stored, counted and said on stderr: its unroll made no sense at unroll step ``step``."""
        self.refused += 1
        what = "a non-finite position" if not np.isfinite(moved) else (
            f"a particle moved {moved:.4g} in one step, more than {DISPLACEMENT_LIMIT:g} x the stored data's "
            f"largest step ({limit / DISPLACEMENT_LIMIT:.4g})")
        print(f"pushforward: epoch {epoch} batch {index} (samples {list(batch.sample_ids)}) unrolled to {what} at "
              f"unroll step {step}; trained on its stored inputs instead", file=sys.stderr, flush=True)
        return batch
