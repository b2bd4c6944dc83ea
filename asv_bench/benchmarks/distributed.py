"""DistEGNN per rank: the training step of the slowest part of a graph split in P, timed alone, and its memory.

A machine with fewer cores than ranks cannot run P ranks in parallel, so the benchmark measures what one
rank does: the graph is partitioned (``partitioners.partition``), each part's subgraph is built with its
halo (exact mode) or without its cut edges (drop mode), and the part with the most edges, the slowest rank,
runs FastEGNN's forward + backward with ``dist_egnn.measure.scaling.PartTwin`` in place of the communicator (same
shapes, no partner; the collectives' cost is measured apart, see ``launch/scaling.py``).

``time_slowest_part_step``: seconds per step of that rank (one thread); ``peakmem_slowest_part_step`` with
``peakmem_setup`` as its baseline; ``track_*``: edges and halo rows per rank and the fraction of the
graph's edges no rank computes (cut edges in drop mode). Speedups read off these must be read with the
edges per rank beside them: a random split in drop mode leaves each rank ~E/P² edges.
"""
import torch

from . import common

PARTS = [1, 2, 4, 8]
HALO = ["exact", "none"]
PARTITIONS = ["metis", "spatial", "random"]


def part_batches(g: dict, parts: int, method: str, halo: bool) -> list[dict]:
    """The per-rank inputs of every part of graph ``g``: owned rows first, halo rows after (exact mode)."""
    from dist_egnn.partitioners import partition
    from dist_egnn.partitioners.subgraphs import split_graph, stack_parts

    pos = g["pos"].double().numpy()
    edge_index = g["edge_index"].numpy()
    assignment = partition(pos, parts, method, edge_index=edge_index, seed=0).assignment
    batches = []
    for part in split_graph(edge_index, assignment, parts, halo):
        stacked = stack_parts([part])
        rows = stacked.batch_rows(0, part.edge_index.reshape(-1)).reshape(2, -1)
        owned = torch.from_numpy(part.owned)
        plan = stacked.halo_plan() if halo and parts > 1 else None
        batches.append(dict(node_features=g["node_features"][owned], pos=g["pos"][owned], vel=g["vel"][owned],
                            edge_index=torch.from_numpy(rows),
                            edge_attr=g["edge_attr"][torch.from_numpy(part.edge_ids)],
                            batch=torch.zeros(len(owned), dtype=torch.long), num_graphs=1,
                            target=g["target"][owned], plan=plan, halo_rows=part.num_halo))
    return batches


class DistributedPartStep:
    params = [common.sizes("20k", "fluid113k"), PARTS, HALO, PARTITIONS]
    param_names = ["size", "parts", "halo", "partition"]
    number = 1
    repeat = (1, 3, 120.0)
    warmup_time = 0.0
    timeout = 1800

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, parts, halo, partition):
        if parts == 1 and (halo != "exact" or partition != "metis"):
            raise NotImplementedError("P = 1 has no parts: measured once (halo=exact, partition=metis)")
        from dist_egnn.measure.scaling import PartTwin

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)                      # a rank's share of the cores when ranks = cores
        g = graphs[size]
        batches = part_batches(g, parts, partition, halo == "exact")
        self.slowest = max(batches, key=lambda b: b["edge_index"].shape[1])
        self.edges_total = sum(b["edge_index"].shape[1] for b in batches)
        self.edges_full = g["edge_index"].shape[1]
        self.model = common.make_model("fastegnn")
        self.twin = PartTwin(parts)
        self.twin.set_halo_plan(self.slowest["plan"])
        self.model.set_comm(self.twin)
        self.inputs = {k: v for k, v in self.slowest.items() if k not in ("plan", "halo_rows")}

    def teardown(self, *args):
        torch.set_num_threads(self.threads)

    def time_slowest_part_step(self, *args):
        common.training_step(self.model, self.inputs)

    def peakmem_slowest_part_step(self, *args):
        common.training_step(self.model, self.inputs)

    def peakmem_setup(self, *args):
        """Baseline of peakmem_slowest_part_step: the same process without the step."""
        torch.zeros(1)

    def track_edges_per_rank(self, *args):
        return int(self.slowest["edge_index"].shape[1])

    def track_halo_rows_per_rank(self, *args):
        return int(self.slowest["halo_rows"])

    def track_dropped_edge_fraction(self, *args):
        return float(1.0 - self.edges_total / max(self.edges_full, 1))


DistributedPartStep.track_edges_per_rank.unit = "edges"
DistributedPartStep.track_halo_rows_per_rank.unit = "rows"
DistributedPartStep.track_dropped_edge_fraction.unit = "fraction"
