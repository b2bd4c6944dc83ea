"""Live and saved curves of a run (rank 0): TensorBoard event files and ``curves.png``.

``<run dir>/tensorboard/`` (``trainer.tensorboard``, on by default) receives, against the optimizer step:

    step/loss, step/lr                    every optimizer step (the loss averaged over the step's micro-batches
                                          and every rank: the loss of one device)
    eval/train_loss, eval/train_mse, eval/val_mse, eval/mmd_share, eval/lr, eval/step_time_s, eval/peak_mem_mb,
    eval/val_rollout_mse, ...
                                          every evaluation (the numbers of its metrics.jsonl line)
    test/test_mse, test/zero_motion_mse, test/constant_velocity_mse
                                          the best model's test evaluation

Open them with ``tensorboard --logdir <run dir>`` (or ``--logdir runs/`` for every run). A resumed run opens
a new event file and tells TensorBoard to drop what the old ones logged after the resume point.

``<run dir>/curves.png``: train loss, train MSE and validation MSE per evaluation (with trainer.val_rollout_steps
also the validation rollout's mean MSE), read back from metrics.jsonl, so across resumes, with the test line's
zero-motion and constant-velocity MSE drawn as references once the run has been tested; rewritten atomically
(never torn) after every evaluation.
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Any

from dist_egnn.training import checkpoint

EVALUATION_SCALARS = ("train_loss", "train_mse", "val_mse", "mmd_share", "lr", "step_time_s", "comm_time_s",
                      "epoch_time_s", "val_rollout_mse", "val_rollout_baseline_mse", "val_rollout_steps",
                      "val_rollout_outside", "val_rollout_time_s")
TEST_SCALARS = ("test_mse", "zero_motion_mse", "constant_velocity_mse")


class Curves:
    """Rank 0's TensorBoard writer and curves.png; every method is a no-op where ``enabled`` is false."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True):
        self.run_dir, self.enabled, self.tensorboard = Path(run_dir), enabled, tensorboard and enabled
        self.writer = None

    @property
    def path(self) -> Path:
        return self.run_dir / "curves.png"

    def open(self, resumed_at: int | None = None) -> None:
        """Start the event file (after the run directory has been accepted: a refused start writes nothing).
        ``resumed_at``: the optimizer step a resumed run continues from (later events of old files are dropped)."""
        if not self.tensorboard or self.writer is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:               # tensorboard is a dependency; a broken install only loses curves
            print(f"warning: no TensorBoard files ({err}); pip install tensorboard, or trainer.tensorboard=false",
                  file=sys.stderr)
            self.tensorboard = False
            return
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resumed_at or None)

    def step(self, step: int, **scalars: float) -> None:
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"step/{name}", value, step)

    def evaluation(self, step: int, record: dict[str, Any]) -> None:
        """After an evaluation (its metrics.jsonl line written): its scalars, then curves.png."""
        if not self.enabled:
            return
        if self.writer is not None:
            for name in (*EVALUATION_SCALARS, *(k for k in record if k.endswith("_mb"))):
                if isinstance(record.get(name), (int, float)):
                    self.writer.add_scalar(f"eval/{name}", record[name], step)
            self.writer.flush()
        self.plot()

    def test(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for name in TEST_SCALARS:
                if isinstance(record.get(name), (int, float)):
                    self.writer.add_scalar(f"test/{name}", record[name], step)
            self.writer.flush()
        self.plot(references={k: record[k] for k in TEST_SCALARS[1:] if k in record})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def plot(self, references: dict[str, float] | None = None) -> None:
        """curves.png from metrics.jsonl's evaluation lines (log scale), written atomically."""
        if not self.enabled:
            return
        log = self.run_dir / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:                       # a line torn by a crash: not an evaluation
                continue
        png = render([r for r in records if "test_mse" not in r and "epoch" in r], references or {},
                     title=f"{self.run_dir.parent.name}/{self.run_dir.name}")
        checkpoint.write_bytes_atomic(png, self.path)


def render(evaluations: list[dict[str, Any]], references: dict[str, float], title: str = "") -> bytes:
    """PNG bytes of the curves (matplotlib's Agg canvas; no global backend is set)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in evaluations]
    values = []
    for key, label, style in (("train_loss", "train loss", "-"), ("train_mse", "train MSE", "--"),
                              ("val_mse", "validation MSE", "-"),
                              ("val_rollout_mse", "validation rollout MSE (mean of its steps)", "-.")):
        ys = [r.get(key) for r in evaluations]
        if ys and all(isinstance(y, (int, float)) for y in ys):
            ys = [y if math.isfinite(y) else math.nan for y in ys]      # a diverged rollout (inf): a gap
            ax.plot(epochs, ys, style, marker="o", markersize=3, label=label)
            values += [y for y in ys if not math.isnan(y)]
    for key, label, colour in (("zero_motion_mse", "zero motion (test)", "grey"),
                               ("constant_velocity_mse", "constant velocity (test)", "black")):
        if key in references:
            ax.axhline(references[key], linestyle=":", color=colour, label=label)
            values.append(references[key])
    if values and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss / MSE")
    ax.set_title(title, fontsize=9)
    if values:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()
