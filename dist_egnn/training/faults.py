"""Fault injection for tests and drills: make a chosen rank fail at a chosen step, through the real paths.

Off unless the environment variable ``DIST_EGNN_FAULTS`` is set, e.g.::

    DIST_EGNN_FAULTS="sigterm@3"            rank 0 sends itself SIGTERM during global step 3
    DIST_EGNN_FAULTS="kill@4:1"             rank 1 SIGKILLs itself during step 4 (mid-step: after the forward)
    DIST_EGNN_FAULTS="hang@4:1"             rank 1 stops responding during step 4 (sleeps)
    DIST_EGNN_FAULTS="nan_loss@2,inf_grad@5"
    DIST_EGNN_FAULTS="sigterm@3,kill@5:1#1"  SIGTERM in step 3 of the first attempt, then rank 1 killed in
                                            step 5 of the second (torchrun --max-restarts=2)

Kinds: ``sigterm``, ``sigint``, ``kill``, ``hang`` fire after the forward of the step (the other ranks are
then inside, or about to enter, the backward's collectives); ``nan_loss`` makes the rank's loss share NaN;
``inf_grad`` puts Inf in one gradient after the backward. Steps count optimizer steps of the run from 1
(global, across epochs and resumes). A fault fires only in its attempt of a torchrun restart loop
(``#N``, default 0: ``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restarted run gets past it. With
``trainer.accumulate`` > 1 a fault fires in the first micro-batch of its optimizer step.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from dist_egnn.errors import BadInput
from dist_egnn.training.callbacks import Callback

KINDS = ("sigterm", "sigint", "kill", "hang", "nan_loss", "inf_grad")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    attempt: int = 0


def planned(environ=os.environ) -> list[Fault]:
    """The faults ``DIST_EGNN_FAULTS`` asks for in this attempt."""
    spec = environ.get("DIST_EGNN_FAULTS", "").strip()
    if not spec:
        return []
    attempt = int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    faults = []
    for item in spec.split(","):
        kind, _, where = item.strip().partition("@")
        where, _, when = where.partition("#")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or not (rank or "0").isdigit() or not (when or "0").isdigit():
            raise BadInput(f"DIST_EGNN_FAULTS={spec!r}: {item!r} is not KIND@STEP[:RANK][#ATTEMPT] "
                           f"with KIND in {KINDS}")
        faults.append(Fault(kind, int(step), int(rank or 0), int(when or 0)))
    return [f for f in faults if f.attempt == attempt]


class Injector(Callback):
    """The trainer's callback for planned faults: its hooks do nothing unless a fault is planned."""

    def __init__(self, rank: int, environ=os.environ):
        self.faults = [f for f in planned(environ) if f.rank == rank]

    def _due(self, step: int, kinds: tuple[str, ...]) -> list[Fault]:
        """The faults of ``step`` among ``kinds``, each fired once (an optimizer step of several micro-batches,
        ``trainer.accumulate``, sees its hooks once per micro-batch)."""
        due = [f for f in self.faults if f.step == step and f.kind in kinds]
        self.faults = [f for f in self.faults if f not in due]
        return due

    def after_forward(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        for fault in self._due(step, ("sigterm", "sigint", "kill", "hang", "nan_loss")):
            announce(fault)
            if fault.kind == "nan_loss":
                loss = loss * float("nan")
            elif fault.kind == "hang":
                while True:                                  # a rank that stopped answering
                    time.sleep(60)
            else:
                os.kill(os.getpid(), {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT,
                                      "kill": signal.SIGKILL}[fault.kind])
        return loss

    def after_backward(self, step: int, parameters) -> None:
        for fault in self._due(step, ("inf_grad",)):
            announce(fault)
            for p in parameters:
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("inf")
                    return


def announce(fault: Fault) -> None:
    """One line on stderr with the wall-clock time, so drills can time what follows."""
    print(f"fault injected: {fault.kind} in step {fault.step} on rank {fault.rank} at {time.time():.3f}",
          file=sys.stderr, flush=True)
