"""Roofline ratio: a training step's time / the time of its dense matrix multiplies alone.

Every matrix multiply a step dispatches (forward and backward) is recorded with its shapes
(``common.record_matmuls``) and replayed alone on random operands of the same shapes in the same process,
interleaved with the step itself. 1.0 would mean the step is nothing but its GEMMs; the excess is gather,
scatter, activation and bookkeeping work. ``track_gemm_gflops``: the rate the replayed GEMMs reach here.
"""
import numpy as np

from . import common


class Roofline:
    params = [common.sizes("small", "20k"), ["fastegnn", "reference-fastegnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = 1
    timeout = 1800

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, model):
        self.graph = graphs[size]
        self.model = common.make_model(model)
        self.calls = common.record_matmuls(lambda: common.training_step(self.model, self.graph))
        self.replay = common.replay_matmuls(self.calls)

    def _times(self, repeat=3):
        step, gemm = [], []
        for _ in range(repeat):
            step.append(common.median_time(lambda: common.training_step(self.model, self.graph), repeat=1))
            gemm.append(common.median_time(self.replay, repeat=1))
        return float(np.median(step)), float(np.median(gemm))

    def track_roofline_ratio(self, graphs, size, model):
        step, gemm = self._times()
        return step / gemm
    track_roofline_ratio.unit = "step time / GEMM time"

    def track_gemm_gflops(self, graphs, size, model):
        return common.flops(self.calls) / common.median_time(self.replay, repeat=3) / 1e9
    track_gemm_gflops.unit = "GFLOP/s"

    def track_step_gflop(self, graphs, size, model):
        return common.flops(self.calls) / 1e9
    track_step_gflop.unit = "GFLOP per step"
