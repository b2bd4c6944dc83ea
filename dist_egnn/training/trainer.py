"""Training on one process or many: Adam with an optional learning-rate schedule, weight averaging and gradient
accumulation, early stopping on a validation number (``trainer.select_on``: one-step MSE, or a validation rollout's
mean MSE, dist_egnn.training.validation), test with the best model.

One code path for every launch: ``python launch/train.py`` is one rank holding whole graphs (P = 1);
``deepspeed --num_gpus P launch/train.py distributed.parts=P`` or ``torchrun --nproc-per-node P ...`` puts
one part of every graph on each rank (docs/maths.md §4-5). World size W = P × G: G graph groups of P ranks take
different batches (graph × data parallel). What differs between launches is injected: the communicator
the model uses for its global means and halo (``dist_egnn.parallel``), the rank's data
(``dist_egnn.training.rank_data``), and the engine that combines gradients and writes checkpoints
(``dist_egnn.engines``).

The run directory receives (rank 0 writes):
    config.yaml          the resolved configuration
    metrics.jsonl        one JSON object per evaluation: epoch, train_loss, train_mse, mmd_share (the MMD term's
                         part of train_loss), val_mse, lr, world_size, parts, step_time_s (per batch, mean after
                         the first, warm-up step), comm_time_s (in the model's collectives), edges_per_rank,
                         nodes_per_rank (node rows per step; fewer with dataset.unwired_walls=drop),
                         dropped_edge_fraction, peak_mem_mb, ... (with trainer.val_rollout_steps also
                         val_rollout_mse, val_rollout_baseline_mse, val_rollout_steps, val_rollout_time_s and,
                         with walls, val_rollout_outside: dist_egnn.training.validation); the last line is the test
                         evaluation of the best model and also carries test_mse and, for the same test samples,
                         zero_motion_mse and constant_velocity_mse (dist_egnn.measure.baselines)
    tensorboard/         TensorBoard event files: loss and lr per optimizer step, every evaluation's numbers
    curves.png           train loss, train and validation MSE per evaluation (dist_egnn.training.curves)
                         (with trainer.normalization rms or radius, train_loss and mmd_share are the objective in the
                         model's units, dist_egnn.training.normalization; every MSE stays in the store's units)
    checkpoints/best.pt  the model with the best trainer.select_on (val_mse by default), portable
                         (torch.load(weights_only=True)); with trainer.ema_decay the averaged weights, which every
                         evaluation uses too
    checkpoints/engine/  resume points: model, optimizer, trainer state (epoch, step in the epoch, early
                         stopping, the epoch's running sums, RNG states, the learning-rate schedule, the
                         weight average), each completed by a manifest
                         (config hash, file hashes); written after every evaluation (epoch-NNNNN), every
                         ``trainer.checkpoint_every_steps`` steps and on SIGTERM/SIGINT
                         (epoch-NNNNN-step-SSSSSS); the newest ``trainer.keep_last`` and the best are kept
    checkpoints/diagnostic/  the state before a step whose loss or gradients were NaN/Inf (trainer.nonfinite=stop)

Resuming (``resume=auto``, dist_egnn.training.resume) continues from the newest complete checkpoint, mid-epoch at the
next batch: the batch order is a function of (seed, epoch) and the step index is saved, so a run stopped and
resumed ends with the same parameters and metrics as one that never stopped. Nothing else in training draws
random numbers (the MMD node sample is keyed by (seed, epoch, sample, node)); the global generators are
restored anyway. metrics.jsonl keeps one line per evaluation across resumes (see dist_egnn.training.resume).

Gradient accumulation (``trainer.accumulate`` = k): an optimizer step is k consecutive batches ("micro-batches")
of the epoch's order, each back-propagated with 1/k of its loss, so the step's gradient is the mean of the k
batch losses' gradients: the gradient of one batch of k × batch_size graphs when the graphs have equal node
counts (the loss is a per-node mean within each batch); an epoch's last step may hold fewer. Ranks combine
gradients only at an optimizer step's last micro-batch (DDP ``no_sync``; DeepSpeed's accumulation boundary).
Checkpoints and stops happen between optimizer steps, so a resumed run never starts inside one. The
learning-rate schedule (dist_egnn.training.schedule) and the weight average (dist_egnn.training.ema) advance
after every optimizer step; ``global_step``, ``trainer.steps_per_epoch`` and ``trainer.checkpoint_every_steps``
count optimizer steps, the position in the epoch (``step``, checkpoint tags) counts batches.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from dist_egnn.config import to_container
from dist_egnn.datasets.prefetch import prefetch
from dist_egnn.datasets.prepare import store_identity
from dist_egnn.losses import objective, sample_nodes
from dist_egnn.measure import baselines
from dist_egnn.parallel import runtime
from dist_egnn.training import checkpoint, faults, guard, setup
from dist_egnn.training.callbacks import Callback
from dist_egnn.training.curves import Curves
from dist_egnn.training.device import autocast, memory_mb, synchronize
from dist_egnn.training.ema import EMA
from dist_egnn.training.normalization import NONE, Normalization
from dist_egnn.training.pushforward import Pushforward
from dist_egnn.training.rank_data import RankBatch
from dist_egnn.training.resume import Checkpoints, MetricsLog
from dist_egnn.training.schedule import Schedule
from dist_egnn.training.state import EpochTotals, TrainerState, resumed_totals
from dist_egnn.training.validation import ValidationRollout, better


def hold_walls(pred, graph):
    """The prediction with every wall (``graph.moving`` False) at its input position: walls send messages but
    are never moved, whatever the model's coordinate update gives them."""
    if graph.moving is None:
        return pred
    return pred._replace(pos=torch.where(graph.moving.unsqueeze(-1), pred.pos, graph.pos.to(pred.pos.dtype)))


def forward_loss(engine, communicator, batch: RankBatch, cfg, device: torch.device, dtype: torch.dtype,
                 parts: int, normalization: Normalization = NONE):
    """Forward and loss share of one rank's share of a batch (no backward); the forward in
    ``trainer.precision`` (bf16: under autocast, dist_egnn.training.device), the loss in float32.

    ``parts`` is P of the graph group (1 for one process): the loss share's MMD part is divided by it and
    the engine's ``loss_scale`` undoes its gradient averaging (see dist_egnn.engines.base). Walls are held at
    their input positions (:func:`hold_walls`) and left out of the loss (``losses.objective``). With
    ``trainer.normalization`` rms or radius the model works in scaled units and the loss is computed in them
    (dist_egnn.training.normalization). Returns the loss terms (this rank's shares).
    """
    loss_cfg = cfg.loss
    graph = batch.graph.to(device, dtype)
    communicator.set_halo_plan(None if batch.plan is None else batch.plan.to(device))
    with autocast(device, cfg.trainer.get("precision", "fp32")):       # the loss below stays float32
        pred = normalization.call(engine.model, graph.model_inputs())
    pred = hold_walls(pred, graph)
    selected = None
    if loss_cfg.mmd_samples is not None:         # about M per graph among its moving nodes (walls never count)
        selected = sample_nodes(graph.batch, graph.num_graphs, loss_cfg.mmd_samples * cfg.model.virtual_channels,
                                node_count=torch.as_tensor(batch.moving_nodes, device=device),
                                keys=torch.as_tensor(batch.mmd_keys, device=device))
    scaled = normalization.model_units                  # identity without trainer.normalization
    return objective(scaled(pred.pos), scaled(graph.target), scaled(pred.virtual_pos), graph.batch, graph.num_graphs,
                     mmd_weight=loss_cfg.mmd_weight, mmd_kernel=loss_cfg.mmd_kernel,
                     mmd_sigma=normalization.mmd_sigma(loss_cfg.mmd_sigma, loss_cfg.mmd_kernel),
                     mmd_target=loss_cfg.mmd_target, selected=selected, comm=communicator,
                     total_nodes=float(max(batch.total_moving, 1)), parts=parts, moving=graph.moving)


def train_step(engine, communicator, batch: RankBatch, cfg, device: torch.device, dtype: torch.dtype, parts: int):
    """One plain training step (forward, loss share, backward, optimizer step), as the scaling study times
    it; :meth:`Trainer.step` adds the non-finite guard and fault injection. Returns the loss terms."""
    terms = forward_loss(engine, communicator, batch, cfg, device, dtype, parts)
    engine.zero_grad()
    engine.backward(terms.total * engine.loss_scale)
    engine.step()
    return terms


class Trainer:
    """Fits one model on one dataset from what :func:`dist_egnn.training.setup.prepare` made ready; see the
    module docstring for what it writes. ``callbacks`` see every step (fault injection is always one)."""

    def __init__(self, ready: setup.Ready, callbacks: Sequence[Callback] = ()):
        self.cfg, self.run_dir = ready.cfg, ready.run_dir
        rt = ready.runtime
        self.env, self.groups, self.engine_name = rt.env, rt.groups, rt.engine_name
        self.device, self.dtype, self.collective_device = rt.device, rt.dtype, rt.collective_device
        self.is_main = rt.is_main
        self.info, self.data, self.comm, self.engine = ready.info, ready.data, ready.comm, ready.engine
        self.normalization = ready.normalization
        self.lock = ready.lock
        self.progress = self.cfg.trainer.progress and self.is_main
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.checkpoints = Checkpoints(self.engine, self.run_dir, to_container(self.cfg), self.cfg.trainer.keep_last,
                                       self.is_main, self.collective_device, store=store_identity(self.info))
        self.state = TrainerState()
        self.totals = EpochTotals()                  # this rank's running epoch sums (see train_epoch)
        self.signals = guard.StopSignals()
        self.callbacks = [faults.Injector(self.env.rank), *callbacks]
        t = self.cfg.trainer
        self.accumulate = int(t.get("accumulate", 1))
        self.schedule = Schedule.from_config(t, self.engine.optimizer, self.optimizer_steps())
        self.ema = EMA(self.engine.module, t.ema_decay) if t.get("ema_decay") else None
        self.curves = Curves(self.run_dir, self.is_main, t.get("tensorboard", True))
        self.pushforward = Pushforward.from_config(self.cfg, self.data["train"].dataset)
        self.val_rollout = ValidationRollout.from_config(self.cfg, self.info)
        self.select_on = t.get("select_on", "val_mse")

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: str | Path, env: runtime.DistEnv | None = None,
                    callbacks: Sequence[Callback] = ()) -> "Trainer":
        """Set up everything (:func:`dist_egnn.training.setup.prepare`), then the Trainer."""
        return cls(setup.prepare(cfg, run_dir, env), callbacks)

    # -- training -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train with early stopping, then evaluate the best model on the test split; returns the test record.

        Raises guard.Stopped after a stop signal (a checkpoint is written first) and guard.NonFiniteError on
        NaN/Inf with ``trainer.nonfinite=stop`` (after a diagnostic checkpoint). The run directory's lock
        (taken in set-up) is released at the end, whichever way the run ends.
        """
        try:
            self.start()
            with self.signals:
                self.train()
            return self.test()
        finally:
            self.curves.close()
            self.lock.release()

    def train(self) -> None:
        """Epochs from where the state stands until ``trainer.max_epochs`` or early stopping; after each
        evaluating epoch: the record, the best model, a resume point, and the agreed stop verdict."""
        t = self.cfg.trainer
        steps = self.batches_per_epoch()
        first = self.state.epoch + 1
        bar = tqdm(total=(t.max_epochs - first + 1) * steps, initial=self.state.step, desc="training",
                   unit="step", disable=not self.progress)
        for epoch in range(first, t.max_epochs + 1):
            if self.state.stale >= t.patience:
                break
            started = time.perf_counter()
            record = self.train_epoch(epoch, bar)
            self.state.epoch, self.state.step = epoch, 0
            if not self.evaluates(epoch):
                continue
            record = dict(epoch=epoch, **record, **self.validate(), lr=self.schedule.lr(),
                          epoch_time_s=time.perf_counter() - started)
            tag = checkpoint.evaluation_tag(epoch)
            metric = self.select_on
            if better(record, self.state.best, metric):
                self.state.best, self.state.best_tag, self.state.stale = dict(record), tag, 0
                self.save_best(epoch, record)
            else:
                self.state.stale += 1
            self.metrics.write(record)
            self.schedule.after_evaluation(record[metric])
            self.curves.evaluation(self.state.global_step, record)
            manifest = self.save_checkpoint(tag)
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", **{metric: f"{record[metric]:.4g}"},
                            best=f"{self.state.best[metric]:.4g}")
            if self.state.stale >= t.patience:
                bar.write(f"early stop at epoch {epoch}: {metric} has not improved for {self.state.stale} "
                          f"evaluations (to continue, resume=auto with a larger trainer.patience)")
                break
            if runtime.agree([self.signals.received], self.collective_device)[0]:
                raise self.stopped(manifest)
        bar.close()

    def test(self) -> dict[str, Any]:
        """The best model's test MSE, with the zero-motion and constant-velocity MSE of the same test samples,
        added to its validation record and written as metrics.jsonl's last line."""
        self.engine.import_state(checkpoint.load(self.best_path, map_location=self.device)["model"])
        final = dict(self.state.best, test_mse=self.evaluate("test"), **self.references(),
                     best_checkpoint=str(self.best_path))
        self.metrics.write(final)
        self.curves.test(self.state.global_step, final)
        return final

    def references(self) -> dict[str, float]:
        """Test MSE of predicting no motion and constant velocity (α fitted on the training split), over the test
        samples ``test_mse`` covers (dist_egnn.measure.baselines): rank 0 computes, every rank gets them."""
        text = ""
        if self.is_main:
            scores = baselines.score(self.data["train"].dataset, self.data["test"].dataset)
            text = json.dumps({k: scores[k] for k in ("zero_motion_mse", "constant_velocity_mse")})
        return json.loads(runtime.broadcast_text(text, device=self.collective_device))

    def batches_per_epoch(self) -> int:
        """Batches (micro-batches with accumulation) of each training epoch on this rank."""
        t = self.cfg.trainer
        batches = self.data["train"].num_steps(t.batch_size, self.groups.data_parallel)
        return min(batches, t.steps_per_epoch * self.accumulate) if t.steps_per_epoch else batches

    def optimizer_steps(self) -> int:
        """Optimizer steps of the whole run (``trainer.max_epochs`` epochs): the length of a cosine schedule."""
        return -(-self.batches_per_epoch() // self.accumulate) * self.cfg.trainer.max_epochs

    def evaluates(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` ends with an evaluation (and its checkpoint)."""
        return epoch % self.cfg.trainer.eval_every == 0 or epoch == self.cfg.trainer.max_epochs

    def train_epoch(self, epoch: int, bar: tqdm) -> dict[str, Any]:
        """One pass over the training split, from step ``state["step"]`` (> 0 when resuming mid-epoch);
        returns the epoch's training record (global over ranks)."""
        t, g, k = self.cfg.trainer, self.groups, self.accumulate
        self.engine.train()
        data = self.data["train"]
        batch_ids = data.batch_ids(t.batch_size, shuffle=True, seed=t.seed, epoch=epoch, group=g.data_index,
                                   groups=g.data_parallel, equal_steps=True)
        batch_ids = batch_ids[:t.steps_per_epoch * k] if t.steps_per_epoch else batch_ids
        runtime.check_same_batches(batch_ids, g.graph, self.collective_device, what=f"epoch {epoch}")
        if self.state.step == 0:
            self.totals = EpochTotals()
        self.comm.stats.reset()                      # not the evaluation's collectives
        warm_up = True                               # the first step of a process's epoch loop is not timed
        stop = window_skipped = False
        window_loss = 0.0
        batches = data.batches(batch_ids[self.state.step:], seed=t.seed, epoch=epoch)
        for batch in prefetch(batches, self.cfg.dataset.prefetch):
            index = self.state.step                  # this batch in the epoch; its optimizer step starts at `start`
            start = index - index % k                # (resume points lie between optimizer steps: index % k == 0)
            window = min(k, len(batch_ids) - start)  # micro-batches of this optimizer step (fewer at the epoch's end)
            boundary = index + 1 == start + window
            if index == start:
                window_skipped, window_loss = False, 0.0
            started = time.perf_counter()
            if window_skipped:                       # NaN/Inf earlier in this optimizer step (nonfinite=skip)
                terms, skipped = None, True
                stopping = runtime.agree([self.signals.received], self.collective_device)[0]
            else:
                terms, skipped, stopping = self.step(batch, epoch, window, first=index == start, boundary=boundary)
            synchronize(self.device)                 # CUDA is asynchronous: time the work, not its launch
            seconds = time.perf_counter() - started
            comm_seconds = self.comm.stats.reset().seconds
            self.state.step += 1
            self.state.skipped += skipped
            stop, window_skipped = stop or stopping, window_skipped or skipped
            loss, mse, mmd = (0.0, 0.0, 0.0) if skipped else (
                terms.total.item(), self.normalization.original_mse(terms.mse.item()), self.mmd_part(terms))
            window_loss += loss
            self.totals.add(loss=loss, mse=mse, mmd=mmd, edges=batch.num_edges, full_edges=batch.full_edges,
                            skipped=skipped, comm_seconds=comm_seconds, nodes=len(batch.graph.pos))
            if warm_up:
                self.totals.add(warm_seconds=seconds, warm_steps=1)
            else:
                self.totals.add(timed_seconds=seconds, timed_steps=1)
            warm_up = False
            bar.update(1)
            if not boundary:
                continue
            self.state.global_step += 1
            lr = self.schedule.lr()
            if self.ema is not None and not window_skipped:
                self.ema.update()
            self.schedule.after_step()
            self.log_step(window_loss, 0 if window_skipped else window, lr)
            for callback in self.callbacks:
                callback.after_step(self, self.state.global_step)
            every = t.checkpoint_every_steps
            last_before_evaluation = self.state.step == len(batch_ids) and self.evaluates(epoch)
            if stop or (every and self.state.global_step % every == 0 and not last_before_evaluation):
                manifest = self.save_checkpoint(checkpoint.step_tag(epoch, self.state.step))
                if stop:
                    raise self.stopped(manifest)
        record = self.epoch_record(self.totals, len(batch_ids))
        if self.pushforward is not None:
            record["pushforward_share"] = self.pushforward.planned_share(batch_ids, epoch)
        return record

    def step(self, batch: RankBatch, epoch: int, window: int = 1, first: bool = True, boundary: bool = True):
        """Forward, loss share, backward, the agreed non-finite/stop verdict, and the optimizer step of this
        rank's share of one batch: micro-batch of an optimizer step of ``window`` micro-batches, the step's
        ``first`` (gradients zeroed) and/or last (``boundary``: gradients combined across ranks, optimizer step).
        Returns (loss terms, whether the batch was skipped, whether to stop)."""
        number = self.state.global_step + 1
        if self.pushforward is not None:                # inputs from the model's own rollout (drawn batches)
            batch = self.pushforward.apply(batch, epoch, self.state.step, self.predict)
        with self.engine.accumulating(boundary):
            terms = forward_loss(self.engine, self.comm, batch, self.cfg, self.device, self.dtype, self.groups.parts,
                                 self.normalization)
            for callback in self.callbacks:
                terms.total = callback.after_forward(number, terms.total)
            if first:
                self.engine.zero_grad()
            self.engine.backward(terms.total * self.engine.loss_scale, window)
        for callback in self.callbacks:
            callback.after_backward(number, self.engine.module.parameters())
        loss_bad, bad_grads = guard.nonfinite(terms.total, self.engine.module.named_parameters())
        loss_bad, grads_bad, stop = runtime.agree([loss_bad, bad_grads, self.signals.received], self.collective_device)
        if loss_bad or grads_bad:
            if self.cfg.trainer.nonfinite == "stop":
                self.stop_nonfinite(epoch, batch, terms, loss_bad, grads_bad, bad_grads)
            self.engine.zero_grad()
            return terms, True, stop
        if boundary:
            self.engine.step()
        return terms, False, stop

    def mmd_part(self, terms) -> float:
        """This rank's share of the weighted MMD term in the loss (λ · MMD / P; 0 without the term)."""
        if terms.mmd is None:
            return 0.0
        return float(terms.mmd.detach()) * float(self.cfg.loss.mmd_weight) / self.groups.parts

    def log_step(self, window_loss: float, batches: int, lr: float) -> None:
        """TensorBoard's per-step scalars: the loss of one device (the shares summed over ranks, averaged over the
        graph groups and the step's micro-batches) and the step's lr. Every rank takes part (one small
        all-reduce); ``batches`` (0 for a skipped step: nothing logged) is the same on every rank."""
        if not self.cfg.trainer.get("tensorboard", True) or not batches:
            return
        loss = runtime.all_reduce_numbers([window_loss], "sum", device=self.collective_device)[0]
        self.curves.step(self.state.global_step, loss=loss / (batches * self.groups.data_parallel), lr=lr)

    def epoch_record(self, totals: EpochTotals, steps: int) -> dict[str, Any]:
        """The epoch's training record: SUM fields summed over ranks into global numbers, the per-rank times,
        edges and memory as their maximum over ranks (the slowest rank sets the pace)."""
        g = self.groups
        loss, mse, edges, full, mmd = runtime.all_reduce_numbers(
            [totals.loss, totals.mse, totals.edges, totals.full_edges, totals.mmd], "sum",
            device=self.collective_device)
        skipped = int(totals.skipped)
        memory = memory_mb(self.device)
        step_max, edges_max, nodes_max, comm_max, *memory_max = runtime.all_reduce_numbers(
            [totals.mean_step_seconds(), totals.edges / max(steps, 1), totals.nodes / max(steps, 1),
             totals.comm_seconds / max(steps, 1), *memory.values()], "max", device=self.collective_device)
        batches = max(steps - skipped, 1) * g.data_parallel
        return dict(train_loss=loss / batches, train_mse=mse / batches, mmd_share=mmd / loss if loss else 0.0,
                    world_size=self.env.world_size,
                    parts=self.cfg.distributed.parts, halo=self.cfg.distributed.halo, engine=self.engine_name,
                    step_time_s=step_max, comm_time_s=comm_max, edges_per_rank=edges_max, nodes_per_rank=nodes_max,
                    dropped_edge_fraction=1.0 - edges / max(full / g.parts, 1.0), **dict(zip(memory, memory_max)),
                    skipped_steps=skipped, precision=self.cfg.trainer.get("precision", "fp32"),
                    device=self.device.type)

    def validate(self) -> dict[str, float]:
        """The validation numbers of the weights evaluations use (the average with trainer.ema_decay): val_mse and,
        with trainer.val_rollout_steps, the validation rollout's (dist_egnn.training.validation)."""
        with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
            numbers = dict(val_mse=self.evaluate("val"))
            if self.val_rollout is not None:
                started = time.perf_counter()
                numbers.update(self.val_rollout.score(self.rollout_model, self.cfg, self.info, self.device,
                                                      self.dtype, self.collective_device))
                numbers["val_rollout_time_s"] = time.perf_counter() - started
        return numbers

    def rollout_model(self, **inputs):
        """The model as a rollout calls it (``dist_egnn.inference.rollout``): inputs and prediction in the store's
        units, in ``trainer.precision``; evaluation mode is set by :meth:`evaluate`, which runs first."""
        with autocast(self.device, self.cfg.trainer.get("precision", "fp32")):
            return self.normalization.call(self.engine.model, inputs)

    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """MSE over every moving node (walls left out) and coordinate of a split, whole graphs (not a mean of
        batch means)."""
        self.engine.eval()
        g = self.groups
        data = self.data[split]
        squared, count = 0.0, 0
        batch_ids, scored = data.eval_batch_ids(self.cfg.trainer.eval_batch_size, group=g.data_index,
                                                groups=g.data_parallel)
        for index, batch in enumerate(prefetch(data.batches(batch_ids), self.cfg.dataset.prefetch)):
            graph = batch.graph.to(self.device, self.dtype)
            pred = self.predict(graph, batch.plan)   # every group runs as many forwards; each sample scored once
            if index >= scored:
                continue
            error = pred - graph.target
            if graph.moving is not None:
                error = error[graph.moving]
            squared += error.double().square().sum().item()
            count += error.numel()
        squared, count = runtime.all_reduce_numbers([squared, count], "sum", device=self.collective_device)
        return squared / count

    @torch.no_grad()
    def predict(self, graph, plan=None) -> torch.Tensor:
        """The model's positions (N, 3) for one batch's graph (this rank's share, halo ``plan``), walls held, in
        ``trainer.precision``, without gradient: what evaluations score and pushforward feeds back."""
        graph = graph.to(self.device, self.dtype)
        self.comm.set_halo_plan(None if plan is None else plan.to(self.device))
        with autocast(self.device, self.cfg.trainer.get("precision", "fp32")):
            pred = self.normalization.call(self.engine.model, graph.model_inputs())
        return hold_walls(pred, graph).pos

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_best(self, epoch: int, record: dict[str, Any]) -> None:
        """The portable best model (rank 0 writes; every rank takes part when the engine shards weights): the
        weight average with trainer.ema_decay, the evaluation's validation numbers (``val_mse``, and
        ``val_rollout_mse`` with a validation rollout) and ``selected_on`` (trainer.select_on). With
        trainer.normalization the statistics it was trained with (``normalization``), which
        ``dist_egnn.load_model`` applies."""
        state = self.engine.export_state() if self.ema is None else self.ema.state_dict(self.engine)
        if self.is_main:
            extra = dict(normalization=self.normalization.state_dict()) if self.normalization.active else {}
            numbers = {k: v for k, v in record.items() if k == "val_mse" or k.startswith("val_rollout_")}
            checkpoint.save_atomic(dict(model=state, epoch=epoch, **numbers, selected_on=self.select_on,
                                        config=to_container(self.cfg), schema_version=checkpoint.SCHEMA_VERSION,
                                        **extra), self.best_path)
        runtime.barrier()

    def start(self) -> None:
        """A fresh run or ``resume=auto`` (dist_egnn.training.resume); then rank 0 writes config.yaml and the
        callbacks' :meth:`~dist_egnn.training.callbacks.Callback.on_start` run."""
        client = self.checkpoints.start(self.cfg.get("resume"), self.metrics, check=self.check_resumable)
        if client is not None:
            self.restore(client)
            if self.is_main:
                print(f"resumed from {self.checkpoints.resumed} {self.position()}", flush=True)
        self.curves.open(resumed_at=self.state.global_step + 1 if client is not None else None)
        if self.is_main:
            checkpoint.write_text_atomic(OmegaConf.to_yaml(to_container(self.cfg)), self.run_dir / "config.yaml")
        for callback in self.callbacks:
            callback.on_start(self)

    def save_checkpoint(self, tag: str, **details) -> Path:
        """A resume point at the current position (every rank calls it); returns its manifest path."""
        return self.checkpoints.save(tag, (self.state.epoch, self.state.step), self.client_state(),
                                     metrics_lines=self.metrics.lines, keep=[self.state.best_tag], **details)

    def client_state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint: position, early stopping, every rank's running epoch sums
        (gathered: rows by rank), RNG states, what the sums depend on (world size, graph groups), the
        learning-rate schedule and, with trainer.ema_decay, the weight average (a full model state dict)."""
        totals = self.totals.to_array()
        rows = runtime.all_gather_arrays(totals, None, self.collective_device) if self.env.distributed else [totals]
        client = dict(schema_version=checkpoint.SCHEMA_VERSION, trainer=self.state.as_dict(),
                      totals=torch.as_tensor(np.stack(rows)), world_size=self.env.world_size,
                      data_parallel=self.groups.data_parallel, rng=checkpoint.rng_state(),
                      config_hash=self.checkpoints.hash, schedule=self.schedule.state_dict())
        if self.ema is not None:
            client["ema"] = self.ema.state_dict(self.engine)
        return client

    def check_resumable(self, client: dict[str, Any]) -> None:
        """A mid-epoch checkpoint needs the same graph groups: they decide which batches each rank takes. Weight
        averaging and a schedule need their state in the checkpoint."""
        if self.ema is not None and "ema" not in client:
            raise checkpoint.CheckpointError(
                f"{self.checkpoints.resumed}: written without weight averaging, but trainer.ema_decay="
                f"{self.cfg.trainer.ema_decay} asks to continue one: resume without trainer.ema_decay, or start a "
                f"new run directory")
        if self.schedule.active and "schedule" not in client:
            raise checkpoint.CheckpointError(
                f"{self.checkpoints.resumed}: written without a learning-rate schedule, but trainer.scheduler="
                f"{self.cfg.trainer.scheduler} (trainer.warmup_steps={self.cfg.trainer.warmup_steps}) asks to "
                f"continue one: resume with the run's own settings, or start a new run directory")
        if client["trainer"]["step"] and client["data_parallel"] != self.groups.data_parallel:
            raise checkpoint.CheckpointError(
                f"{self.checkpoints.resumed}: written mid-epoch with {client['data_parallel']} graph groups "
                f"(world size / distributed.parts), this launch has {self.groups.data_parallel}, so the epoch's "
                f"batches differ: resume with {client['data_parallel']} graph groups, or delete the step "
                f"checkpoints (and their .json) written after the last evaluation")

    def restore(self, client: dict[str, Any]) -> None:
        """Undo :meth:`client_state` (every rank). Mid-epoch, the running sums continue on the rank that
        had them (same world size) or on rank 0 (another world size: equal up to rounding; :func:`resumed_totals`)."""
        self.state = TrainerState.from_dict(client["trainer"])
        self.totals = resumed_totals(client["totals"].numpy(), self.env.rank, self.env.world_size)
        checkpoint.set_rng_state(client["rng"])
        if "schedule" in client:
            self.schedule.load_state_dict(client["schedule"])
        if self.ema is not None:
            self.ema.load_state_dict(self.engine, client["ema"])

    def position(self) -> str:
        """Where training stands, in words: "in epoch 3 after step 2" or "after epoch 2"."""
        epoch, step = self.state.epoch, self.state.step
        where = f"in epoch {epoch + 1} after step {step}" if step else f"after epoch {epoch}"
        return f"{where} (global step {self.state.global_step})"

    def stopped(self, manifest: Path) -> guard.Stopped:
        who = self.signals.received or "a stop signal on another rank"
        return guard.Stopped(f"stopped by {who} {self.position()}: checkpoint {manifest.with_suffix('')} written; "
                             f"continue with resume=auto (hydra.run.dir={self.run_dir})")

    def stop_nonfinite(self, epoch: int, batch: RankBatch, terms, loss_bad: bool, grads_bad: bool,
                       bad_grads: list[str]) -> None:
        """Write the state before this step to checkpoints/diagnostic/ and raise guard.NonFiniteError."""
        what = " and ".join(["loss"] * loss_bad + ["gradients"] * grads_bad)
        step = self.state.step + 1
        tag = f"nonfinite-{checkpoint.step_tag(epoch, step)}"
        manifest = self.checkpoints.save(
            tag, (self.state.epoch, self.state.step), self.client_state(), metrics_lines=self.metrics.lines,
            diagnostic=True, reason=f"non-finite {what}", epoch=epoch, step=step,
            global_step=self.state.global_step + 1, samples=list(batch.sample_ids),
            loss_share=float(terms.total.detach()), nonfinite_gradients=bad_grads[:50])
        raise guard.NonFiniteError(
            f"non-finite {what} at epoch {epoch}, step {step} (global step {self.state.global_step + 1}, batch "
            f"samples {list(batch.sample_ids)[:10]}): the model and optimizer before this step are in "
            f"{manifest.with_suffix('')} (details in {manifest.name}); lower trainer.lr, check the data, or set "
            f"trainer.nonfinite=skip to skip such steps")
