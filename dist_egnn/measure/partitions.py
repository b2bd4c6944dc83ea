"""Time and quality of every partitioner on one large radius graph: ``python -m dist_egnn.measure.partitions``.

The graph: ``--nodes`` points drawn uniformly in a cube (seed 0), radius ``--radius``, the cube's side chosen
so that nodes have ``--degree`` neighbours on average (the walls lower the count, so the side is corrected
once from a first build). Defaults: 113,000 nodes, 24 neighbours, radius 0.075, like Fluid113K's particles.

For each method and P it reports the best of ``--repeats`` runs of
  * strategy s: the assignment alone, from a graph already built (spatial and random need none),
  * total s: ``partitioners.partition(pos, P, method, radius=r)``, i.e. input checks, radius graph,
    assignment and metrics,
and the quality numbers of ``partitioners.metrics``. Times are CPU seconds of this process
(``time.process_time``): all of it runs in one thread, so on an idle machine they equal wall time, and
they stay meaningful on a machine shared with other jobs, where wall time does not. ``--plot FILE.png``
also draws cut fraction and total time against P.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dist_egnn.datasets.graphs import radius_graph
from dist_egnn.partitioners.strategies import (
    METHODS,
    metis_assignment,
    partition,
    random_assignment,
    spatial_assignment,
)


def uniform_cloud(nodes: int, degree: float, radius: float, seed: int = 0) -> np.ndarray:
    """Uniform points in a cube whose radius graph has about ``degree`` neighbours per node."""
    unit = np.random.default_rng(seed).uniform(size=(nodes, 3))
    ball = 4 / 3 * np.pi * radius**3
    side = (nodes * ball / degree) ** (1 / 3)                       # ignoring the walls
    measured = radius_graph(unit * side, radius).shape[1] / nodes
    side *= (measured / degree) ** (1 / 3)                          # walls: fewer neighbours, shrink once
    return unit * side


def best_time(fn, repeats: int):
    """Least CPU seconds of ``repeats`` calls, and the last result."""
    best, result = np.inf, None
    for _ in range(repeats):
        start = time.process_time()
        result = fn()
        best = min(best, time.process_time() - start)
    return best, result


def measure(nodes: int, degree: float, radius: float, parts: list[int], repeats: int) -> tuple[list[dict], dict]:
    pos = uniform_cloud(nodes, degree, radius)
    graph_s, edge_index = best_time(lambda: radius_graph(pos, radius), repeats)
    graph = dict(nodes=nodes, edges=edge_index.shape[1], degree=edge_index.shape[1] / nodes, graph_s=graph_s)
    strategies = dict(metis=lambda p: metis_assignment(edge_index, nodes, p, 0),
                      spatial=lambda p: spatial_assignment(pos, p),
                      random=lambda p: random_assignment(nodes, p, 0))
    rows = []
    for method in METHODS:
        for p in parts:
            strategy_s, _ = best_time(lambda: strategies[method](p), repeats)
            total_s, result = best_time(lambda: partition(pos, p, method, radius=radius, seed=0), repeats)
            rows.append(dict(method=method, parts=p, strategy_s=strategy_s, total_s=total_s,
                             **result.metrics.summary()))
    return rows, graph


def table(rows: list[dict], graph: dict) -> str:
    lines = [f"{graph['nodes']:,} nodes, {graph['edges']:,} edges ({graph['degree']:.1f} neighbours per node), "
             f"radius graph built in {graph['graph_s']:.2f} s; times in CPU seconds, best of repeats",
             "",
             "| method | P | strategy s | total s | cut edges | boundary nodes | max halo / part | imbalance |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['parts']} | {r['strategy_s']:.3f} | {r['total_s']:.2f} | "
                     f"{100 * r['cut_fraction']:.1f} % | {100 * r['boundary_fraction']:.1f} % | "
                     f"{100 * r['max_halo_fraction']:.0f} % | {r['imbalance']:.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cut, seconds) = plt.subplots(1, 2, figsize=(9, 3.5))
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ps = [r["parts"] for r in mine]
        cut.plot(ps, [100 * r["cut_fraction"] for r in mine], "o-", label=method)
        seconds.plot(ps, [r["total_s"] for r in mine], "o-", label=method)
    cut.set(xlabel="parts P", ylabel="cut edges (%)", yscale="log", title="edges between parts")
    seconds.set(xlabel="parts P", ylabel="CPU seconds", title="partition() incl. radius graph")
    for ax in (cut, seconds):
        ax.set_xticks(sorted({r["parts"] for r in rows}))
        ax.grid(alpha=0.3)
    cut.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=113_000)
    parser.add_argument("--degree", type=float, default=24.0)
    parser.add_argument("--radius", type=float, default=0.075)
    parser.add_argument("--parts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plot", help="write a PNG of cut fraction and time against P")
    args = parser.parse_args()
    rows, graph = measure(args.nodes, args.degree, args.radius, args.parts, args.repeats)
    print(table(rows, graph))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
