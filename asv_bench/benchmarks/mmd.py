"""Cost of the MMD term (docs/maths.md §3), forward + backward, over graph size and kernel."""
import torch

from dist_egnn.losses import mmd_loss, sample_nodes

from . import common


class MMD:
    params = [common.sizes("small", "20k", "fluid113k"), ["gaussian", "unsquared"]]
    param_names = ["size", "kernel"]
    number = 1
    repeat = (1, 5, 30.0)
    warmup_time = 0.0

    def setup(self, size, kernel):
        nodes, _ = common.SIZES[size]
        gen = torch.Generator().manual_seed(0)
        self.pos = torch.rand(nodes, 3, generator=gen)
        self.batch = torch.zeros(nodes, dtype=torch.long)
        self.virtual = torch.rand(1, 3, 3, generator=gen, requires_grad=True)
        self.selected = sample_nodes(self.batch, 1, 150, generator=gen)

    def time_mmd_forward_backward(self, size, kernel):
        mmd_loss(self.virtual, self.pos, self.batch, 1, sigma=3.0, kernel=kernel, selected=self.selected).backward()

    def time_mmd_all_nodes(self, size, kernel):
        mmd_loss(self.virtual, self.pos, self.batch, 1, sigma=3.0, kernel=kernel).backward()
