"""What stops a training run early and cleanly: stop signals and non-finite numbers.

* :class:`StopSignals`: SIGTERM or SIGINT (a scheduler's preemption, ``kill``, Ctrl-C, torchrun or the
  deepspeed launcher passing on their own signal) only sets a flag; the trainer finishes the current step,
  writes a checkpoint and raises :class:`Stopped`. A second signal acts at once (Python's default). One
  rank receiving the signal is enough: the flag is agreed across ranks every step (``comm.agree``).
* :func:`nonfinite`: is this rank's loss share NaN/Inf, are any of its gradients? Agreed across ranks the
  same way; the trainer then stops with :class:`NonFiniteError` after a diagnostic checkpoint
  (``trainer.nonfinite=stop``) or skips the optimizer step (``trainer.nonfinite=skip``).

Exit codes of ``launch/train.py``: 0 finished, 2 bad input or configuration, 3 non-finite numbers,
75 stopped by a signal after writing a checkpoint (resume with ``resume=auto``), 1 anything else (a dead
or hung rank makes the others fail within ``distributed.timeout_s``).
"""
from __future__ import annotations

import signal
import threading

import torch

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_STOPPED = 75          # sysexits EX_TEMPFAIL: try again later (resume=auto)
EXIT_RANK_FAILED = 1


class Stopped(Exception):
    """A stop signal was honoured: the run wrote a checkpoint and should be resumed with ``resume=auto``."""


class NonFiniteError(RuntimeError):
    """The loss or the gradients were NaN/Inf with ``trainer.nonfinite=stop``."""


class StopSignals:
    """While active, SIGTERM and SIGINT set :attr:`received` (the signal's name) instead of killing the process.

    The first signal restores the previous handlers, so a second one acts at once. Only the main thread can
    install handlers; elsewhere (e.g. a test thread) this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        self.restore()

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self.restore()


def nonfinite(loss: torch.Tensor, parameters) -> tuple[bool, list[str]]:
    """(is the loss NaN/Inf, names of parameters whose gradient holds NaN/Inf) for this rank.

    ``parameters``: (name, parameter) pairs; FSDP's sharded gradients are checked on this rank's shard.
    """
    bad = []
    for name, p in parameters:
        grad = p.grad
        if grad is None:
            continue
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        if not bool(torch.isfinite(grad).all()):
            bad.append(name)
    return not bool(torch.isfinite(loss.detach()).all()), bad
