"""torch FSDP (``fully_shard``): parameters, gradients and optimizer state sharded over every rank.

Parameters are all-gathered for each forward and backward and reduce-scattered after it; between steps
each rank keeps 1/W of them. Checkpoints gather the full state dicts
(``torch.distributed.checkpoint.state_dict``) and rank 0 writes the same portable file as the plain and
DDP engines, so an FSDP run can resume under another engine or P.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dist_egnn.engines.base import Engine

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
LOAD_FULL = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, module, optimizer_factory, groups):
        device = next(module.parameters()).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        fully_shard(module, mesh=mesh)               # in place: the module's parameters become shards
        # FSDP replaces the parameters: the optimizer must be built on the sharded ones.
        super().__init__(module, optimizer_factory(module.parameters()), groups)

    def export_state(self):
        return get_model_state_dict(self.model, options=FULL)

    def import_state(self, state):
        set_model_state_dict(self.model, state, options=LOAD_FULL)

    def optimizer_state(self):
        return get_optimizer_state_dict(self.model, self.optimizer, options=FULL)

    def load_optimizer_state(self, state):
        set_optimizer_state_dict(self.model, self.optimizer, state, options=LOAD_FULL)
