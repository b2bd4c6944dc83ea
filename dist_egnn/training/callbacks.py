"""Hooks into the training step: fault injection for drills, memory sampling for soak tests, and yours.

The Trainer calls every callback it was given once the run is accepted (:meth:`Callback.on_start`) and at
fixed points of each optimizer step (``step`` counts the run's steps from 1, across epochs and resumes). Each
hook does nothing by default; override what you need.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from dist_egnn.training.trainer import Trainer


class Callback:
    """Base class: every hook is a no-op."""

    def on_start(self, trainer: "Trainer") -> None:
        """Once the run is accepted (fresh, or resumed from a checkpoint) and config.yaml is written, before
        the first step: nothing a refused launch must leave untouched is changed before this."""

    def after_forward(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """After the forward and the loss, before the backward; returns the loss to back-propagate."""
        return loss

    def after_backward(self, step: int, parameters: Iterable[torch.nn.Parameter]) -> None:
        """After the backward, before the non-finite check and the optimizer step."""

    def after_step(self, trainer: "Trainer", step: int) -> None:
        """After the optimizer step (or the skipped step) and its bookkeeping."""
