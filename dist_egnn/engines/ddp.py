"""torch DistributedDataParallel: gradients averaged over every rank in buckets during backward."""
from __future__ import annotations

from contextlib import nullcontext

from torch.nn.parallel import DistributedDataParallel

from dist_egnn.engines.base import Engine


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, module, optimizer, groups):
        super().__init__(module, optimizer, groups)
        device = next(module.parameters()).device
        # The last layer's feature updates feed no output, so their parameters get no gradient: DDP must look
        # for unused parameters rather than wait for them forever.
        self.model = DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                             find_unused_parameters=True)

    def accumulating(self, boundary):
        """Gradients are all-reduced only in the backward of an optimizer step's last micro-batch."""
        return nullcontext() if boundary else self.model.no_sync()
