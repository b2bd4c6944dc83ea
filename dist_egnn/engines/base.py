"""The engine interface, and the checkpoint file that plain PyTorch, DDP and FSDP share.

Every rank holds the whole model (graph parallelism splits the graph, not the weights; FSDP shards them
only between steps), so the engines differ in how gradients are combined and checkpoints written:

* gradients: each engine averages parameter gradients over all W ranks. The trainer scales each rank's
  loss share by P (``Engine.loss_scale``), so the average over W = P × G ranks is the mean over the G graph
  groups of each group's summed loss, the gradient of one device. Example: P = 2, G = 1, rank shares
  0.55 and 0.55 (one device's loss 1.1): scaled 1.1 and 1.1, averaged over 2 ranks: 1.1.
* clipping (``engine.gradient_clipping`` = c > 0): the combined gradient's global L2 norm is clipped to c before
  every optimizer step (``torch.nn.utils.clip_grad_norm_``; DTensor shards under FSDP; DeepSpeed through
  its own ``gradient_clipping``), so one value means the same under every engine. Every rank holds the same
  combined gradient, so every rank clips alike.
* checkpoints: plain, DDP and FSDP write one portable file ``<dir>/<tag>.pt`` (full model and optimizer
  state, client state), so a run can resume under another engine or another P; DeepSpeed writes its own
  directory format through ``save_checkpoint``/``load_checkpoint``. Either way the trainer completes a
  checkpoint by writing its manifest after the engine's files (``dist_egnn.training.checkpoint``): ``latest_tag``
  sees only complete ones.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from dist_egnn.training import checkpoint


class Engine:
    """Wraps a model and its optimizer; ``model`` is what the trainer calls for the forward pass."""

    name = "base"
    clip = 0.0                          # engine.gradient_clipping (build_engine sets it); 0: off

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, groups):
        self.module = module            # the bare model
        self.model = module             # what to call (a wrapper for DDP/FSDP/DeepSpeed)
        self.optimizer = optimizer
        self.groups = groups

    @property
    def loss_scale(self) -> float:
        """Factor on each rank's loss share so that the engine's gradient average is the global gradient."""
        return float(self.groups.parts)

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def accumulating(self, boundary: bool) -> AbstractContextManager:
        """Around the forward and backward of one micro-batch (``trainer.accumulate``): ``boundary`` is false
        for all but the last micro-batch of an optimizer step, whose gradients need not be combined across ranks
        yet (DDP: ``no_sync``; DeepSpeed: its accumulation boundary). Plain and FSDP: nothing to do (FSDP
        reduces every micro-batch's gradients into the sharded sums, the same result)."""
        return nullcontext()

    def backward(self, loss: torch.Tensor, window: int = 1) -> None:
        """Back-propagate one micro-batch's ``loss`` (its loss share × :attr:`loss_scale`) of an optimizer step
        made of ``window`` micro-batches: the gradients accumulate their mean over the window."""
        (loss if window == 1 else loss / window).backward()

    def step(self) -> None:
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()

    def parameters_with_grad(self):
        return [p for p in self.module.parameters() if p.grad is not None]

    # -- checkpoints ------------------------------------------------------------------------------------
    def export_state(self) -> dict[str, torch.Tensor]:
        """The full model state dict, on CPU (a collective for FSDP: every rank calls it)."""
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a full model state dict (every rank calls it)."""
        self.module.load_state_dict(state)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def save(self, directory: str | Path, tag: str, client_state: dict[str, Any]) -> Path:
        """Write ``<directory>/<tag>.pt`` atomically from rank 0; every rank calls it."""
        model, optim = self.export_state(), self.optimizer_state()
        path = Path(directory) / f"{tag}.pt"
        if self.groups.env.rank == 0:
            checkpoint.save_atomic(dict(model=model, optimizer=optim, client=client_state, engine=self.name), path)
        return path

    def load(self, directory: str | Path, tag: str) -> dict[str, Any]:
        """Restore model and optimizer from ``<directory>/<tag>.pt``; returns the client state."""
        path = Path(directory) / f"{tag}.pt"
        state = checkpoint.load(path)
        try:
            self.import_state(state["model"])
            self.load_optimizer_state(state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as err:
            raise checkpoint.CheckpointError(
                f"{path} does not fit this model and optimizer ({type(err).__name__}: {str(err)[:300]}); it was "
                f"written for another model configuration: resume with that configuration or start a new run "
                f"directory") from err
        return state.get("client", {})

    @staticmethod
    def latest_tag(directory: str | Path) -> str | None:
        """The newest complete checkpoint's tag in ``directory`` (one with its manifest), or None."""
        return checkpoint.latest_tag(directory)
