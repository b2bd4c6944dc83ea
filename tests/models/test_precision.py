"""bf16 autocast (``trainer.precision=bf16``): what runs in bfloat16, what stays float32, accuracy, equivariance.

The trainer runs the forward under ``torch.autocast(device_type, dtype=torch.bfloat16)`` and the loss outside it.
Guards: an output or a parameter gradient that comes back bfloat16; a sum over edges or nodes done in bfloat16;
a fused block that ignores autocast in forward or in backward (its worker threads never see autocast); the fused
and plain autograd paths drifting apart under bf16; the bfloat16 C kernels disagreeing with torch; and anything
at all changing for float32 (or float64) without autocast.

Tolerances come from measurements (2026-12-04, tests/equivariance.py's error: max |f(g x) - g f(x)| / max |g f(x)|,
coordinate heads scaled up as in test_models.py, 40-node graphs):

* equivariance under bf16, 20 seeds x {rotation, rotation-reflection} with translation and permutation: worst
  2.5e-4 (fused) / 3.5e-4 (plain) for FastEGNN, 2.2e-4 / 1.4e-4 for EGNN; the same error on pos' - pos relative to
  the displacement: worst 2.0e-3, about half a bfloat16 ulp. float32 without autocast: 3e-7. Tolerances: 1.5e-3
  and 8e-3, ~4x the worst cases.
* fused vs plain autograd under bf16, 10 seeds: outputs differ by at most 0.87 % of the largest displacement,
  whole-model parameter gradients by at most 0.43 % (relative norm); each is within 1.3 % / 0.52 % of the
  float32 result. Tolerances: 3.5 % and 2 % (~4x).
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dist_egnn.models import EGNN, FastEGNN, fused, native
from dist_egnn.models.fused import EdgeMessages, VirtualMessages

from equivariance import assert_equivariant, random_graph, random_orthogonal, transform

MODELS = [EGNN, FastEGNN]
BF16_EQUIVARIANCE = 1.5e-3          # relative to the largest output coordinate (worst measured 3.5e-4)
BF16_DISPLACEMENT_EQUIVARIANCE = 8e-3   # relative to the largest displacement pos' - pos (worst measured 2.0e-3)
BF16_FUSED_VS_PLAIN_POS = 0.035     # of the largest displacement (worst measured 0.0087)
BF16_FUSED_VS_PLAIN_GRAD = 0.02     # relative norm of all parameter gradients (worst measured 0.0043)
BF16_VS_FP32_POS = 0.05             # of the largest displacement (worst measured 0.013)
BF16_VS_FP32_GRAD = 0.02            # (worst measured 0.0052)


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _model(cls, seed=0, fused_blocks=True, **kwargs):
    torch.manual_seed(seed)
    model = cls(**kwargs)
    for name, module in model.named_modules():          # visible coordinate terms (see test_models.py)
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)
    model.set_fused(fused_blocks)
    return model


def _step(model, graph, precision="bf16"):
    """The trainer's step: forward under autocast, loss outside; returns (pos, virtual_pos, flat parameter grads)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        pred = model(**graph.kwargs())
    loss = pred.pos.square().mean() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().mean())
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return pred.pos.detach(), None if pred.virtual_pos is None else pred.virtual_pos.detach(), grads


class _Ops(TorchDispatchMode):
    """Records (op name, dtypes of its tensor arguments) of every op dispatched in this thread."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
        self.calls.append((func.overloadpacket.__name__, dtypes, tuple(tuple(a.shape) for a in args
                                                                           if isinstance(a, torch.Tensor))))
        return func(*args, **(kwargs or {}))


def _mlp_product(call) -> bool:
    """A recorded matrix product with every dimension above 3: the (rows, H) x (H, H) kind, which must run in bf16.
    Narrower ones may stay float32 by design: the embedding (F = 2), the geometry columns [|x_i - x_j|^2, e_ij]
    and their weights (1 + D = 3), outer products (K = 1); the scalar heads (N = 1) are not checked here."""
    return all(d > 3 for shape in call[2] for d in shape)


def _recorded(fn, monkeypatch):
    monkeypatch.setattr(fused, "PARALLEL_CHUNKS", False)    # dispatch modes are per thread: no worker threads
    with _Ops() as ops:
        fn()
    return ops.calls


# -- bf16 runs, and keeps float32 where it must ------------------------------------------------------------
@pytest.mark.parametrize("fused_blocks", [True, False])
@pytest.mark.parametrize("model_cls", MODELS)
def test_bf16_step_runs_with_float32_outputs_and_gradients(model_cls, fused_blocks):
    graph = random_graph(nodes=30).to(torch.float32)
    model = _model(model_cls, fused_blocks=fused_blocks, edge_chunk_size=50)
    with bf16():
        pred = model(**graph.kwargs())
    assert pred.pos.dtype == torch.float32 and torch.isfinite(pred.pos).all()
    if model_cls is FastEGNN:
        assert pred.virtual_pos.dtype == torch.float32 and torch.isfinite(pred.virtual_pos).all()
    loss = pred.pos.square().mean() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().mean())
    loss.backward()
    with_grad = [p for p in model.parameters() if p.grad is not None]
    assert with_grad and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in with_grad)
    assert all(torch.isfinite(p.grad).all() for p in with_grad)
    reference = _model(model_cls, fused_blocks=fused_blocks, edge_chunk_size=50)
    _step(reference, graph, "fp32")
    assert [p.grad is None for p in reference.parameters()] == [p.grad is None for p in model.parameters()]


@pytest.mark.parametrize("model_cls", MODELS)
def test_bf16_runs_the_mlp_products_in_bfloat16_and_every_sum_in_float32(model_cls, monkeypatch):
    graph = random_graph(nodes=30).to(torch.float32)
    model = _model(model_cls, edge_chunk_size=37)                # 37 rows: no other dimension has that size
    calls = _recorded(lambda: _step(model, graph), monkeypatch)
    products = [c for c in calls if c[0] in ("mm", "addmm", "addmm_", "bmm", "linear")]
    edge_rows = [c for c in products if any(37 in shape for shape in c[2]) and _mlp_product(c)]
    assert len(edge_rows) > 10, "no chunk-sized product recorded"
    assert all(set(c[1]) == {torch.bfloat16} for c in edge_rows), [c for c in edge_rows if torch.float32 in c[1]]
    mlp = [c for c in products if _mlp_product(c)]          # the embedding (K = F = 2) stays float32 too
    assert mlp and all(set(c[1]) == {torch.bfloat16} for c in mlp), [c for c in mlp if torch.float32 in c[1]]
    sums = [c for c in calls if c[0] in ("index_add", "index_add_", "scatter_add", "scatter_add_")]
    assert sums and all(c[1][0] == torch.float32 and c[1][-1] == torch.float32 for c in sums), sums


@pytest.mark.parametrize("model_cls", MODELS)
def test_float32_without_autocast_dispatches_nothing_in_bfloat16(model_cls, monkeypatch):
    graph = random_graph(nodes=30).to(torch.float32)
    model = _model(model_cls, edge_chunk_size=64)
    calls = _recorded(lambda: _step(model, graph, "fp32"), monkeypatch)
    assert calls and not [c for c in calls if torch.bfloat16 in c[1]]


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_without_bf16_results_are_unchanged(model_cls, dtype):
    # bit for bit: no autocast, an autocast that is off, and a step after a bf16 step (no state left behind).
    # (Against the code before bf16 support: asv_bench/PERF_NOTES.md §12 compared outputs and gradients of 16
    # configurations at 1 thread, all bit-identical.)
    graph = random_graph(nodes=30).to(dtype)
    model = _model(model_cls, edge_chunk_size=64).to(dtype)
    plain = _step(model, graph, "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        pred = model(**graph.kwargs())
    assert torch.equal(pred.pos, plain[0])
    if dtype == torch.float32:
        _step(model, graph, "bf16")
    again = _step(model, graph, "fp32")
    for a, b in zip(plain, again):
        assert a is None and b is None or torch.equal(a, b)


@pytest.mark.parametrize("model_cls", MODELS)
def test_float64_ignores_autocast(model_cls):
    graph = random_graph(nodes=30)
    model = _model(model_cls, edge_chunk_size=64).double()
    reference = _step(model, graph, "fp32")
    under_autocast = _step(model, graph, "bf16")
    for a, b in zip(reference, under_autocast):
        assert a is None and b is None or torch.equal(a, b)


# -- the fused blocks honour autocast in forward and backward ----------------------------------------------
def _edge_block_inputs(seed=0, hidden=16, n_owned=20, halo=5, edges=300):
    gen = torch.Generator().manual_seed(seed)
    n_all = n_owned + halo
    recv = torch.randint(0, n_owned, (edges,), generator=gen).sort().values
    send = torch.randint(0, n_all, (edges,), generator=gen)

    def w(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)
    return (w(n_all, hidden, scale=1.0), w(n_all, 3, scale=1.0), recv, send, w(edges, 2, scale=1.0),
            w(hidden, hidden), w(hidden, hidden), w(hidden, 3), w(hidden), w(hidden, hidden), w(hidden),
            w(hidden, hidden), w(hidden), w(1, hidden))


def test_edge_block_under_autocast_runs_bf16_products_in_forward_and_backward(monkeypatch):
    inputs = _edge_block_inputs()
    leaves = [t for t in inputs if t.requires_grad]

    def run(precision):
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            msg, disp = EdgeMessages.apply(*inputs, 20, 64)
        assert msg.dtype == disp.dtype == torch.float32
        (msg.square().sum() + disp.square().sum()).backward()       # backward outside autocast, as the trainer
        return [msg.detach(), disp.detach()] + [t.grad.clone() for t in leaves]

    calls = _recorded(lambda: run("bf16"), monkeypatch)
    backward_products = [c for c in calls if c[0] in ("mm", "addmm", "addmm_") and c[2][-1][0] == 16
                         and c[2][0][0] == 64 and _mlp_product(c)]   # chunk rows x H: backward's weight gradients
    assert any(set(c[1]) == {torch.bfloat16} for c in calls if c[0] == "addmm_"), "backward's grad_m products"
    assert backward_products and all(set(c[1]) == {torch.bfloat16} for c in backward_products)
    low, full = run("bf16"), run("fp32")
    for a, b in zip(low, full):
        assert a.dtype == torch.float32
        assert (a - b).norm() <= 0.02 * b.norm()


def test_virtual_block_under_autocast_returns_float32_and_float32_gradients():
    gen = torch.Generator().manual_seed(1)
    hidden, nodes, graphs, channels = 16, 40, 2, 3
    batch = torch.arange(graphs).repeat_interleave(nodes // graphs)

    def w(*shape, scale=0.3):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)
    inputs = [w(nodes, hidden, scale=1.0), w(graphs, channels, hidden, scale=1.0), w(nodes, channels, scale=1.0),
              w(hidden, hidden), w(hidden), batch, w(hidden, hidden), w(hidden), w(hidden, hidden), w(hidden),
              w(1, hidden), w(hidden, hidden), w(hidden), w(1, hidden)]
    leaves = [t for t in inputs if t.requires_grad]
    results = {}
    for precision in ("bf16", "fp32"):
        for t in leaves:
            t.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outs = VirtualMessages.apply(*inputs, 7)
        assert all(o.dtype == torch.float32 for o in outs)
        sum(o.square().sum() for o in outs).backward()
        assert all(t.grad.dtype == torch.float32 for t in leaves)
        results[precision] = [o.detach() for o in outs] + [t.grad.clone() for t in leaves]
    for a, b in zip(results["bf16"], results["fp32"]):
        assert (a - b).norm() <= 0.02 * b.norm()


# -- accuracy: fused vs plain under bf16, and bf16 vs float32 -----------------------------------------------
class _FixedHalo:
    """Halo rows from a neighbour (as in test_fused.py): the fused blocks' senders beyond the owned nodes."""

    world_size = 1

    def __init__(self, halo_h, halo_pos):
        self.halo_h, self.halo_pos = halo_h, halo_pos

    def sum_over_parts(self, *tensors):
        return tensors

    def exchange_halo(self, h, pos):
        return torch.cat([h, self.halo_h.to(h.dtype)]), torch.cat([pos, self.halo_pos])


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("halo", [False, True])
def test_fused_and_plain_autograd_agree_under_bf16(model_cls, halo):
    worst = []
    for seed in range(3):
        graph = random_graph(nodes=40, seed=seed).to(torch.float32)
        kwargs = {}
        if halo:
            gen = torch.Generator().manual_seed(seed)
            n, extra = graph.pos.shape[0], 6
            edges = torch.stack([torch.randint(0, n, (15,), generator=gen), n + torch.randint(0, extra, (15,),
                                                                                                 generator=gen)])
            graph.edge_index = torch.cat([graph.edge_index, edges], dim=1)
            graph.edge_attr = torch.cat([graph.edge_attr, torch.randn(15, 2, generator=gen)])
            kwargs["comm"] = _FixedHalo(torch.randn(extra, 64, generator=gen), torch.randn(extra, 3, generator=gen))
        fused_model = _model(model_cls, seed, edge_chunk_size=60, **kwargs)
        plain_model = _model(model_cls, seed, fused_blocks=False, edge_chunk_size=60, **kwargs)
        plain_model.load_state_dict(fused_model.state_dict())
        f, p = _step(fused_model, graph), _step(plain_model, graph)
        r = _step(fused_model, graph, "fp32")
        displacement = (r[0] - graph.pos).abs().max()
        assert (f[0] - p[0]).abs().max() <= BF16_FUSED_VS_PLAIN_POS * displacement
        assert (f[2] - p[2]).norm() <= BF16_FUSED_VS_PLAIN_GRAD * p[2].norm()
        for low in (f, p):
            assert (low[0] - r[0]).abs().max() <= BF16_VS_FP32_POS * displacement
            assert (low[2] - r[2]).norm() <= BF16_VS_FP32_GRAD * r[2].norm()
            if low[1] is not None:
                assert (low[1] - r[1]).abs().max() <= BF16_VS_FP32_POS * r[1].abs().max()
        worst.append(float((f[0] - p[0]).abs().max() / displacement))
    assert max(worst) > 0                                   # the two paths really ran in bfloat16


# -- equivariance under bf16 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("fused_blocks", [True, False])
@pytest.mark.parametrize("model_cls", MODELS)
def test_models_are_equivariant_under_bf16(model_cls, fused_blocks):
    model = _model(model_cls, fused_blocks=fused_blocks)
    graph = random_graph(nodes=40)

    def positions(g):
        with bf16():
            return model(**g.kwargs()).pos

    def displacements(g):
        with bf16():
            return model(**g.kwargs()).pos - g.pos
    assert_equivariant(positions, graph, torch.float32, tolerance=BF16_EQUIVARIANCE)
    from equivariance import equivariance_error
    for seed in range(3):
        for reflect in (False, True):
            err = equivariance_error(displacements, graph, torch.float32, seed=seed, reflect=reflect, translate=False)
            assert err < BF16_DISPLACEMENT_EQUIVARIANCE, (seed, reflect, err)


def test_fastegnn_virtual_positions_are_equivariant_under_bf16():
    model = _model(FastEGNN, seed=1)
    graph = random_graph(num_graphs=1, nodes=24).to(torch.float32)

    def virtual_as_nodes(g):
        with bf16():
            return model(**g.kwargs()).virtual_pos[0].T

    for seed, reflect in [(0, False), (1, True), (2, False)]:
        gen = torch.Generator().manual_seed(seed)
        q = random_orthogonal(gen, reflect, torch.float32)
        t = torch.randn(3, generator=gen)
        perm = torch.randperm(graph.pos.shape[0], generator=gen)
        expected = virtual_as_nodes(graph) @ q.T + t
        err = (virtual_as_nodes(transform(graph, q, t, perm)) - expected).abs().max() / expected.abs().max()
        assert err < BF16_EQUIVARIANCE


# -- the bfloat16 kernels ----------------------------------------------------------------------------------
needs_bf16_kernels = pytest.mark.skipif(native.bf16_library() is None,
                                        reason="no AVX512-BF16 CPU or no C compiler: torch's bf16 ops are used")
BF = torch.bfloat16


def _ulps(a, b):
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_bf16_kernels
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65_537])
def test_bf16_silu_and_derivative_match_torch(size):
    gen = torch.Generator().manual_seed(size)
    x = (torch.randn(size, generator=gen) * 8).to(BF)
    x[: min(size, 5)] = torch.tensor([0.0, -87.5, 88.5, -200.0, 200.0])[: min(size, 5)].to(BF)
    g = torch.randn(size, generator=gen).to(BF)
    out = native.silu(x)
    assert out.dtype == BF
    expected = F.silu(x.float())                          # float32 maths, one rounding (exp clamped below -87)
    assert ((_ulps(out, expected.to(BF)) <= 1) | ((out.float() - expected).abs() < 1e-30)).all()
    back = native.silu_backward(g, x)
    expected = torch.ops.aten.silu_backward(g.float(), x.float())
    assert back.dtype == BF and torch.allclose(back.float(), expected, rtol=8e-3, atol=1e-6)


@needs_bf16_kernels
def test_bf16_kernels_keep_nan():
    x = torch.tensor([float("nan"), 1.0] * 9).to(BF)
    assert torch.isnan(native.silu(x)[::2]).all() and not torch.isnan(native.silu(x)[1::2]).any()
    assert torch.isnan(native.silu_backward(torch.ones_like(x), x)[::2]).all()


@needs_bf16_kernels
@pytest.mark.parametrize("hidden", [64, 13])                     # 13: a masked tail in every row
def test_bf16_first_layers_and_scatter_match_torch_in_float32(hidden):
    gen = torch.Generator().manual_seed(hidden)

    def r(*shape):
        return torch.randn(*shape, generator=gen)
    proj_recv, proj_send = r(20, hidden).to(BF), r(31, hidden).to(BF)
    recv, send = torch.randint(0, 20, (50,), generator=gen), torch.randint(0, 31, (50,), generator=gen)
    geo, w_geo = r(50, 3), r(hidden, 3)
    pre1, a1 = native.edge_pre1_silu(proj_recv, proj_send, recv, send, geo, w_geo)
    exact = proj_recv.float()[recv] + proj_send.float()[send] + geo @ w_geo.t()
    assert pre1.dtype == a1.dtype == BF
    assert (_ulps(pre1, exact.to(BF)) <= 1).all() and (_ulps(a1, F.silu(exact).to(BF)) <= 1).all()
    no_pre1, a1_only = native.edge_pre1_silu(proj_recv, proj_send, recv, send, geo, w_geo, keep_pre1=False)
    assert no_pre1 is None and torch.equal(a1_only, a1)

    g_a1 = r(50, hidden).to(BF)
    g_recv, g_send, g_wgeo = torch.zeros(20, hidden), torch.zeros(31, hidden), torch.zeros(hidden, 3)
    g_geo = native.edge_pre1_backward(g_a1, pre1, recv, send, geo, w_geo, g_recv, g_send, g_wgeo)
    g_pre1 = torch.ops.aten.silu_backward(g_a1.float(), pre1.float())
    assert g_geo.dtype == torch.float32
    assert torch.allclose(g_geo, g_pre1 @ w_geo, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_recv, torch.zeros(20, hidden).index_add_(0, recv, g_pre1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_send, torch.zeros(31, hidden).index_add_(0, send, g_pre1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_wgeo, g_pre1.t() @ geo, rtol=1e-5, atol=1e-5)

    head_grad, v = r(50, 1), r(1, hidden)
    outer = native.silu_backward_outer(head_grad, v, pre1)
    assert outer.dtype == BF
    assert torch.allclose(outer.float(), torch.ops.aten.silu_backward(head_grad @ v, pre1.float()), rtol=8e-3,
                          atol=1e-5)

    total = r(20, hidden)                                         # bf16 rows added into float32 sums, unrounded
    expected = total.clone().index_add_(0, recv, a1.float(), alpha=-0.5)
    native.index_add_rows(total, recv, a1, alpha=-0.5)
    assert torch.allclose(total, expected, rtol=1e-6, atol=1e-6)

    batch = torch.tensor([0] * 4 + [1] * 5)
    per_node, per_channel, dist, w_dist = r(9, hidden).to(BF), r(2, 3, hidden).to(BF), r(9, 3), r(hidden)
    vpre1, va1 = native.virtual_pre1_silu(per_node, per_channel, dist, w_dist, batch)
    vexact = (per_channel.float()[batch] + per_node.float().unsqueeze(1) + dist.unsqueeze(-1) * w_dist).view(-1, hidden)
    assert (_ulps(vpre1, vexact.to(BF)) <= 1).all() and (_ulps(va1, F.silu(vexact).to(BF)) <= 1).all()
    g_va1 = r(27, hidden).to(BF)
    g_channel, g_wdist = torch.zeros(2, 3, hidden), torch.zeros(hidden)
    g_node, g_dist = native.virtual_pre1_backward(g_va1, vpre1, dist, w_dist, batch, g_channel, g_wdist)
    g_v = torch.ops.aten.silu_backward(g_va1.float(), vpre1.float()).view(9, 3, hidden)
    assert torch.allclose(g_node, g_v.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_dist, g_v @ w_dist, rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_channel, torch.zeros(2, 3, hidden).index_add_(0, batch, g_v), rtol=1e-5, atol=1e-5)
    assert torch.allclose(g_wdist, (dist.unsqueeze(-1) * g_v).sum((0, 1)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["native", "convert", "torch"])
def test_every_bf16_kernel_path_gives_the_same_model_within_bf16(path, monkeypatch):
    # the three ways of running the elementwise work on bf16 rows (native.BF16_PATH) and the torch fallback
    graph = random_graph(nodes=40).to(torch.float32)
    model = _model(FastEGNN, edge_chunk_size=60)
    reference = _step(model, graph, "fp32")
    monkeypatch.setattr(native, "BF16_PATH", path)
    low = _step(model, graph)
    displacement = (reference[0] - graph.pos).abs().max()
    assert (low[0] - reference[0]).abs().max() <= BF16_VS_FP32_POS * displacement
    assert (low[2] - reference[2]).norm() <= BF16_VS_FP32_GRAD * reference[2].norm()
