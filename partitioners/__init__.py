"""Node-to-part assignments of geometric graphs, their per-part subgraphs, quality and stored artifacts.

    from dist_egnn.partitioners import partition
    part = partition(pos, 8, method="metis", radius=0.075, seed=0)
    part.assignment            # (N,) part of every node
    part.metrics.cut_fraction  # share of edges between parts
    ranks = part.split(halo=True)   # one PartGraph (owned nodes, halo, local edges, send lists) per part
"""
from dist_egnn.partitioners.metrics import PartitionMetrics, cut_edge_mask, partition_metrics
from dist_egnn.partitioners.strategies import METHODS, Partition, partition
from dist_egnn.partitioners.subgraphs import PartGraph, split_graph

__all__ = ["METHODS", "PartGraph", "Partition", "PartitionMetrics", "cut_edge_mask", "partition",
           "partition_metrics", "split_graph"]
