"""The overlap path of the layers (distributed.overlap) in one process: the edge split and the same numbers.

On P ranks the overlap path is checked against one device in tests/parallel/test_graph_parallel.py; here, in
one process, the split itself (interior edges, compact cut-edge block) and the layers' second code path (the
collectives started early and waited for late, the owned rows read before the halo) under float64 and bf16.
"""
from __future__ import annotations

import pytest
import torch

from dist_egnn.keys import RECEIVER, SENDER
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.models.egnn import EdgeSplit
from dist_egnn.parallel.seam import SingleProcess


class OverlappingSingleProcess(SingleProcess):
    """SingleProcess that asks the model for the overlap path (its handles answer at once)."""

    overlap = True


def test_edge_split_keeps_every_edge_once_in_order():
    """Guards EdgeSplit: interior edges are those with an owned sender, the cut block's compact rows map back to
    the original receivers and halo senders, and both keep the input order (stable sums)."""
    g = torch.Generator().manual_seed(0)
    num_owned, num_halo = 12, 5
    recv = torch.sort(torch.randint(0, num_owned, (60,), generator=g)).values
    send = torch.randint(0, num_owned + num_halo, (60,), generator=g)
    edge_index = torch.stack([recv, send]) if RECEIVER == 0 else torch.stack([send, recv])
    attr = torch.arange(60, dtype=torch.float64).unsqueeze(1)
    split = EdgeSplit.of(edge_index, attr, num_owned)
    is_cut = send >= num_owned
    assert torch.equal(split.interior_index, edge_index[:, ~is_cut])
    assert torch.equal(split.interior_attr[:, 0], attr[~is_cut, 0])            # input order kept
    assert torch.equal(split.cut_attr[:, 0], attr[is_cut, 0])
    rows = split.cut_rows
    assert torch.equal(rows, torch.unique(recv[is_cut]))
    assert torch.equal(rows[split.cut_index[RECEIVER]], recv[is_cut])          # compact receivers -> owned rows
    assert torch.equal(split.cut_index[SENDER] - len(rows) + num_owned, send[is_cut])   # -> halo rows
    assert 0 < len(rows) < num_owned and 0 < int(is_cut.sum()) < 60


def problem(dtype):
    g = torch.Generator().manual_seed(1)
    n = 30
    pos = torch.rand(n, 3, generator=g, dtype=dtype)
    d = torch.cdist(pos, pos)
    recv, send = torch.nonzero((d < 0.45) & (d > 0), as_tuple=True)
    edge_index = torch.stack([recv, send]) if RECEIVER == 0 else torch.stack([send, recv])
    attr = torch.stack([d[recv, send], d[recv, send] ** 2], dim=1)
    batch = (torch.arange(n) >= 18).long()
    return (torch.randn(n, 2, generator=g, dtype=dtype), pos, torch.randn(n, 3, generator=g, dtype=dtype),
            edge_index, attr, batch, 2)


@pytest.mark.parametrize("kind", ["egnn", "fastegnn"])
@pytest.mark.parametrize("precision", ["float64", "bf16"])
def test_overlap_path_equals_blocking_path_in_one_process(kind, precision):
    """Guards the layers' overlap path (split edges, started means, bf16 read of the owned rows): in one process,
    where every edge is interior, it gives the blocking path's outputs and gradients."""
    dtype = torch.float64 if precision == "float64" else torch.float32
    results = []
    for comm in (SingleProcess(), OverlappingSingleProcess()):
        torch.manual_seed(0)
        model = (FastEGNN(hidden=16, layers=2) if kind == "fastegnn" else EGNN(hidden=16, layers=2)).to(dtype)
        model.set_comm(comm)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            pred = model(*problem(dtype))
        loss = pred.pos.square().sum() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().sum())
        loss.backward()
        results.append([pred.pos.detach(), *[p.grad.clone() for p in model.parameters() if p.grad is not None]])
    tol = 1e-12 if precision == "float64" else 1e-5
    for blocking, overlapped in zip(*results):
        assert torch.allclose(blocking, overlapped, rtol=tol, atol=tol)
