"""One equivariance check for every model and pipeline (in the spirit of e3nn's ``assert_equivariant``).

A function under test maps a geometric graph to positions. The check draws a random orthogonal matrix Q
(rotation, or rotation times reflection), a translation t and a permutation π of the real nodes, and
compares

    f(π·(Q x + t), π·(Q v), π·features, π·edges)   with   π·(Q f(x, v, ...) + t)

Positions translate, velocities only rotate, invariant features and edge attributes are untouched. A graph
with an external field (``gravity``, (B, 3) per graph) has it rotated with the velocities: the model is then
checked for f(Q x + t, Q v, Q g) = Q f(x, v, g) + t (docs/maths.md §8).
The error is relative: max |difference| / max |output|, with a tolerance per dtype (float64 is the
reference precision).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


@dataclass
class Graph:
    """Inputs of one geometric graph (or a batch of them)."""

    node_features: torch.Tensor   # (N, F)
    pos: torch.Tensor             # (N, 3)
    vel: torch.Tensor             # (N, 3)
    edge_index: torch.Tensor      # (2, E)
    edge_attr: torch.Tensor       # (E, D)
    batch: torch.Tensor           # (N,)
    num_graphs: int
    gravity: torch.Tensor | None = None   # (B, 3) external field per graph; None: none

    def to(self, dtype: torch.dtype) -> "Graph":
        return replace(self, node_features=self.node_features.to(dtype), pos=self.pos.to(dtype),
                       vel=self.vel.to(dtype), edge_attr=self.edge_attr.to(dtype),
                       gravity=None if self.gravity is None else self.gravity.to(dtype))

    def kwargs(self) -> dict:
        """The model's keyword arguments (``gravity`` only when the graph has a field)."""
        out = dict(node_features=self.node_features, pos=self.pos, vel=self.vel, edge_index=self.edge_index,
                   edge_attr=self.edge_attr, batch=self.batch, num_graphs=self.num_graphs)
        if self.gravity is not None:
            out["gravity"] = self.gravity
        return out


def random_orthogonal(generator: torch.Generator, reflect: bool, dtype=torch.float64) -> torch.Tensor:
    """A uniformly random 3x3 rotation (det +1), or rotation-reflection (det -1) when ``reflect``."""
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))             # Haar-uniform
    if (torch.det(q) < 0) != reflect:
        q[:, 0] = -q[:, 0]
    return q.to(dtype)


def transform(graph: Graph, rotation: torch.Tensor, translation: torch.Tensor, perm: torch.Tensor) -> Graph:
    """Apply x -> Q x + t, v -> Q v, g -> Q g (a per-graph field: rotated, neither translated nor permuted)
    and relabel nodes so that new node k is old node perm[k]."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm))
    return replace(graph,
                   node_features=graph.node_features[perm],
                   pos=(graph.pos @ rotation.T + translation)[perm],
                   vel=(graph.vel @ rotation.T)[perm],
                   edge_index=inverse[graph.edge_index],
                   batch=graph.batch[perm],
                   gravity=None if graph.gravity is None else graph.gravity @ rotation.T)


def equivariance_error(fn: Callable[[Graph], torch.Tensor], graph: Graph, dtype: torch.dtype, *,
                       seed: int = 0, reflect: bool = False, translate: bool = True,
                       permute: bool = True) -> float:
    """Relative error of f under one random E(3) transformation and node permutation."""
    gen = torch.Generator().manual_seed(seed)
    graph = graph.to(dtype)
    rotation = random_orthogonal(gen, reflect, dtype)
    translation = (torch.randn(3, generator=gen, dtype=torch.float64) * 5 if translate
                   else torch.zeros(3, dtype=torch.float64)).to(dtype)
    n = graph.pos.shape[0]
    perm = torch.randperm(n, generator=gen) if permute else torch.arange(n)
    out = fn(graph)
    out_transformed_input = fn(transform(graph, rotation, translation, perm))
    expected = (out @ rotation.T + translation)[perm]
    scale = expected.abs().max().clamp(min=1e-12)
    return float(((out_transformed_input - expected).abs().max() / scale).detach())


def assert_equivariant(fn: Callable[[Graph], torch.Tensor], graph: Graph, dtype: torch.dtype = torch.float64,
                       tolerance: float | None = None, trials: int = 3) -> float:
    """Check rotations, reflections, translations and permutations; returns the worst relative error."""
    tolerance = TOLERANCE[dtype] if tolerance is None else tolerance
    worst = 0.0
    for trial in range(trials):
        for reflect in (False, True):
            err = equivariance_error(fn, graph, dtype, seed=trial, reflect=reflect)
            assert err < tolerance, (f"not equivariant in {dtype} (reflect={reflect}, trial {trial}): "
                                     f"relative error {err:.3g} >= {tolerance:.1g}")
            worst = max(worst, err)
    return worst


def random_graph(num_graphs: int = 2, nodes: int = 12, node_features: int = 2, edge_features: int = 2,
                 radius: float = 1.6, seed: int = 0, gravity: bool = False) -> Graph:
    """A small batch of random geometric graphs: radius graphs over Gaussian point clouds; with ``gravity`` a
    random field per graph (different directions and lengths, so a mix-up of graphs shows)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randn(num_graphs * nodes, 3, generator=gen, dtype=torch.float64)
    batch = torch.arange(num_graphs).repeat_interleave(nodes)
    same = batch[:, None] == batch[None, :]
    close = torch.cdist(pos, pos) < radius
    recv, send = torch.nonzero(same & close & ~torch.eye(len(pos), dtype=torch.bool), as_tuple=True)
    edge_index = torch.stack([recv, send])
    return Graph(node_features=torch.randn(len(pos), node_features, generator=gen, dtype=torch.float64),
                 pos=pos, vel=torch.randn(len(pos), 3, generator=gen, dtype=torch.float64),
                 edge_index=edge_index,
                 edge_attr=torch.randn(edge_index.shape[1], edge_features, generator=gen, dtype=torch.float64),
                 batch=batch, num_graphs=num_graphs,
                 gravity=torch.randn(num_graphs, 3, generator=gen, dtype=torch.float64) if gravity else None)
