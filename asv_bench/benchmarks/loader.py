"""Reading samples from a zarr store through dask and building their graphs: throughput and peak memory.

A synthetic store (random positions in a unit cube, ``frames`` frames, one scene of ``nodes`` nodes) is
written once in ``setup_cache``; each benchmark reads every sample of the split one batch at a time.
"""
import os
import tempfile
import time

import numpy as np

from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.store import atomic_store, create_split, open_store, write_root_attrs, write_scenes

from . import common

FRAMES = 4


class Loader:
    params = [common.sizes("small", "20k", "fluid113k")]
    param_names = ["size"]
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0
    timeout = 900

    def setup_cache(self):
        folder = tempfile.mkdtemp(prefix="dist-egnn-bench-")
        paths = {}
        rng = np.random.default_rng(0)
        for size in self.params[0]:
            nodes, edges = common.SIZES[size]
            path = os.path.join(folder, f"{size}.zarr")
            pos = rng.random((1, FRAMES, nodes, 3)).astype(np.float32)
            vel = rng.normal(scale=0.01, size=(1, FRAMES, nodes, 3)).astype(np.float32)
            with atomic_store(path) as root:
                radius = (edges / nodes / (4 / 3 * np.pi * nodes)) ** (1 / 3)
                write_root_attrs(root, dataset=f"bench-{size}", source="benchmark", dt=1.0,
                                 units={"length": "1", "time": "1"}, radius=radius, node_scalars=["type"],
                                 generator={"name": "asv_bench.loader"})
                for split in ("train", "val", "test"):
                    group = create_split(root, split, [nodes], FRAMES, 1)
                    write_scenes(group, 0, pos, vel, rng.integers(0, 2, (1, nodes, 1)).astype(np.float32))
            paths[size] = path
        return paths

    def setup(self, paths, size):
        self.dataset = TrajectoryDataset(open_store(paths[size]), "train", delta_t=1,
                                         node_features=["speed", "type"], edge_features=["distance", "distance"])

    def _read_all(self):
        samples = 0
        for batch in self.dataset.batches(1, shuffle=False):
            samples += int(batch.num_graphs)
        return samples

    def track_samples_per_second(self, paths, size):
        start = time.perf_counter()
        samples = self._read_all()
        return samples / (time.perf_counter() - start)
    track_samples_per_second.unit = "samples/s"

    def time_read_split(self, paths, size):
        self._read_all()

    def peakmem_read_split(self, paths, size):
        self._read_all()
