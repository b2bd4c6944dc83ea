"""GPU-only: a FastEGNN training step on CUDA, time and peak device memory. Skipped without CUDA."""
import torch

from . import common


class CudaStep:
    params = [common.sizes("20k", "fluid113k"), ["fastegnn", "reference-fastegnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0
    timeout = 900

    def setup(self, size, model):
        if not torch.cuda.is_available():
            raise NotImplementedError("needs CUDA")
        if size == "fluid113k" and model.startswith("reference"):
            raise NotImplementedError("the authors' structure needs ~20 GB at Fluid113K size")
        g = common.graph(size)
        self.graph = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in g.items()}
        self.model = common.make_model(model).cuda()
        common.training_step(self.model, self.graph)
        torch.cuda.synchronize()

    def time_step(self, size, model):
        common.training_step(self.model, self.graph)
        torch.cuda.synchronize()

    def track_peak_device_mib(self, size, model):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        common.training_step(self.model, self.graph)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    track_peak_device_mib.unit = "MiB"
