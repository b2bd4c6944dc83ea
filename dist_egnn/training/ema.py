"""Exponential moving average of the weights (``trainer.ema_decay``): what evaluations and ``best.pt`` use.

After every optimizer step, on every rank, each parameter's average moves towards it:

    θ̄ ← θ̄ + (1 − decay) · (θ − θ̄)          (θ̄ starts as the initial θ)

in the parameters' own dtype (float32, or float64 with ``trainer.dtype=float64``). The parameters are the same
on every rank after a step (the engines average the gradients), so the averages are too. Under FSDP each rank
averages its own shard of every parameter, which is the same thing cut in pieces.

Evaluating with the average swaps it into the parameters and back (:meth:`EMA.applied`); checkpoints hold it as
a full model state dict, exported and imported through the engine while it is swapped in, so it moves between
engines and numbers of parts like the model itself.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def _local(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: an FSDP (DTensor) parameter's local shard, else the parameter itself."""
    return p.to_local() if hasattr(p, "to_local") else p


def _reshard(module: torch.nn.Module) -> None:
    """FSDP: drop the gathered (unsharded) copies, so that the next forward gathers the shards as they are now."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:                      # a torch without distributed support has no FSDP either
        return
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


class EMA:
    """The moving average of ``module``'s parameters (the engine's bare module)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} outside (0, 1)")     # config.check names trainer.ema_decay
        self.module, self.decay = module, float(decay)
        self.params = [p for p in module.parameters()]
        with torch.no_grad():
            self.shadow = [_local(p).detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: θ̄ ← θ̄ + (1 − decay)(θ − θ̄)."""
        torch._foreach_lerp_(self.shadow, [_local(p).detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (every rank enters it together); the trained ones
        are put back afterwards, bit for bit."""
        _reshard(self.module)
        with torch.no_grad():
            kept = [_local(p).detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                _local(p).copy_(s)
        try:
            yield
        finally:
            _reshard(self.module)
            with torch.no_grad():
                for p, k in zip(self.params, kept):
                    _local(p).copy_(k)

    def state_dict(self, engine) -> dict[str, torch.Tensor]:
        """The average as a full model state dict (through the engine: a collective under FSDP); copied, since an
        engine's export may share the parameters' memory (on CPU), which hold the trained weights again afterwards."""
        with self.applied():
            return {k: v.clone() for k, v in engine.export_state().items()}

    def load_state_dict(self, engine, state: dict[str, Any]) -> None:
        """Take the average from a full model state dict (every rank calls it)."""
        with self.applied():
            engine.import_state(state)
            _reshard(self.module)
            with torch.no_grad():
                self.shadow = [_local(p).detach().clone() for p in self.params]
