"""The C kernels of the fused blocks (dist_egnn.models.native): same values as torch's, same model, fallback.

Guards: a wrong polynomial or range reduction (values over the whole float range, ragged tails that miss the
8-lane loop), NaN turned into a number, a fused model whose float32 training step drifts from torch's, and a
failed build that crashes training instead of falling back to torch.
"""
import shutil

import pytest
import torch
from torch.nn import functional as F

from dist_egnn.models import FastEGNN, native

from equivariance import random_graph

APPLIES = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(not APPLIES, reason="no AVX2 CPU or no C compiler: torch's SiLU is used")


@needs_kernel
def test_kernel_builds_where_it_applies():
    assert native.library() is not None


@needs_kernel
@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 1000, 65_537])
def test_silu_and_derivative_match_torch(size):
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(size, generator=gen) * 30
    x[: min(size, 6)] = torch.tensor([0.0, 1e-30, -87.5, 88.5, -200.0, 200.0])[: min(size, 6)]
    grad = torch.randn(size, generator=gen)
    assert torch.allclose(native.silu(x), F.silu(x), rtol=2e-6, atol=1e-30)
    assert torch.allclose(native.silu_backward(grad, x), torch.ops.aten.silu_backward(grad, x), rtol=2e-6, atol=1e-6)



@needs_kernel
@pytest.mark.parametrize("hidden", [64, 13])                   # 13: lanes beyond the last 8-wide block
def test_edge_first_layer_and_head_backward_match_torch(hidden):
    gen = torch.Generator().manual_seed(hidden)
    proj_recv, proj_send = torch.randn(20, hidden, generator=gen), torch.randn(31, hidden, generator=gen)
    recv, send = torch.randint(0, 20, (50,), generator=gen), torch.randint(0, 31, (50,), generator=gen)
    geo, w_geo = torch.randn(50, 3, generator=gen), torch.randn(hidden, 3, generator=gen)
    pre1, a1 = native.edge_pre1_silu(proj_recv, proj_send, recv, send, geo, w_geo)
    expected = proj_recv[recv] + proj_send[send] + geo @ w_geo.t()
    assert torch.allclose(pre1, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a1, F.silu(expected), rtol=1e-5, atol=1e-5)
    no_pre1, a1_only = native.edge_pre1_silu(proj_recv, proj_send, recv, send, geo, w_geo, keep_pre1=False)
    assert no_pre1 is None and torch.equal(a1_only, a1)
    g, v = torch.randn(50, 1, generator=gen), torch.randn(1, hidden, generator=gen)
    assert torch.allclose(native.silu_backward_outer(g, v, pre1), torch.ops.aten.silu_backward(g @ v, pre1),
                          rtol=2e-6, atol=1e-6)
    g_a1 = torch.randn(50, hidden, generator=gen)
    expected_pre1 = torch.ops.aten.silu_backward(g_a1, pre1)
    outs = [torch.randn(20, hidden, generator=gen), torch.randn(31, hidden, generator=gen), torch.randn(hidden, 3)]
    starts = [t.clone() for t in outs]
    g_geo = native.edge_pre1_backward(g_a1, pre1, recv, send, geo, w_geo, *outs)
    assert torch.allclose(g_geo, expected_pre1 @ w_geo, rtol=1e-5, atol=1e-5)
    for out, expected in zip(outs, (starts[0].index_add(0, recv, expected_pre1),
                                    starts[1].index_add(0, send, expected_pre1),
                                    starts[2] + expected_pre1.t() @ geo)):
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(IndexError, match="out of range"):
        native.edge_pre1_backward(g_a1, pre1, recv, send + 1, geo, w_geo, *outs)    # send 31 would write past the end


@needs_kernel
@pytest.mark.parametrize("width", [(64,), (3,), (3, 13)])       # message rows, displacements, virtual channels
def test_index_add_rows_matches_torch(width):
    gen = torch.Generator().manual_seed(len(width))
    index = torch.randint(0, 40, (300,), generator=gen)
    source = torch.randn(300, *width, generator=gen)
    start = torch.randn(40, *width, generator=gen)
    for alpha in (1.0, -1.0):
        out = start.clone()
        native.index_add_rows(out, index, source, alpha=alpha)
        assert torch.allclose(out, start.clone().index_add_(0, index, source, alpha=alpha), rtol=1e-6, atol=1e-6)
    with pytest.raises(IndexError, match="out of range"):
        native.index_add_rows(start.clone(), index + 1, source)          # index 40 would write past the end


@needs_kernel
@pytest.mark.parametrize("hidden", [64, 13])
def test_virtual_first_layer_and_backward_match_torch(hidden):
    gen = torch.Generator().manual_seed(hidden)
    n, c, graphs = 30, 3, 2
    per_node, per_channel = torch.randn(n, hidden, generator=gen), torch.randn(graphs, c, hidden, generator=gen)
    dist, batch = torch.rand(n, c, generator=gen), torch.randint(0, graphs, (n,), generator=gen)
    w_dist = torch.randn(hidden, 5, generator=gen)[:, 2]                       # a column: strided, as in the model
    pre1, a1 = native.virtual_pre1_silu(per_node, per_channel, dist, w_dist, batch)
    expected = (per_node.unsqueeze(1) + per_channel[batch] + dist.unsqueeze(-1) * w_dist).reshape(-1, hidden)
    assert torch.allclose(pre1, expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a1, F.silu(expected), rtol=1e-5, atol=1e-5)
    assert native.virtual_pre1_silu(per_node, per_channel, dist, w_dist, batch, keep_pre1=False)[0] is None
    g_a1 = torch.randn(n * c, hidden, generator=gen)
    g_pre1 = torch.ops.aten.silu_backward(g_a1, pre1).view(n, c, hidden)
    g_channel, g_wdist = torch.randn(graphs, c, hidden, generator=gen), torch.randn(hidden, generator=gen)
    start_channel, start_wdist = g_channel.clone(), g_wdist.clone()
    g_node, g_dist = native.virtual_pre1_backward(g_a1, pre1, dist, w_dist, batch, g_channel, g_wdist)
    assert torch.allclose(g_node, g_pre1.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_dist, g_pre1 @ w_dist, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_channel, start_channel.index_add(0, batch, g_pre1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_wdist, start_wdist + (dist.unsqueeze(-1) * g_pre1).sum((0, 1)), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_nan_stays_nan():
    x = torch.tensor([float("nan"), 1.0] * 8)
    assert native.silu(x).isnan().tolist() == x.isnan().tolist()
    assert native.silu_backward(torch.ones_like(x), x).isnan().tolist() == x.isnan().tolist()


def test_float64_and_strided_inputs_use_torch():
    x = torch.randn(16, 9, dtype=torch.float64)
    assert torch.equal(native.silu(x), F.silu(x))
    strided = torch.randn(9, 16).t()
    assert torch.equal(native.silu(strided), F.silu(strided))


@needs_kernel
def test_fused_float32_step_matches_torch_silu(monkeypatch):
    graph = random_graph()
    torch.manual_seed(0)
    model = FastEGNN(edge_chunk_size=7)
    kwargs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in graph.kwargs().items()}
    results = []
    for use_kernel in (True, False):
        monkeypatch.setattr(native, "_library", native.library() if use_kernel else None)
        model.zero_grad()
        pred = model(**kwargs)
        (pred.pos.square().sum() + pred.virtual_pos.square().sum()).backward()
        results.append((pred.pos.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (pos_kernel, grads_kernel), (pos_torch, grads_torch) = results
    assert torch.allclose(pos_kernel, pos_torch, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_kernel, grads_torch):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setenv("DIST_EGNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")                       # a "compiler" that always fails
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="could not build fused_avx2.c"):
        assert native.library() is None
    x = torch.randn(100)
    assert torch.equal(native.silu(x), F.silu(x))
    assert list((tmp_path / "cache").iterdir()) == []        # no half-written library left behind
