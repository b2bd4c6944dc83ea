"""Training on one process or many: Adam, early stopping on validation MSE, test with the best model.

One code path for every launch: ``python launch/train.py`` is one rank holding whole graphs (P = 1);
``deepspeed --num_gpus P launch/train.py distributed.parts=P`` or ``torchrun --nproc-per-node P ...`` puts
one part of every graph on each rank (SPEC §4-5). World size W = P × G: G graph groups of P ranks take
different batches (graph × data parallel). What differs between launches is injected: the communicator
the model uses for its global means and halo (``dist_egnn.comm``), the rank's data (``dist_egnn.rank_data``),
and the engine that combines gradients and writes checkpoints (``dist_egnn.engines``).

The run directory receives (rank 0 writes):
    config.yaml          the resolved configuration
    metrics.jsonl        one JSON object per evaluation: epoch, train_loss, train_mse, val_mse, world_size,
                         parts, step_time_s (mean after the first, warm-up step), comm_time_s (in the
                         model's collectives), edges_per_rank, dropped_edge_fraction, peak_mem_mb, ...; the
                         last line is the test evaluation of the best model and also carries test_mse
    checkpoints/best.pt  the model with the best validation MSE, portable (torch.load(weights_only=True))
    checkpoints/engine/  the engine's checkpoints of each evaluation (model, optimizer, trainer state),
                         tagged epoch-NNNNN; ``resume=auto`` continues from the newest
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from datasets.prefetch import prefetch
from datasets.prepare import prepare_dataset
from datasets.store import StoreInfo, open_store
from dist_egnn import checkpoint, comm
from dist_egnn.config import check, to_container
from dist_egnn.engines import build_engine, resolve_engine
from dist_egnn.keys import SPLITS
from dist_egnn.losses import objective, sample_nodes
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.rank_data import RankBatch, RankData
from partitioners.artifacts import StalePartitionError, load_assignments, partition_status, prepare_partitions

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build_model(model_cfg: DictConfig | Any) -> torch.nn.Module:
    """EGNN or FastEGNN from the ``model`` config group."""
    common = dict(node_features=model_cfg.node_features, edge_features=model_cfg.edge_features,
                  node_attrs=model_cfg.node_attrs, hidden=model_cfg.hidden, layers=model_cfg.layers,
                  edge_chunk_size=model_cfg.edge_chunk_size)
    if model_cfg.name == "egnn":
        return EGNN(**common)
    if model_cfg.name == "fastegnn":
        return FastEGNN(virtual_channels=model_cfg.virtual_channels, **common)
    raise ValueError(f"model.name={model_cfg.name!r}: choose egnn or fastegnn")


def open_dataset_store(dataset_cfg: DictConfig, progress: bool = True) -> StoreInfo:
    """Open (and on first use create) the dataset's store, validated."""
    path = Path(dataset_cfg.store)
    if not path.exists() and dataset_cfg.auto_prepare:
        print(f"dataset store {path} not found: preparing it now (set dataset.auto_prepare=false to disable)")
        prepare_dataset(OmegaConf.to_container(dataset_cfg, resolve=True), path, progress=progress)
    return open_store(path, check_values=dataset_cfg.check_values)


def load_splits(cfg: DictConfig, info: StoreInfo):
    """The train/val/test ``TrajectoryDataset`` of the configured dataset."""
    from datasets.loader import TrajectoryDataset

    d = cfg.dataset
    missing = [n for n in d.node_features if n != "speed" and n not in info.node_scalars]
    if missing:
        raise ValueError(f"dataset.node_features names {missing}, which store {info.path} does not hold "
                         f"(its node scalars: {info.node_scalars}); fix dataset.node_features")
    return {split: TrajectoryDataset(info, split, delta_t=d.delta_t, frame_start=d.frame_start,
                                     frame_stop=d.frame_stop, frame_stride=d.frame_stride,
                                     node_features=list(d.node_features), edge_features=list(d.edge_features),
                                     radius=d.radius, max_neighbors=d.max_neighbors,
                                     cutoff_rate=cfg.model.cutoff_rate)
            for split in SPLITS}


def thread_share(env: comm.DistEnv, requested: int | None) -> int:
    """Threads of this rank: as asked, else the machine's cores divided among the ranks on this node."""
    return requested or max(1, (os.cpu_count() or 1) // env.local_world_size)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA allocator peak on GPU, resident set size peak (RSS) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux reports KiB


def train_step(engine, communicator, batch: RankBatch, cfg, device: torch.device, dtype: torch.dtype, parts: int):
    """One training step of one rank's share of a batch: forward, loss share, backward, optimizer step.

    ``parts`` is P of the graph group (1 for one process): the loss share's MMD part is divided by it and
    the engine's ``loss_scale`` undoes its gradient averaging (see dist_egnn.engines.base). Returns the
    loss terms (this rank's shares).
    """
    loss_cfg = cfg.loss
    graph = batch.graph.to(device, dtype)
    if hasattr(communicator, "set_halo_plan"):
        communicator.set_halo_plan(None if batch.plan is None else batch.plan.to(device))
    pred = engine.model(**graph.model_inputs())
    selected = None
    if loss_cfg.mmd_samples is not None:
        selected = sample_nodes(graph.batch, graph.num_graphs, loss_cfg.mmd_samples * cfg.model.virtual_channels,
                                node_count=torch.as_tensor(batch.graph_nodes, device=device),
                                keys=torch.as_tensor(batch.mmd_keys, device=device))
    terms = objective(pred.pos, graph.target, pred.virtual_pos, graph.batch, graph.num_graphs,
                      mmd_weight=loss_cfg.mmd_weight, mmd_sigma=loss_cfg.mmd_sigma, mmd_kernel=loss_cfg.mmd_kernel,
                      mmd_target=loss_cfg.mmd_target, selected=selected, comm=communicator,
                      total_nodes=float(batch.total_nodes), parts=parts)
    engine.zero_grad()
    engine.backward(terms.total * engine.loss_scale)
    engine.step()
    return terms


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and flushes it to disk at once (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Trainer:
    """Fits one model on one dataset; see the module docstring for what it writes."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path, env: comm.DistEnv | None = None):
        check(cfg)
        self.cfg = cfg
        t, d = cfg.trainer, cfg.distributed
        self.env = env or comm.DistEnv.from_environ()
        comm.check_world(self.env.world_size, d.parts)
        self.engine_name = resolve_engine(cfg.engine.name, self.env.world_size)
        if self.engine_name == "deepspeed" and t.dtype == "float64":
            raise ValueError("trainer.dtype=float64: DeepSpeed reduces float32/16 gradients only; use "
                             "trainer.dtype=float32, or engine=ddp under torchrun for float64")
        if self.engine_name in ("ddp", "fsdp") and not self.env.distributed:
            raise ValueError(f"engine={self.engine_name} needs a multi-process launch (torchrun --nproc-per-node P "
                             f"launch/train.py ...); for one process use engine=plain or engine=auto")
        self.is_main = self.env.rank == 0
        self.device = torch.device(t.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.env.local_rank)
            torch.cuda.set_device(self.device)
        self.dtype = DTYPES[t.dtype]
        torch.set_num_threads(thread_share(self.env, t.num_threads))
        backend = d.backend if d.backend != "auto" else comm.default_backend(self.device)
        self.groups = comm.init_groups(self.env, d.parts, backend, d.timeout_s)
        self.collective_device = self.device if backend == "nccl" else torch.device("cpu")

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_container(cfg)))
        self.progress = t.progress and self.is_main

        self.info, splits = self.open_data()
        self.data = self.rank_data(splits)
        torch.manual_seed(t.seed)
        model = build_model(cfg.model).to(self.device, self.dtype)
        self.comm = self.groups.communicator()
        model.set_comm(self.comm)
        self.engine = build_engine(self.engine_name, model,
                                   lambda params: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay),
                                   cfg, self.groups)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self.best_path = self.run_dir / "checkpoints" / "best.pt"
        self.engine_dir = self.run_dir / "checkpoints" / "engine"
        self.state = dict(epoch=0, best=dict(val_mse=float("inf"), epoch=0), stale=0)

    # -- data -----------------------------------------------------------------------------------------
    def open_data(self):
        """The store and its splits; in a multi-rank run, rank 0 prepares what is missing while others wait."""
        d = self.cfg.dataset
        if self.env.distributed and not Path(d.store).exists():
            if self.is_main:
                open_dataset_store(d, progress=self.progress)
            comm.barrier(self.cfg.distributed.prepare_timeout_s)
        info = open_dataset_store(d, progress=self.progress)
        return info, load_splits(self.cfg, info)

    def rank_data(self, splits) -> dict[str, RankData]:
        """Each split as this rank sees it: its part of every graph (the stored partition when P > 1)."""
        d = self.cfg.distributed
        if d.parts == 1:
            return {name: RankData(data) for name, data in splits.items()}
        sequential = not self.env.distributed           # one process runs all P parts (drop-mode reference)
        path, digest, stale = partition_status(splits, d.partition, d.parts, d.seed)
        if stale is not None:                       # every rank saw the same answer: no one waits in vain
            if not self.cfg.dataset.auto_prepare:
                raise StalePartitionError(f"{path}: {stale}; build it with `python launch/prepare.py "
                                          f"dataset={self.cfg.dataset.name} distributed.parts={d.parts} "
                                          f"distributed.partition={d.partition} distributed.seed={d.seed}`")
            if self.is_main:
                prepare_partitions(splits, d.partition, d.parts, d.seed, progress=self.progress,
                                   scheduler=self.cfg.prepare.scheduler, workers=self.cfg.prepare.workers)
            comm.barrier(d.prepare_timeout_s)
        # Batches are built ahead in a background thread (datasets.prefetch): their collectives run on a group
        # of their own, so they never interleave with the model's on the graph group.
        group, device = self.groups.data, torch.device("cpu")          # the data group is gloo
        gather = (lambda values: comm.all_gather_arrays(values, group, device)) if group is not None else None
        return {name: RankData(data, self.groups.part, d.parts, d.halo == "exact",
                               load_assignments(path, name, expected_hash=digest), gather=gather, sequential=sequential)
                for name, data in splits.items()}

    # -- training -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train with early stopping, then evaluate the best model on the test split."""
        t = self.cfg.trainer
        self.maybe_resume()
        steps = min(self.data["train"].num_steps(t.batch_size, self.groups.data_parallel),
                    t.steps_per_epoch or float("inf"))
        first = self.state["epoch"] + 1
        bar = tqdm(total=(t.max_epochs - first + 1) * steps, desc="training", unit="step", disable=not self.progress)
        for epoch in range(first, t.max_epochs + 1):
            if self.state["stale"] >= t.patience:
                break
            started = time.perf_counter()
            record = self.train_epoch(epoch, bar)
            self.state["epoch"] = epoch
            if epoch % t.eval_every and epoch != t.max_epochs:
                continue
            record = dict(epoch=epoch, **record, val_mse=self.evaluate("val"),
                          epoch_time_s=time.perf_counter() - started)
            improved = record["val_mse"] < self.state["best"]["val_mse"]
            if improved:
                self.state["best"], self.state["stale"] = dict(record), 0
                self.save_best(epoch, record["val_mse"])
            else:
                self.state["stale"] += 1
            self.metrics.write(record)
            self.engine.save(self.engine_dir, f"epoch-{epoch:05d}", dict(self.state))
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", val_mse=f"{record['val_mse']:.4g}",
                            best=f"{self.state['best']['val_mse']:.4g}")
            if self.state["stale"] >= t.patience:
                bar.write(f"early stop at epoch {epoch}: val MSE has not improved for {self.state['stale']} evaluations")
                break
        bar.close()

        self.engine.import_state(checkpoint.load(self.best_path, map_location=self.device)["model"])
        final = dict(self.state["best"], test_mse=self.evaluate("test"), best_checkpoint=str(self.best_path))
        self.metrics.write(final)
        return final

    def train_epoch(self, epoch: int, bar: tqdm) -> dict[str, Any]:
        """One pass over the training split; returns the epoch's training record (global over ranks)."""
        t, g = self.cfg.trainer, self.groups
        self.engine.train()
        data = self.data["train"]
        batch_ids = data.batch_ids(t.batch_size, shuffle=True, seed=t.seed, epoch=epoch, group=g.data_index,
                                   groups=g.data_parallel, equal_steps=True)[:t.steps_per_epoch]
        if isinstance(self.comm, comm.GraphParallel):
            self.comm.stats.reset()                  # not the evaluation's collectives
        totals = np.zeros(5)              # loss share, MSE share, edges, full edges, collective seconds (this rank)
        step_times = []
        for batch in prefetch(data.batches(batch_ids, seed=t.seed, epoch=epoch), self.cfg.dataset.prefetch):
            started = time.perf_counter()
            terms = self.step(batch)
            step_times.append(time.perf_counter() - started)
            comm_seconds = self.comm.stats.reset().seconds if isinstance(self.comm, comm.GraphParallel) else 0.0
            totals += [terms.total.item(), terms.mse.item(), batch.num_edges, batch.full_edges, comm_seconds]
            bar.update(1)
        return self.epoch_record(totals, step_times, len(batch_ids))

    def step(self, batch: RankBatch):
        """Forward, loss share, backward and optimizer step of this rank's share of one batch."""
        if isinstance(self.comm, comm.GraphParallel):
            comm.check_same_samples(batch.sample_ids, self.groups.graph, self.collective_device)
        return train_step(self.engine, self.comm, batch, self.cfg, self.device, self.dtype, self.groups.parts)

    def epoch_record(self, totals: np.ndarray, step_times: list[float], steps: int) -> dict[str, Any]:
        """Sum the ranks' shares into global numbers; maxima over ranks for time, edges and memory."""
        g = self.groups
        loss, mse, edges, full = comm.all_reduce_numbers(list(totals[:4]), "sum", device=self.collective_device)
        mean_step = float(np.mean(step_times[1:] or step_times)) if step_times else 0.0   # first step: warm-up
        step_max, edges_max, mem_max, comm_max = comm.all_reduce_numbers(
            [mean_step, totals[2] / max(steps, 1), peak_memory_mb(self.device), totals[4] / max(steps, 1)], "max",
            device=self.collective_device)
        batches = max(steps, 1) * g.data_parallel
        return dict(train_loss=loss / batches, train_mse=mse / batches, world_size=self.env.world_size,
                    parts=self.cfg.distributed.parts, halo=self.cfg.distributed.halo, engine=self.engine_name,
                    step_time_s=step_max, comm_time_s=comm_max, edges_per_rank=edges_max,
                    dropped_edge_fraction=1.0 - edges / max(full / g.parts, 1.0), peak_mem_mb=mem_max)

    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """MSE over every node and coordinate of a split, whole graphs (not a mean of batch means)."""
        self.engine.eval()
        g = self.groups
        data = self.data[split]
        squared, count = 0.0, 0
        batch_ids = data.batch_ids(self.cfg.trainer.eval_batch_size, shuffle=False, seed=0, epoch=0,
                                   group=g.data_index, groups=g.data_parallel)
        for batch in prefetch(data.batches(batch_ids), self.cfg.dataset.prefetch):
            graph = batch.graph.to(self.device, self.dtype)
            if hasattr(self.comm, "set_halo_plan"):
                self.comm.set_halo_plan(None if batch.plan is None else batch.plan.to(self.device))
            pred = self.engine.model(**graph.model_inputs())
            squared += (pred.pos - graph.target).double().square().sum().item()
            count += graph.target.numel()
        squared, count = comm.all_reduce_numbers([squared, count], "sum", device=self.collective_device)
        return squared / count

    # -- checkpoints ----------------------------------------------------------------------------------
    def save_best(self, epoch: int, val_mse: float) -> None:
        """The portable best model (rank 0 writes; every rank takes part when the engine shards weights)."""
        state = self.engine.export_state()
        if self.is_main:
            checkpoint.save_atomic(dict(model=state, epoch=epoch, val_mse=val_mse, config=to_container(self.cfg)),
                                   self.best_path)
        comm.barrier()

    def maybe_resume(self) -> None:
        """``resume=auto``: continue from the engine checkpoint of the latest evaluation, if there is one."""
        mode = self.cfg.get("resume")
        if not mode:
            return
        if mode != "auto":
            raise ValueError(f"resume={mode!r}: only resume=auto is supported")
        tag = self.engine.latest_tag(self.engine_dir)
        if tag is None:
            if self.is_main:
                print(f"resume=auto: no checkpoint in {self.engine_dir}, starting from scratch", file=sys.stderr)
            return
        client = self.engine.load(self.engine_dir, tag)
        self.state.update({k: client[k] for k in ("epoch", "best", "stale") if k in client})
        if self.is_main:
            print(f"resumed from {self.engine_dir} after epoch {self.state['epoch']}")
