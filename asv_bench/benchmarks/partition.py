"""Partitioning a graph: time and quality over graph size x ranks x partitioner.

``time_partition``: one call of ``partitioners.partition`` on a precomputed radius graph.
``track_cut_fraction``: share of edges between parts (dropped in halo: none mode, exchanged in exact mode).
``track_max_halo_fraction``: the largest 1-hop halo relative to its part (exact mode's extra rows).
"""
from dist_egnn.partitioners import partition

from . import common


class Partition:
    params = [common.sizes("20k", "fluid113k"), [2, 4, 8] if not common.TINY else [2, 4],
              ["metis", "spatial", "random"]]
    param_names = ["size", "ranks", "partitioner"]
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0.0
    timeout = 600

    def setup_cache(self):
        return {size: (g["pos"].numpy().astype("float64"), g["edge_index"].numpy())
                for size, g in ((s, common.graph(s)) for s in self.params[0])}

    def setup(self, graphs, size, ranks, partitioner):
        self.pos, self.edge_index = graphs[size]

    def time_partition(self, graphs, size, ranks, partitioner):
        partition(self.pos, ranks, partitioner, edge_index=self.edge_index, seed=0)

    def track_cut_fraction(self, graphs, size, ranks, partitioner):
        return partition(self.pos, ranks, partitioner, edge_index=self.edge_index, seed=0).metrics.cut_fraction
    track_cut_fraction.unit = "fraction of edges"

    def track_max_halo_fraction(self, graphs, size, ranks, partitioner):
        metrics = partition(self.pos, ranks, partitioner, edge_index=self.edge_index, seed=0).metrics
        return float((metrics.halo_sizes / metrics.part_sizes).max())
    track_max_halo_fraction.unit = "halo rows / owned rows"
