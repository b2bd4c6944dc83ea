"""DeepSpeed: ``deepspeed.initialize`` with a config built from the typed config in one function.

On CPU DeepSpeed picks its CPU accelerator and gloo; on GPUs, nccl. The optimizer is a torch optimizer
passed in (a config "Adam" would JIT-build FusedAdam for minutes, see STACK.md). Checkpoints go through
``save_checkpoint``/``load_checkpoint`` with the trainer's client state; with ZeRO stage 0 (default) model
and optimizer states are whole in every checkpoint, so a run can resume with another P or world size.
DeepSpeed's own ``latest`` file is not used: the trainer's manifest (``dist_egnn.training.checkpoint``) marks a tag
complete, so a tag cut short is never loaded even if ``latest`` names it.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

from dist_egnn.engines.base import Engine
from dist_egnn.training import checkpoint


def deepspeed_config(cfg) -> dict[str, Any]:
    """The DeepSpeed config dict, from the typed ``engine`` and ``trainer`` groups."""
    config = {
        "train_micro_batch_size_per_gpu": int(cfg.trainer.batch_size),
        # Micro-batches per optimizer step: DeepSpeed divides each micro-batch's loss by it and combines the
        # gradients across ranks at the boundary, which the trainer sets for each micro-batch (DeepSpeedEngine).
        "gradient_accumulation_steps": int(cfg.trainer.get("accumulate", 1)),
        "zero_optimization": {"stage": int(cfg.engine.zero_stage)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # Always explicit: DeepSpeed's own default is 1.0 (clip at global norm 1), which the other engines
        # do not do; 0.0 switches clipping off.
        "gradient_clipping": float(cfg.engine.gradient_clipping),
    }
    if cfg.trainer.get("precision", "fp32") == "bf16":
        # DeepSpeed's own switch for torch.autocast (its "bf16" section would make the parameters bf16):
        # parameters and optimizer state stay float32, the forward runs under autocast as with every other
        # engine. No module is listed as lower-precision-safe, so gradients are still reduced in float32 and
        # P ranks keep equal to one device (see dist_egnn.training.device).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return config


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, module, optimizer, cfg, groups):
        import deepspeed

        super().__init__(module, optimizer, groups)
        self.accumulate = int(cfg.trainer.get("accumulate", 1))
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                                config=deepspeed_config(cfg))

    def accumulating(self, boundary):
        """DeepSpeed's own accumulation boundary, set for every micro-batch rather than counted by DeepSpeed: an
        epoch may end with a shorter window and a resumed run starts at a window's start; it all-reduces the
        gradients and steps its optimizer only at a boundary."""
        if self.accumulate > 1:
            self.model.set_gradient_accumulation_boundary(boundary)
        return nullcontext()

    def backward(self, loss, window=1):
        """DeepSpeed divides the loss by gradient_accumulation_steps itself; a shorter last window of an epoch
        (``window`` micro-batches) is scaled so that its gradient is still the mean over its micro-batches."""
        self.model.backward(loss if window == self.accumulate else loss * (self.accumulate / window))

    def step(self):
        self.model.step()

    def zero_grad(self):
        self.model.zero_grad()

    def save(self, directory, tag, client_state):
        self.model.save_checkpoint(str(directory), tag=tag, client_state=client_state)
        return Path(directory) / tag

    def load(self, directory, tag):
        """DeepSpeed loads with ``weights_only=False``: every file of the tag is first checked to unpickle
        with ``weights_only=True`` (no code can run), and the trainer has checked them against the manifest."""
        files = sorted((Path(directory) / tag).rglob("*.pt"))
        if not files:
            raise checkpoint.CheckpointError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        for path in files:
            checkpoint.check_weights_only(path)
        try:
            path, client = self.model.load_checkpoint(str(directory), tag=tag)
        except (KeyError, RuntimeError, ValueError) as err:
            raise checkpoint.CheckpointError(
                f"{Path(directory) / tag} does not fit this model and optimizer ({type(err).__name__}: "
                f"{str(err)[:300]}); resume with the run's model configuration or start a new run directory") from err
        if path is None:
            raise checkpoint.CheckpointError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        return client or {}
