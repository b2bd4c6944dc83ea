"""Ours against the authors' computational structure, side by side in one process (robust to machine noise).

``track_speedup``: median step time of the reference / median step time of ours, the two interleaved.
``track_bytes_per_edge``: peak memory of one training step over the edge count, each model in a fresh
process (``common.memory_in_subprocess``). The reference is measured at 20K size at most (it needs ~10 KB
per edge, ~20 GB at Fluid113K size); its per-edge memory is flat in graph size, so 20K stands for it.
``track_fluid113k_*``: our FastEGNN at Fluid113K size (113K nodes, ~1.7M edges).
"""
import numpy as np

from . import common


def _interleaved_medians(names, graph, repeat):
    models = {name: common.make_model(name) for name in names}
    if len(models) == 2:
        first, second = models.values()
        second.load_state_dict(first.state_dict())          # same parameters, same function
    times = {name: [] for name in names}
    for _ in range(repeat):
        for name, model in models.items():
            times[name].append(common.median_time(lambda: common.training_step(model, graph), repeat=1))
    return {name: float(np.median(t)) for name, t in times.items()}


class Speedup:
    params = [common.sizes("small", "20k"), ["fastegnn", "egnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = 1
    timeout = 1800
    unit = "x (reference time / our time)"

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def track_speedup(self, graphs, size, model):
        medians = _interleaved_medians([model, f"reference-{model}"], graphs[size], repeat=3)
        return medians[f"reference-{model}"] / medians[model]


class MemoryPerEdge:
    params = [common.sizes("small", "20k", "fluid113k"),
              ["fastegnn", "egnn", "reference-fastegnn", "reference-egnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = 1
    timeout = 1800
    unit = "bytes per edge"

    def setup(self, size, model):
        if size == "fluid113k" and model.startswith("reference"):
            raise NotImplementedError("reference memory is measured up to 20K size (~20 GB at Fluid113K)")

    def track_bytes_per_edge(self, size, model):
        return common.memory_in_subprocess(size, model)["bytes_per_edge"]


class Fluid113K:
    """Our FastEGNN at Fluid113K size: one training step's time and peak memory."""

    params = [common.sizes("fluid113k")]
    param_names = ["size"]
    number = 1
    repeat = 1
    timeout = 1800

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def track_fluid113k_step_seconds(self, graphs, size):
        model = common.make_model("fastegnn")
        common.training_step(model, graphs[size])
        return common.median_time(lambda: common.training_step(model, graphs[size]), repeat=3)
    track_fluid113k_step_seconds.unit = "seconds"

    def track_fluid113k_step_memory_mib(self, graphs, size):
        return common.memory_in_subprocess(size, "fastegnn")["step_bytes"] / 2**20
    track_fluid113k_step_memory_mib.unit = "MiB"

    def track_fluid113k_process_peak_mib(self, graphs, size):
        return common.memory_in_subprocess(size, "fastegnn")["process_peak_bytes"] / 2**20
    track_fluid113k_process_peak_mib.unit = "MiB"
