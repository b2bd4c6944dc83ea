"""Single-process training: Adam, early stopping on validation MSE, test with the best model.

The run directory receives:
    config.yaml        the resolved configuration
    metrics.jsonl      one JSON object per evaluation: epoch, train_loss, train_mse, val_mse, ...; the
                       last line is the test evaluation of the best model and also carries test_mse
    checkpoints/best.pt  the model with the best validation MSE (written atomically)
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from datasets.loader import GraphBatch, TrajectoryDataset
from datasets.prefetch import prefetch
from datasets.prepare import prepare_dataset
from datasets.store import StoreInfo, open_store
from dist_egnn import checkpoint
from dist_egnn.config import check, to_container
from dist_egnn.keys import SPLITS
from dist_egnn.losses import objective, sample_nodes
from dist_egnn.models import EGNN, FastEGNN

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


def load_splits(cfg: DictConfig, info: StoreInfo) -> dict[str, TrajectoryDataset]:
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


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and flushes it to disk at once."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class Trainer:
    """Fits one model on one dataset in this process; see the module docstring for what it writes."""

    def __init__(self, cfg: DictConfig, run_dir: str | Path):
        check(cfg)
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t = cfg.trainer
        torch.set_num_threads(t.num_threads or os.cpu_count() or 1)
        self.device = torch.device(t.device)
        self.dtype = DTYPES[t.dtype]
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_container(cfg)))

        self.info = open_dataset_store(cfg.dataset, progress=t.progress)
        self.data = load_splits(cfg, self.info)
        torch.manual_seed(t.seed)
        self.model = build_model(cfg.model).to(self.device, self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.mmd_generator = torch.Generator().manual_seed(t.seed)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.best_path = self.run_dir / "checkpoints" / "best.pt"

    # ------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train with early stopping, then evaluate the best model on the test split."""
        t = self.cfg.trainer
        steps_per_epoch = self.data["train"].num_batches(t.batch_size)
        bar = tqdm(total=t.max_epochs * steps_per_epoch, desc="training", unit="step", disable=not t.progress)
        best = {"val_mse": float("inf"), "epoch": 0}
        stale = 0
        for epoch in range(1, t.max_epochs + 1):
            started = time.perf_counter()
            train_loss, train_mse = self.train_epoch(epoch, bar)
            if epoch % t.eval_every and epoch != t.max_epochs:
                continue
            val_mse = self.evaluate("val")
            record = dict(epoch=epoch, train_loss=train_loss, train_mse=train_mse, val_mse=val_mse,
                          epoch_time_s=time.perf_counter() - started)
            if val_mse < best["val_mse"]:
                best, stale = dict(record), 0
                checkpoint.save_atomic(dict(model=self.model.state_dict(), epoch=epoch, val_mse=val_mse,
                                            config=to_container(self.cfg)), self.best_path)
            else:
                stale += 1
            self.metrics.write(record)
            bar.set_postfix(loss=f"{train_loss:.4g}", val_mse=f"{val_mse:.4g}", best=f"{best['val_mse']:.4g}")
            if stale >= t.patience:
                bar.write(f"early stop at epoch {epoch}: val MSE has not improved for {stale} evaluations")
                break
        bar.close()

        self.model.load_state_dict(checkpoint.load(self.best_path)["model"])
        final = dict(best, test_mse=self.evaluate("test"), best_checkpoint=str(self.best_path))
        self.metrics.write(final)
        return final

    def train_epoch(self, epoch: int, bar: tqdm) -> tuple[float, float]:
        """One pass over the training split; returns the mean loss and mean MSE over its batches."""
        t, loss_cfg = self.cfg.trainer, self.cfg.loss
        self.model.train()
        losses, mses = [], []
        for batch in prefetch(self.data["train"].batches(t.batch_size, shuffle=True, seed=t.seed, epoch=epoch), self.cfg.dataset.prefetch):
            batch = batch.to(self.device, self.dtype)
            pred = self.model(**batch.model_inputs())
            selected = sample_nodes(batch.batch, batch.num_graphs,
                                    None if loss_cfg.mmd_samples is None
                                    else loss_cfg.mmd_samples * self.cfg.model.virtual_channels,
                                    generator=self.mmd_generator)
            terms = objective(pred.pos, batch.target, pred.virtual_pos, batch.batch, batch.num_graphs,
                              mmd_weight=loss_cfg.mmd_weight, mmd_sigma=loss_cfg.mmd_sigma,
                              mmd_kernel=loss_cfg.mmd_kernel, mmd_target=loss_cfg.mmd_target,
                              selected=None if selected is None else selected.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            self.optimizer.step()
            losses.append(terms.total.item())
            mses.append(terms.mse.item())
            bar.update(1)
        return float(np.mean(losses)), float(np.mean(mses))

    @torch.no_grad()
    def evaluate(self, split: str) -> float:
        """MSE over every node and coordinate of a split (not a mean of batch means)."""
        self.model.eval()
        squared, count = 0.0, 0
        for batch in prefetch(self.data[split].batches(self.cfg.trainer.eval_batch_size, shuffle=False), self.cfg.dataset.prefetch):
            batch: GraphBatch = batch.to(self.device, self.dtype)
            pred = self.model(**batch.model_inputs())
            squared += (pred.pos - batch.target).double().square().sum().item()
            count += batch.target.numel()
        return squared / count
