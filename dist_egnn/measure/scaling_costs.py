"""What a large graph costs besides the step: partitioning it, reading one rank's share, and a projection to
a graph larger than this machine holds over more ranks than it has.

    python launch/scaling.py data=synthetic1m          # 1M nodes; these figures follow the step table

* :func:`measure_partition` times METIS on the first training sample (radius graph included, as
  ``launch/prepare.py`` builds it), in a fresh process, with its peak memory.
* :func:`measure_load` reads rank 0's share of one sample (owned nodes, plus the halo in exact mode) the way
  training does (``RankData.build``: zarr/dask read, radius graph, features), in a fresh process: read time,
  build time, the growth of the resident set, the peak of the memory the read allocated (tracemalloc: numpy
  arrays and decompressed chunks, not the thread pools and libraries a first read sets up), and how many of
  the frame's chunks the read touched. That peak against one whole sample and the store is the evidence
  that the loader reads by chunks and never the whole store.
* :func:`project_larger` takes the measured per-edge compute cost of one rank and the measured halo volume
  and scales them to ``target_nodes`` over ``target_ranks`` (METIS parts, exact halo):

  - the graph keeps its density, so a rank holds N/R nodes and (E/N)·N/R edges, times the edge imbalance
    measured at the largest P;
  - compute per rank = (CPU seconds per edge of that P's slowest part) × edges per rank (one thread);
  - halo rows and halo bytes per rank scale with a part's surface, (nodes per rank)^(2/3), from the measured
    ones at the largest P; all-reduce calls and bytes do not depend on the size;
  - communication through :func:`dist_egnn.measure.scaling.communication_seconds` (the study's model) with a
    stated link: this machine's loopback gloo link as measured, and an inter-node link of the configured
    latency and bandwidth;
  - one rank would take compute per edge × E (the ideal baseline of the efficiency); memory per rank from a
    straight-line fit of the measured peak resident set against edges per rank.
"""
from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any

import numpy as np

from dist_egnn.measure.scaling import communication_seconds, peak_rss_mb, rss_mb


def _train_split(cfg_container: dict):
    from omegaconf import OmegaConf

    from dist_egnn.training.setup import load_splits, open_dataset_store

    cfg = OmegaConf.create(cfg_container)
    info = open_dataset_store(cfg.dataset, progress=False)
    return cfg, info, load_splits(cfg, info)["train"]


def measure_partition(cfg_container: dict, parts: int) -> dict[str, Any]:
    """METIS (or the configured method) on the first training sample, timed with its graph; in a fresh process."""
    from dist_egnn.datasets.graphs import radius_graph
    from dist_egnn.partitioners import partition

    cfg, _, train = _train_split(cfg_container)
    d = cfg.distributed
    pos = train.read_parts([0], [None], [np.zeros(0, np.int64)])[0].pos
    before = rss_mb()
    started = time.perf_counter()
    edges = radius_graph(pos, train.radius, train.max_neighbors)
    graph_s = time.perf_counter() - started
    result = partition(pos, parts, method=d.partition, seed=d.seed, edge_index=edges)
    total_s = time.perf_counter() - started
    m = result.metrics
    return dict(parts=parts, method=d.partition, nodes=len(pos), edges=int(edges.shape[1]), graph_s=graph_s,
                partition_s=total_s - graph_s, total_s=total_s, cut_fraction=m.cut_fraction,
                max_halo_rows=int(m.halo_sizes.max()), added_mem_mb=peak_rss_mb() - before,
                peak_mem_mb=peak_rss_mb())


def measure_load(cfg_container: dict, parts: int, halo: bool) -> dict[str, Any]:
    """Rank 0's share of training sample 0, read and built as in training; in a fresh process."""
    import torch

    from dist_egnn.partitioners.artifacts import artifact_path, load_assignments
    from dist_egnn.training.rank_data import RankData

    torch.set_num_threads(1)
    cfg, info, train = _train_split(cfg_container)
    d = cfg.distributed
    if parts == 1:
        data = RankData(train, report=False)
    else:
        assignments = load_assignments(artifact_path(info.path, d.partition, parts, d.seed, None), "train")
        data = RankData(train, 0, parts, halo, assignments, gather=lambda values: [values], report=False)
    nodes = data.nodes_of(0)
    whole = parts == 1
    before = rss_mb()
    tracemalloc.start()
    started = time.perf_counter()
    (arrays,) = train.read_parts([0], [None if whole else nodes.owned], [nodes.halo])
    read_s = time.perf_counter() - started
    read_traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    read_added = peak_rss_mb() - before
    del arrays
    started = time.perf_counter()
    batch = data.build([0])
    build_s = time.perf_counter() - started
    scene, _ = train.locate(0)
    chunk = int(train._pos.chunksize[1])
    start = int(train.meta.scene_nodes(scene).start)
    rows = np.arange(int(np.diff(train.meta.scene_ptr)[scene])) if whole else np.asarray(nodes.owned)
    touched = np.union1d((start + rows) // chunk, (start + np.asarray(nodes.halo, np.int64)) // chunk)
    frame_chunks = math.ceil(train._pos.shape[1] / chunk)
    return dict(parts=parts, halo=halo and parts > 1, owned=len(rows), halo_rows=len(nodes.halo),
                edges=batch.num_edges, read_s=read_s, build_s=build_s, read_added_mb=read_added,
                read_peak_mb=read_traced, result_mb=(len(rows) * 10 + len(nodes.halo) * 4) * 4 / 2**20,
                build_added_mb=peak_rss_mb() - before, peak_mem_mb=peak_rss_mb(),
                chunks_touched=len(touched), frame_chunks=frame_chunks, chunk_nodes=chunk,
                sample_mb=sample_bytes(train) / 2**20, store_mb=store_bytes(info.path) / 2**20)


def sample_bytes(train) -> int:
    """Bytes of one whole sample as the loader returns it: positions, velocities, target, scalars (float32)."""
    n = int(np.diff(train.meta.scene_ptr).max())
    return n * (3 + 3 + 3 + train._scalars.shape[1]) * 4


def store_bytes(path) -> int:
    """Uncompressed bytes of every array of the store (what reading it whole would hold)."""
    import zarr

    total = 0
    root = zarr.open_group(str(path), mode="r")

    def visit(group):
        nonlocal total
        for _, array in group.arrays():
            total += array.nbytes
        for _, child in group.groups():
            visit(child)

    visit(root)
    return total


# --------------------------------------------------------------------------------------------- projection
def memory_fit(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(intercept MB, bytes per edge) of peak memory per rank against edges per rank, least squares."""
    x = np.array([r["edges_per_rank"] for r in rows], float)
    y = np.array([r["peak_mem_mb"] for r in rows], float)
    if len(rows) < 2 or np.ptp(x) == 0:
        return float(y.mean() - 0.0), float(y.mean() * 2**20 / max(x.mean(), 1))
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope * 2**20)


def project_larger(basis: dict[str, Any], part: dict[str, Any], mem_rows: list[dict[str, Any]],
                   graph_nodes: int, target_nodes: int, target_ranks: int, links: dict[str, float],
                   link_name: str) -> dict[str, Any]:
    """The projected exact-mode step of ``target_nodes`` over ``target_ranks`` from the measured ``basis`` row.

    ``basis``: the study's projected row at the largest P (exact halo); ``part``: its slowest part's raw
    measurement (calls and bytes of the collectives); ``mem_rows``: the exact rows of every P (memory fit).
    """
    per_edge = basis["compute_s"] / basis["edges_per_rank"]
    degree = basis["full_edges"] / graph_nodes
    imbalance = basis["edges_per_rank"] / (basis["edges_total"] / basis["parts"])
    nodes_per_rank = target_nodes / target_ranks
    surface = (nodes_per_rank / basis["owned_per_rank"]) ** (2 / 3)
    edges_per_rank = degree * nodes_per_rank * imbalance
    scaled = dict(part, halo_bytes=part["halo_bytes"] * surface)
    comm = communication_seconds(scaled, target_ranks, links)
    compute = per_edge * edges_per_rank
    one_rank = per_edge * degree * target_nodes
    intercept, bytes_per_edge = memory_fit(mem_rows)
    step = compute + comm
    return dict(kind=f"projected {target_nodes / 1e6:g}M", link=link_name, parts=target_ranks, halo="exact",
                step_time_s=step, compute_s=compute, comm_s=comm, speedup=one_rank / step,
                efficiency=one_rank / step / target_ranks, edges_per_rank=edges_per_rank,
                owned_per_rank=nodes_per_rank, halo_rows_per_rank=basis["halo_rows_per_rank"] * surface,
                dropped_edge_fraction=0.0, peak_mem_mb=intercept + bytes_per_edge * edges_per_rank / 2**20,
                threads_per_rank=basis["threads_per_rank"], one_rank_s=one_rank,
                one_rank_mem_gb=(intercept + bytes_per_edge * degree * target_nodes / 2**20) / 1024,
                per_edge_us=per_edge * 1e6, bytes_per_edge_fit=bytes_per_edge, mem_intercept_mb=intercept,
                halo_mb_per_forward=scaled["halo_bytes"] / 2**20, surface_factor=surface, imbalance=imbalance)
