"""What the Trainer keeps between steps: its position and early-stopping state, and the epoch's running sums.

Both travel in every checkpoint (``Trainer.client_state``) as plain data: :class:`TrainerState` as a dict,
:class:`EpochTotals` as one row of numbers per rank, in field order, so checkpoints stay loadable with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class TrainerState:
    """Position and early stopping: identical on every rank."""

    epoch: int = 0                    # epochs completed
    step: int = 0                     # steps done in the next epoch (> 0: stopped mid-epoch)
    global_step: int = 0              # steps of the run, skipped ones included
    best: dict[str, Any] = field(default_factory=lambda: dict(val_mse=float("inf"), epoch=0))  # best evaluation
    best_tag: str | None = None       # the checkpoint of the best evaluation (kept when pruning)
    stale: int = 0                    # evaluations since the best one
    skipped: int = 0                  # steps skipped for NaN/Inf (trainer.nonfinite=skip)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "TrainerState":
        return cls(**saved)


# How the ranks combine a field of EpochTotals, in the epoch record and when a run resumes on another world size.
SUM = "sum"          # a share of a global sum: added over ranks
SAME = "same"        # agreed by every rank (the same value everywhere): taken from any one rank
MAX = "max"          # this rank's own time: the slowest rank is reported


def _total(ranks: str):
    return field(default=0.0, metadata=dict(ranks=ranks))


@dataclass
class EpochTotals:
    """One rank's running sums over the steps of the current epoch; each field says how ranks combine it."""

    loss: float = _total(SUM)              # loss shares
    mse: float = _total(SUM)               # MSE shares
    edges: float = _total(SUM)             # edges this rank computed
    full_edges: float = _total(SUM)        # edges of the whole graphs before any dropping
    skipped: float = _total(SAME)          # skipped steps (agreed)
    comm_seconds: float = _total(MAX)      # seconds in the model's collectives
    timed_seconds: float = _total(MAX)     # wall time of the timed steps (every step but the loop's first)
    timed_steps: float = _total(MAX)
    warm_seconds: float = _total(MAX)      # wall time of each epoch loop's first (warm-up) step
    warm_steps: float = _total(MAX)
    mmd: float = _total(SUM)               # the MMD term's shares of the loss (λ · MMD / P): mmd_share = mmd / loss
    nodes: float = _total(SUM)             # node rows this rank computed (its owned nodes)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def mean_step_seconds(self) -> float:
        """Mean wall time per step, leaving out each epoch loop's first (warm-up) step when there are others."""
        if self.timed_steps:
            return self.timed_seconds / self.timed_steps
        return self.warm_seconds / max(self.warm_steps, 1.0)

    def to_array(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in dataclasses.fields(self)], dtype=np.float64)

    @classmethod
    def from_array(cls, row) -> "EpochTotals":
        return cls(*(float(v) for v in row))         # a shorter row (an older checkpoint): the rest stays 0

    @classmethod
    def names(cls, ranks: str) -> list[str]:
        """The fields combined by rule ``ranks`` (SUM, SAME or MAX)."""
        return [f.name for f in dataclasses.fields(cls) if f.metadata["ranks"] == ranks]


def resumed_totals(saved: np.ndarray, rank: int, world_size: int) -> EpochTotals:
    """This rank's running epoch sums from a checkpoint's (old ranks, fields) rows.

    Same world size: the rank's own row. Another world size: rank 0 takes the sum over the old ranks of
    every SUM field and the maximum of every MAX field; every rank keeps the SAME fields (summing the
    agreed skipped-step count would multiply it by the old world size); the other ranks start from zero.
    """
    saved = np.atleast_2d(saved)
    width = len(dataclasses.fields(EpochTotals))
    if saved.shape[1] < width:                       # written before the later fields existed: they start at 0
        saved = np.pad(saved, ((0, 0), (0, width - saved.shape[1])))
    if saved.shape[0] == world_size:
        return EpochTotals.from_array(saved[rank])
    columns = {f.name: saved[:, i] for i, f in enumerate(dataclasses.fields(EpochTotals))}
    totals = EpochTotals(**{name: float(columns[name][0]) for name in EpochTotals.names(SAME)})
    if rank == 0:
        totals.add(**{name: float(columns[name].sum()) for name in EpochTotals.names(SUM)})
        totals.add(**{name: float(columns[name].max()) for name in EpochTotals.names(MAX)})
    return totals
