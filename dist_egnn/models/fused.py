"""Fused message blocks: the per-edge work of a layer with a hand-written backward, in chunks, recomputed.

Both message kinds of FastEGNN run the same small network on many rows (real edges ij, or real-virtual
pairs ic), with the same shape (docs/maths.md §2):

    pre1 = [first Linear of phi_e, applied in pieces]          (rows, H)   per-node parts gathered per row
    m    = SiLU(W2 SiLU(pre1) + b2)                             (rows, H)   the message
    s_k  = w_k · SiLU(W_k m + b_k)                              (rows, 1)   one scalar per coordinate head k

Autograd would keep every (rows, H) intermediate of every layer until backward: ~6 of them, ~1.5 KB per
edge per layer in float32. The functions here keep none: rows are processed in chunks of
``chunk_size``; forward computes a chunk, reduces it onto nodes and drops it; backward recomputes the
chunk's forward from the (small) saved inputs and applies the chain rule by hand, chunk by chunk. Every
(rows, H) pass then runs on a chunk that fits in cache; the C kernels in ``native.py`` (torch's where they do
not apply) make each SiLU, each SiLU derivative, each scatter-add, and the first layer of a chunk (edge or
real-virtual) and its backward one pass each.

Shapes: N owned real nodes, N_all = N + halo rows, E edges (receivers < N, senders < N_all), B graphs,
C virtual nodes, H hidden, D edge features.

The maths is the same as the plain autograd composition in ``egnn.py`` / ``fastegnn.py``; tests compare
both, and ``torch.autograd.gradcheck`` checks the hand-written backward in float64.

Mixed precision (``trainer.precision=bf16``: the forward under ``torch.autocast(dtype=torch.bfloat16)``). Both
functions read the autocast state of their forward (``ops.low_precision``), remember it for backward, and run
their bodies with autocast off, casting explicitly (autocast's state is per thread, and the chunk workers never
see it): the weights are cast to bfloat16 once per call; every matrix product (node projections, the chunks'
(rows, H) x (H, H) layers and heads, their backward products, the weight gradients) runs in bfloat16 with
float32 accumulation inside the GEMM; the (rows, H) activations and gradients between them are bfloat16.
Everything else stays float32: positions and x_i - x_j, the geometry columns of the first layers
(|x_i - x_j|^2, e_ij, |x_i - z_c|) and their weights, every sum over rows (message and displacement sums,
scatter-adds of gradients, bias gradients; a weight gradient is one bf16 GEMM per chunk, accumulated in float32
inside it and added into a float32 accumulator) and the outputs; gradients come back in their inputs' dtypes
(float32 for the float32 parameters). Without autocast, or for float64 inputs, nothing changes (the same
operations as before, bit for bit).

The elementwise C kernels have bfloat16 variants (``fused_avx512bf16.c`` through ``native.py``): bf16 loads and
stores, float32 arithmetic and accumulators, written with AVX-512 and AVX512-BF16 (one instruction rounds 16
lanes to bf16) and used where the CPU has them; the float32 kernels (``fused_avx2.c``) are untouched. Chosen by
measurement (20K-node graph, FastEGNN step, 1 thread, CPU time, interleaved; asv_bench/PERF_NOTES.md §12,
``benchmarks/precision.py``): with AVX2 bf16 variants (the rounding done in integer instructions) the bf16 step
was no faster than converting every GEMM output to float32 for the float32 kernels, or than torch's bf16 ops
(2.26 / 2.31 / 2.21 s, fp32 3.41 s): the kernels are bound by vector instructions and the AVX2 rounding doubled
them. The AVX-512 variants: 1.99 s against 2.34 s (convert) and 2.56 s (torch's ops), fp32 3.67 s. Elsewhere
(no AVX512-BF16, or no compiler) torch's bf16 ops run; where bf16 matrix products are not fast (no AVX512-BF16
or AMX), bf16 autocast is not worth using on a CPU anyway.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from dist_egnn.models.native import (
    edge_pre1_backward,
    edge_pre1_silu,
    index_add_rows,
    silu,
    silu_backward,
    silu_backward_outer,
    virtual_pre1_backward,
    virtual_pre1_silu,
)
from dist_egnn.models.ops import full_precision, low_precision

DEFAULT_CHUNK = 16384
"""Rows per chunk: (16384, 64) float32 is 4 MiB, so a chunk's intermediates stay in the CPU's last-level cache."""

DEFAULT_CHUNK_LOW = 8192
"""Rows per chunk under bf16 autocast: the same step time as 4096 or 16384 rows (1 thread, 20K-node graph) and
-15 % step memory (258 -> 222 B per edge), the chunk buffers being most of what a step holds beyond the saved
node tensors (asv_bench/PERF_NOTES.md §12)."""


NORMALIZE_EPS = 1e-8
"""``model.normalize``: x_i - x_j is divided by (|x_i - x_j| + NORMALIZE_EPS), the authors' constant."""


def _default_chunk(like: Tensor) -> int:
    return DEFAULT_CHUNK if low_precision(like) is None else DEFAULT_CHUNK_LOW

PARALLEL_CHUNKS = True
"""Spread the chunks over ``torch.get_num_threads()`` worker threads, each running its ops single-threaded.

One join per block instead of one OpenMP barrier per small op: as fast on an idle machine, and robust on a
busy one, where a barrier waits for a descheduled partner thread (see asv_bench/PERF_NOTES.md). False:
chunks run one after the other in the calling thread, with torch's usual intra-op threads.
"""

_pools: dict[int, ThreadPoolExecutor] = {}


def _single_threaded_worker():
    torch.set_num_threads(1)          # OpenMP and MKL thread counts are per calling thread: this worker only


def _run_chunks(total: int, chunk_size: int, work) -> list:
    """``work(starts)`` on groups of chunk starts, one contiguous group per worker; the list of results.

    ``work`` runs without autograd recording and must only write disjoint rows of shared outputs; whatever
    it accumulates across chunks it returns, and the caller adds the workers' results up.
    """
    starts = list(range(0, total, chunk_size))
    workers = min(torch.get_num_threads(), len(starts)) if PARALLEL_CHUNKS else 1
    if workers <= 1:
        with torch.no_grad():
            return [work(starts)]
    bounds = [round(k * len(starts) / workers) for k in range(workers + 1)]
    if workers not in _pools:
        _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="dist-egnn-chunks",
                                             initializer=_single_threaded_worker)

    def no_grad_work(group):
        with torch.no_grad():
            return work(group)
    futures = [_pools[workers].submit(no_grad_work, starts[a:b]) for a, b in zip(bounds, bounds[1:])]
    return [f.result() for f in futures]


def _add_up(results: list):
    """Element-wise sum of the workers' results (tensors, tuples and dicts of tensors)."""
    first = results[0]
    for other in results[1:]:
        pairs = first.items() if isinstance(first, dict) else enumerate(first)
        for key, value in pairs:
            if isinstance(value, (dict, tuple, list)):
                _add_up([value, other[key]])
            elif value is not None:
                value += other[key]
    return first


# -- precision -----------------------------------------------------------------------------------------------
def _operands(low: torch.dtype | None, *tensors: Tensor) -> list[Tensor]:
    """The tensors as matrix-product operands: cast to ``low``, or the same tensors without it."""
    return list(tensors) if low is None else [t.to(low) for t in tensors]


def _add_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b. A lower-precision product (bfloat16 operands, float32 accumulation inside the GEMM) is added
    into the float32 accumulator; ``a`` is cast to ``b``'s dtype (a float32 head gradient meets bf16 rows)."""
    if a.dtype == acc.dtype and b.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc += a.to(b.dtype) @ b


def _add_row_sum(acc: Tensor, x: Tensor) -> None:
    """acc += x.sum(0), summed in the accumulator's dtype."""
    if x.dtype == acc.dtype:
        acc += x.sum(0)
    else:
        acc += x.sum(0, dtype=acc.dtype)


# -- the shared row network: SiLU(Linear(SiLU(pre1))) and its scalar heads ---------------------------------
def _rows_forward(pre1: Tensor, w2: Tensor, b2: Tensor, heads: list[tuple[Tensor, Tensor, Tensor]],
                  a1: Tensor | None = None):
    """pre1 (R, H) -> (a1, pre2, m, [(c_pre, c_act, s)]): every intermediate of one chunk, s (R, 1).

    ``a1`` = SiLU(pre1) when the caller already has it."""
    a1 = silu(pre1) if a1 is None else a1
    pre2 = torch.addmm(b2, a1, w2.t())
    m = silu(pre2)
    head_values = []
    for wk, bk, vk in heads:
        c_pre = torch.addmm(bk, m, wk.t())
        c_act = silu(c_pre)
        head_values.append((c_pre, c_act, c_act @ vk.t()))
    return a1, pre2, m, head_values


def _rows_backward(pre1, a1, pre2, m, head_values, grad_m: Tensor, grad_s: list[Tensor | None], w2: Tensor,
                   heads, grads: dict, through_first_silu: bool = True) -> Tensor:
    """Chain rule through :func:`_rows_forward`; accumulates weight gradients into ``grads``.

    grad_m (R, H) is consumed (written in place). Returns grad of pre1 (R, H), or of a1 = SiLU(pre1) without
    ``through_first_silu`` (for a caller whose kernel folds that step into its own backward).
    """
    for k, ((wk, _bk, vk), (c_pre, c_act, _s), g_s) in enumerate(zip(heads, head_values, grad_s)):
        if g_s is None:
            continue
        _add_mm(grads[f"v{k}"], g_s.t(), c_act)                   # d s / d v_k = c_act
        g_cpre = silu_backward_outer(g_s, vk, c_pre)           # (g_s vk) * silu'(c_pre), (R, H)
        _add_mm(grads[f"w{k}"], g_cpre.t(), m)
        _add_row_sum(grads[f"b{k}"], g_cpre)
        grad_m.addmm_(g_cpre, wk)
    g_pre2 = silu_backward(grad_m, pre2)
    _add_mm(grads["w2"], g_pre2.t(), a1)
    _add_row_sum(grads["b2"], g_pre2)
    g_a1 = g_pre2 @ w2
    return silu_backward(g_a1, pre1) if through_first_silu else g_a1


def _new_grads(w2, b2, heads) -> dict:
    grads = {"w2": torch.zeros_like(w2), "b2": torch.zeros_like(b2)}
    for k, (wk, bk, vk) in enumerate(heads):
        grads[f"w{k}"], grads[f"b{k}"], grads[f"v{k}"] = (torch.zeros_like(wk), torch.zeros_like(bk),
                                                          torch.zeros_like(vk))
    return grads


# -- real-real edges: term (1) and the real-real part of term (4) -----------------------------------------
class EdgeMessages(torch.autograd.Function):
    """Sum over received edges of m_ij and of (x_i - x_j) phi_x(m_ij), without keeping any (E, H) tensor.

    Inputs: h_all (N_all, H) owned rows first, pos_all (N_all, 3), recv (E,) < N, send (E,) < N_all,
    edge_attr (E, D), then phi_e's first Linear cut by input columns: w_recv (H, H), w_send (H, H),
    w_geo (H, 1 + D) (for [|x_i - x_j|^2, e_ij]) and b1 (H,); phi_e's second Linear w2 (H, H), b2 (H,);
    phi_x: wx (H, H), bx (H,), vx (1, H); n_owned N; chunk_size; normalize (``model.normalize``: the
    displacement reads (x_i - x_j) / (|x_i - x_j| + 1e-8), the norm a constant for the backward, as detached).
    Outputs: message sum (N, H), displacement sum (N, 3) (divide by the degree for means).

    x_i - x_j, its norm and the displacement are computed here in torch (:func:`_edge_inputs`,
    :func:`_direction`), not in the C kernels (``native.py`` receives the geometry columns |x_i - x_j|^2, e_ij and
    returns their gradient), so ``normalize`` needs no kernel of its own.

    The node projections h_i W_recv^T + b1 and h_j W_send^T are computed here once per node (not per edge)
    and recomputed in backward, so only the inputs are kept. Under autocast: see the module docstring.
    """

    @staticmethod
    def forward(ctx, h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1, w2, b2, wx, bx, vx,
                n_owned, chunk_size, normalize=False):
        ctx.low = low = low_precision(pos_all)
        ctx.normalize = normalize
        with full_precision(pos_all):          # the body casts explicitly (and its workers never see autocast)
            return EdgeMessages._forward(ctx, low, h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1,
                                         w2, b2, wx, bx, vx, n_owned, chunk_size)

    @staticmethod
    def _forward(ctx, low, h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1, w2, b2, wx, bx, vx,
                 n_owned, chunk_size):
        normalize = ctx.normalize
        acc = h_all.dtype if low is None else pos_all.dtype                     # the sums' dtype
        h_mm, w_recv_mm, w_send_mm, b1_mm, w2_mm, b2_mm, wx_mm, bx_mm, vx_mm = _operands(
            low, h_all, w_recv, w_send, b1, w2, b2, wx, bx, vx)
        proj_recv = torch.addmm(b1_mm, h_mm[:n_owned], w_recv_mm.t())           # (N, H)
        proj_send = h_mm @ w_send_mm.t()                                         # (N_all, H)
        heads = [(wx_mm, bx_mm, vx_mm)]

        def work(starts):
            msg_sum = h_all.new_zeros(n_owned, h_all.shape[1], dtype=acc)
            disp_sum = pos_all.new_zeros(n_owned, 3)
            for start in starts:
                r, s = recv[start:start + chunk_size], send[start:start + chunk_size]
                diff, _geo, pre1, a1 = _edge_inputs(proj_recv, proj_send, pos_all, r, s,
                                                    edge_attr[start:start + chunk_size], w_geo, keep_pre1=False)
                _a1, _pre2, m, ((_c, _act, weight),) = _rows_forward(pre1, w2_mm, b2_mm, heads, a1)
                index_add_rows(msg_sum, r, m)
                index_add_rows(disp_sum, r, _direction(diff, normalize)[0] * weight)
            return msg_sum, disp_sum

        if recv.shape[0]:
            msg_sum, disp_sum = _add_up(_run_chunks(recv.shape[0], chunk_size, work))
        else:
            msg_sum, disp_sum = h_all.new_zeros(n_owned, h_all.shape[1], dtype=acc), pos_all.new_zeros(n_owned, 3)
        ctx.save_for_backward(h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1, w2, b2, wx, bx,
                              vx)
        ctx.n_owned, ctx.chunk_size = n_owned, chunk_size
        return msg_sum, disp_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_msg, grad_disp):
        with full_precision(grad_disp):
            return EdgeMessages._backward(ctx, ctx.low, grad_msg, grad_disp)

    @staticmethod
    def _backward(ctx, low, grad_msg, grad_disp):
        h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1, w2, b2, wx, bx, vx = ctx.saved_tensors
        n_owned, chunk_size = ctx.n_owned, ctx.chunk_size
        acc = h_all.dtype if low is None else pos_all.dtype
        h_mm, w_recv_mm, w_send_mm, b1_mm, w2_mm, b2_mm, wx_mm, bx_mm, vx_mm = _operands(
            low, h_all, w_recv, w_send, b1, w2, b2, wx, bx, vx)
        proj_recv = torch.addmm(b1_mm, h_mm[:n_owned], w_recv_mm.t())
        proj_send = h_mm @ w_send_mm.t()
        heads = [(wx_mm, bx_mm, vx_mm)]
        g_attr = torch.zeros_like(edge_attr) if ctx.needs_input_grad[4] else None
        grad_msg = grad_msg.contiguous()
        grad_disp = grad_disp.contiguous()
        grad_msg_mm = grad_msg if low is None else grad_msg.to(low)

        def work(starts):
            grads = _new_grads(w2, b2, [(wx, bx, vx)])
            g_recv = proj_recv.new_zeros(proj_recv.shape, dtype=acc)
            g_send = proj_send.new_zeros(proj_send.shape, dtype=acc)
            g_pos, g_wgeo = torch.zeros_like(pos_all), torch.zeros_like(w_geo)
            for start in starts:
                part = slice(start, start + chunk_size)
                r, s = recv[part], send[part]
                diff, geo, pre1, a1 = _edge_inputs(proj_recv, proj_send, pos_all, r, s, edge_attr[part], w_geo)
                a1, pre2, m, head_values = _rows_forward(pre1, w2_mm, b2_mm, heads, a1)
                weight = head_values[0][2]                                         # phi_x(m_ij) (e, 1)
                direction, norm = _direction(diff, ctx.normalize)                   # (e, 3), (e, 1) or None
                g_disp_e = grad_disp.index_select(0, r)                             # (e, 3)
                g_weight = (g_disp_e * direction).sum(1, keepdim=True)              # (e, 1)
                g_diff = g_disp_e * weight                                          # (e, 3)
                if norm is not None:                                                # the norm is a constant
                    g_diff = g_diff / norm
                g_a1 = _rows_backward(pre1, a1, pre2, m, head_values, grad_msg_mm.index_select(0, r),
                                      [g_weight], w2_mm, heads, grads, through_first_silu=False)
                g_geo = edge_pre1_backward(g_a1, pre1, r, s, geo, w_geo, g_recv, g_send, g_wgeo)   # (e, 1 + D)
                g_diff.addcmul_(diff, g_geo[:, :1], value=2.0)                      # through |x_i - x_j|^2
                if g_attr is not None:
                    g_attr[part] = g_geo[:, 1:]
                index_add_rows(g_pos, r, g_diff)
                index_add_rows(g_pos, s, g_diff, alpha=-1.0)
            return g_recv, g_send, g_pos, g_wgeo, grads

        if recv.shape[0]:
            g_recv, g_send, g_pos, g_wgeo, grads = _add_up(_run_chunks(recv.shape[0], chunk_size, work))
        else:
            g_recv = proj_recv.new_zeros(proj_recv.shape, dtype=acc)
            g_send = proj_send.new_zeros(proj_send.shape, dtype=acc)
            g_pos, g_wgeo = torch.zeros_like(pos_all), torch.zeros_like(w_geo)
            grads = _new_grads(w2, b2, [(wx, bx, vx)])
        if low is None:
            g_h = g_send @ w_send                                               # (N_all, H)
            g_h[:n_owned].addmm_(g_recv, w_recv)
            g_w_recv, g_w_send = g_recv.t() @ h_all[:n_owned], g_send.t() @ h_all
        else:                                                                   # node-sized products in low precision
            g_recv_mm, g_send_mm = g_recv.to(low), g_send.to(low)
            g_h = (g_send_mm @ w_send_mm).to(h_all.dtype)
            g_h[:n_owned] += g_recv_mm @ w_recv_mm
            g_w_recv = (g_recv_mm.t() @ h_mm[:n_owned]).to(w_recv.dtype)
            g_w_send = (g_send_mm.t() @ h_mm).to(w_send.dtype)
        return (g_h, g_pos, None, None, g_attr, g_w_recv, g_w_send, g_wgeo, g_recv.sum(0).to(b1.dtype), grads["w2"],
                grads["b2"], grads["w0"], grads["b0"], grads["v0"], None, None, None)


def _edge_inputs(proj_recv, proj_send, pos_all, r, s, edge_attr, w_geo, keep_pre1: bool = True):
    """x_i - x_j (e, 3), [|x_i - x_j|^2, e_ij] (e, 1 + D), pre1 and SiLU(pre1) (e, H) of one chunk of edges
    (pre1 may be None without ``keep_pre1``: only backward needs it)."""
    diff = pos_all.index_select(0, r) - pos_all.index_select(0, s)
    geo = torch.cat([(diff * diff).sum(1, keepdim=True), edge_attr], dim=1)
    pre1, a1 = edge_pre1_silu(proj_recv, proj_send, r, s, geo, w_geo, keep_pre1)
    return diff, geo, pre1, a1


def _direction(diff: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    """The vector of the real-real sum of term (4) for a chunk, (e, 3): x_i - x_j, or with ``normalize``
    (x_i - x_j) / n with n = |x_i - x_j| + 1e-8 (e, 1), also returned (None without): the backward treats n as
    a constant, the plain path's detached norm (``EGNNLayer.direction``, same expression, same rounding)."""
    if not normalize:
        return diff, None
    norm = torch.linalg.vector_norm(diff, dim=1, keepdim=True) + NORMALIZE_EPS
    return diff / norm, norm


def edge_messages(h_all: Tensor, pos_all: Tensor, edge_index: Tensor, edge_attr: Tensor, n_owned: int,
                  first_linear: torch.nn.Linear, message_linear: torch.nn.Linear, coord_mlp: torch.nn.Sequential,
                  chunk_size: int | None = None, normalize: bool = False) -> tuple[Tensor, Tensor]:
    """:class:`EdgeMessages` with the weights of phi_e (first Linear cut as [h_i | h_j | geometry]) and phi_x;
    ``normalize``: ``model.normalize`` (see :class:`EdgeMessages`)."""
    hidden = h_all.shape[1]
    w_recv, w_send, w_geo = torch.split(first_linear.weight, [hidden, hidden, first_linear.in_features - 2 * hidden],
                                        dim=1)
    return EdgeMessages.apply(h_all, pos_all, edge_index[0], edge_index[1], edge_attr, w_recv, w_send, w_geo,
                              first_linear.bias, message_linear.weight, message_linear.bias, coord_mlp[0].weight,
                              coord_mlp[0].bias, coord_mlp[2].weight, int(n_owned),
                              int(chunk_size or _default_chunk(pos_all)), bool(normalize))


# -- real-virtual pairs: term (3) and the heads of terms (4) and (5) ----------------------------------------
class VirtualMessages(torch.autograd.Function):
    """The reductions of m_ic that FastEGNN uses, and two scalar heads phi_xv(m_ic), phi_X(m_ic) (N, C), with
    no (N, C, H) tensor at all.

    Inputs: h (N, H), per_channel (B, C, H) = s_c W_s^T + g_c W_g^T + b1, dist (N, C) = |x_i - z_c|,
    w_h (H, H) and w_dist (H,) (the h_i and distance columns of phi_ev's first Linear), batch (N,),
    w2 (H, H), b2 (H,), then (W, b, v) of phi_xv and of phi_X, chunk_size (real nodes per chunk; a chunk has
    C times as many rows).
    Outputs: mean_c m_ic (N, H) for term (6); sum over this process's nodes i of each graph of m_ic (B, C, H),
    which the caller turns into the graph means of term (7) (summed over processes); the two heads.
    Returning the reductions instead of m_ic saves writing it, reducing it twice, and materialising both
    broadcast gradients in backward: ~8 passes over (N, C, H) per layer (87 MB each at 113K nodes).
    """

    @staticmethod
    def forward(ctx, h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va, wb, bb, vb, chunk_size):
        ctx.low = low = low_precision(dist)
        with full_precision(dist):
            return VirtualMessages._forward(ctx, low, h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va,
                                            wb, bb, vb, chunk_size)

    @staticmethod
    def _forward(ctx, low, h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va, wb, bb, vb, chunk_size):
        n, c = dist.shape
        hidden = w2.shape[0]
        acc = h.dtype if low is None else dist.dtype                            # the reductions' dtype
        h_mm, channel_mm, w_h_mm, w2_mm, b2_mm, wa_mm, ba_mm, va_mm, wb_mm, bb_mm, vb_mm = _operands(
            low, h, per_channel, w_h, w2, b2, wa, ba, va, wb, bb, vb)
        per_node = h_mm @ w_h_mm.t()                                             # (N, H)
        node_mean = h.new_empty(n, hidden, dtype=acc)
        head_a = dist.new_empty(n, c)
        head_b = dist.new_empty(n, c)
        heads = [(wa_mm, ba_mm, va_mm), (wb_mm, bb_mm, vb_mm)]

        def work(starts):
            graph_sum = per_channel.new_zeros(per_channel.shape, dtype=acc)   # this worker's share
            for start in starts:
                part = slice(start, start + chunk_size)
                _, a1 = virtual_pre1_silu(per_node[part], channel_mm, dist[part], w_dist, batch[part],
                                          keep_pre1=False)
                _a1, _pre2, m, ((_, _, sa), (_, _, sb)) = _rows_forward(None, w2_mm, b2_mm, heads, a1)
                m = m.view(-1, c, hidden)
                if m.dtype == acc:
                    torch.mean(m, dim=1, out=node_mean[part])
                else:
                    torch.mean(m, dim=1, dtype=acc, out=node_mean[part])
                index_add_rows(graph_sum, batch[part], m)
                head_a[part] = sa.view(-1, c)
                head_b[part] = sb.view(-1, c)
            return graph_sum

        graph_sum = (_add_up(_run_chunks(n, chunk_size, work)) if n
                     else per_channel.new_zeros(per_channel.shape, dtype=acc))
        ctx.save_for_backward(h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va, wb, bb, vb)
        ctx.chunk_size = chunk_size
        return node_mean, graph_sum, head_a, head_b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_node_mean, grad_graph_sum, grad_a, grad_b):
        with full_precision(grad_a if grad_a is not None else ctx.saved_tensors[2]):
            return VirtualMessages._backward(ctx, ctx.low, grad_node_mean, grad_graph_sum, grad_a, grad_b)

    @staticmethod
    def _backward(ctx, low, grad_node_mean, grad_graph_sum, grad_a, grad_b):
        h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va, wb, bb, vb = ctx.saved_tensors
        n, c = dist.shape
        acc = h.dtype if low is None else dist.dtype
        h_mm, channel_mm, w_h_mm, w2_mm, b2_mm, wa_mm, ba_mm, va_mm, wb_mm, bb_mm, vb_mm = _operands(
            low, h, per_channel, w_h, w2, b2, wa, ba, va, wb, bb, vb)
        per_node = h_mm @ w_h_mm.t()
        heads = [(wa_mm, ba_mm, va_mm), (wb_mm, bb_mm, vb_mm)]
        g_node = per_node.new_zeros(per_node.shape, dtype=acc)
        g_dist = torch.zeros_like(dist)
        chunk_size = ctx.chunk_size

        def work(starts):
            grads = _new_grads(w2, b2, [(wa, ba, va), (wb, bb, vb)])
            g_channel = per_channel.new_zeros(per_channel.shape, dtype=acc)
            g_wdist = torch.zeros_like(w_dist)
            for start in starts:
                part = slice(start, start + chunk_size)
                pre1, a1 = virtual_pre1_silu(per_node[part], channel_mm, dist[part], w_dist, batch[part])
                a1, pre2, m, head_values = _rows_forward(pre1, w2_mm, b2_mm, heads, a1)
                g_m = _message_gradient(grad_node_mean, grad_graph_sum, batch[part], part, m, c)
                g_s = [None if g is None else g[part].reshape(-1, 1) for g in (grad_a, grad_b)]
                g_a1 = _rows_backward(pre1, a1, pre2, m, head_values, g_m, g_s, w2_mm, heads, grads,
                                      through_first_silu=False)
                g_node[part], g_dist[part] = virtual_pre1_backward(g_a1, pre1, dist[part], w_dist, batch[part],
                                                                   g_channel, g_wdist)
            return g_channel, g_wdist, grads

        if n:
            g_channel, g_wdist, grads = _add_up(_run_chunks(n, chunk_size, work))
        else:
            g_channel, g_wdist = per_channel.new_zeros(per_channel.shape, dtype=acc), torch.zeros_like(w_dist)
            grads = _new_grads(w2, b2, [(wa, ba, va), (wb, bb, vb)])
        if low is None:
            g_h, g_w_h = g_node @ w_h, g_node.t() @ h
        else:                                                                   # node-sized products in low precision
            g_node_mm = g_node.to(low)
            g_h, g_w_h = (g_node_mm @ w_h_mm).to(h.dtype), (g_node_mm.t() @ h_mm).to(w_h.dtype)
        return (g_h, g_channel.to(per_channel.dtype), g_dist, g_w_h, g_wdist, None, grads["w2"], grads["b2"],
                grads["w0"], grads["b0"], grads["v0"], grads["w1"], grads["b1"], grads["v1"], None)


def _message_gradient(grad_node_mean, grad_graph_sum, batch, part, m, c) -> Tensor:
    """The gradient of one chunk's m_ic, (n C, H), rebuilt from the gradients of its two reductions (summed in
    their dtype, then given m's: bfloat16 under autocast)."""
    if grad_graph_sum is None:
        g_m = m.new_zeros(m.shape, dtype=m.dtype if grad_node_mean is None else grad_node_mean.dtype)
        g_m = g_m.view(-1, c, m.shape[1])
    else:
        g_m = grad_graph_sum.index_select(0, batch)                                 # (n, C, H)
    if grad_node_mean is not None:
        g_m += (grad_node_mean[part] / c).unsqueeze(1)
    return g_m.view(-1, m.shape[1]).to(m.dtype)


def virtual_messages(h: Tensor, per_channel: Tensor, dist: Tensor, w_h: Tensor, w_dist: Tensor, batch: Tensor,
                     message_linear: torch.nn.Linear, pull_mlp: torch.nn.Sequential,
                     push_mlp: torch.nn.Sequential, chunk_size: int | None = None):
    """:class:`VirtualMessages` with the weights of phi_ev's second Linear, phi_xv and phi_X."""
    rows = int(chunk_size or _default_chunk(dist))
    nodes_per_chunk = max(1, rows // max(1, dist.shape[1]))
    return VirtualMessages.apply(h, per_channel, dist, w_h, w_dist, batch, message_linear.weight,
                                 message_linear.bias, pull_mlp[0].weight, pull_mlp[0].bias, pull_mlp[2].weight,
                                 push_mlp[0].weight, push_mlp[0].bias, push_mlp[2].weight, nodes_per_chunk)
