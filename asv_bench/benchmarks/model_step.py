"""One training step (forward + backward) of EGNN and FastEGNN, ours and the authors' structure, per graph size.

``time_step``: wall time of one step; ``peakmem_step``: asv's peak resident memory of the process running
one step, with ``peakmem_setup`` (graph and model built, no step) as the baseline to subtract.
The reference models (``reference-*``, see ``reference.py``) are skipped at Fluid113K size, where they
would need ~20 GB. ``FusedKernels``: the same FastEGNN step with and without the C kernels.
"""
import torch

from . import common

MODELS = ["fastegnn", "egnn", "reference-fastegnn", "reference-egnn"]


class ModelStep:
    params = [common.sizes("small", "20k", "fluid113k"), MODELS]
    param_names = ["size", "model"]
    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0.0
    timeout = 1800

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, model):
        if size == "fluid113k" and model.startswith("reference"):
            raise NotImplementedError("the authors' structure needs ~20 GB at Fluid113K size")
        self.graph = graphs[size]
        self.model = common.make_model(model)

    def time_step(self, graphs, size, model):
        common.training_step(self.model, self.graph)

    def peakmem_step(self, graphs, size, model):
        common.training_step(self.model, self.graph)

    def peakmem_setup(self, graphs, size, model):
        """Baseline of peakmem_step: the same process without the step."""
        torch.zeros(1)


class FusedKernels:
    """FastEGNN step with the fused blocks' C kernels (``native.py``) and with torch's kernels in their place."""
    params = [common.sizes("20k"), ["c", "torch"]]
    param_names = ["size", "kernels"]
    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0.0
    timeout = 900

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, kernels):
        from dist_egnn.models import native
        if kernels == "c" and native.library() is None:
            raise NotImplementedError("the C kernels do not apply here (no AVX2 or no C compiler)")
        self.saved = native._library
        native._library = native.library() if kernels == "c" else None
        self.graph = graphs[size]
        self.model = common.make_model("fastegnn")

    def teardown(self, graphs, size, kernels):
        from dist_egnn.models import native
        native._library = self.saved

    def time_step(self, graphs, size, kernels):
        common.training_step(self.model, self.graph)
