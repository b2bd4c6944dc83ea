"""The fused blocks' elementwise work from small C kernels (``fused_avx2.c``) where they apply, else torch.

The kernel is compiled with the system C compiler at first use into a per-user cache
(``$DIST_EGNN_CACHE`` or ``~/.cache/dist_egnn``, keyed by a hash of the source and flags, written atomically so
concurrent ranks can race safely) and called through ctypes, which releases the GIL, so the chunk workers of
``fused.py`` run it in parallel. It applies to contiguous float32 CPU tensors on a CPU with AVX2; everything
else (float64, CUDA, no compiler, ``DIST_EGNN_NATIVE=0``) takes the torch composition beside each function,
which is also the reference the tests compare it with (a few float32 ulp apart).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

SOURCE = Path(__file__).with_name("fused_avx2.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-shared", "-fPIC"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_EGNN_CACHE") or Path.home() / ".cache" / "dist_egnn")


def _build() -> ctypes.CDLL | None:
    """Compile (or reuse) and load the kernel; None where it cannot apply, with a warning if that is a surprise."""
    if os.environ.get("DIST_EGNN_NATIVE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        warnings.warn("dist_egnn: no C compiler found (set CC): the fused blocks run on torch's kernels (slower, "
                      "same maths)")
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"fused_avx2-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                               text=True, timeout=120)
                os.replace(tmp, target)                 # atomic: another rank may have finished first, same bytes
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"dist_egnn: could not build {SOURCE.name} with {compiler} into {target.parent} ({detail}); "
                      "the fused blocks run on torch's kernels (slower, same maths). DIST_EGNN_NATIVE=0 silences this.")
        return None
    library.silu_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    library.silu_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    library.edge_pre1_silu.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    library.silu_backward_outer.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p]
    library.index_add_rows.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float]
    library.edge_pre1_backward.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4
    library.virtual_pre1_silu.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    library.virtual_pre1_backward.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4
    return library


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None where it does not apply."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _build()
                _tried = True
    return _library


def _applies(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _indices_apply(*indices: Tensor) -> bool:
    return all(t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous() for t in indices)


def _shapes_fit(*pairs: tuple[Tensor, tuple[int, ...]]) -> bool:
    """Every tensor has the shape given: the C kernels trust their arguments' sizes, so a mismatch takes the
    torch composition, which raises a readable error instead of reading or writing out of bounds."""
    return all(tuple(t.shape) == tuple(shape) for t, shape in pairs)


def _check_rows(index: Tensor, rows: int, name: str) -> None:
    """The kernels read or write rows ``index`` of a (rows, ...) tensor: refuse indices that would go elsewhere."""
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= rows):
        raise IndexError(f"{name}: index out of range for {rows} rows")


EDGE_GEO_MAX = 16
"""Widest geometry input [|x_i - x_j|^2, e_ij] the C backward of the first edge layer takes (edge features + 1)."""


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x), without autograd (the fused blocks' backward is written by hand)."""
    lib = library()
    if lib is None or not _applies(x):
        return F.silu(x)
    out = torch.empty_like(x)
    lib.silu_forward(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * d silu(x) / dx."""
    lib = library()
    if lib is None or not _applies(grad, x) or grad.shape != x.shape:
        return torch.ops.aten.silu_backward(grad, x)
    out = torch.empty_like(x)
    lib.silu_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel())
    return out


def edge_pre1_silu(proj_recv: Tensor, proj_send: Tensor, recv: Tensor, send: Tensor, geo: Tensor,
                   w_geo: Tensor, keep_pre1: bool = True) -> tuple[Tensor | None, Tensor]:
    """pre1 = proj_recv[recv] + proj_send[send] + geo @ w_geo^T and SiLU(pre1), each (e, H).

    proj_recv (N, H), proj_send (N_all, H), recv / send (e,), geo (e, G), w_geo (H, G). With ``keep_pre1``
    False the C kernel does not store pre1 (only backward needs it) and None is returned in its place.
    """
    lib = library()
    e, hidden = recv.shape[0], proj_recv.shape[1]
    if lib is None or not (_applies(proj_recv, proj_send, geo) and _indices_apply(recv, send)
                           and w_geo.dtype == torch.float32 and w_geo.device.type == "cpu"
                           and _shapes_fit((send, (e,)), (geo, (e, geo.shape[1])), (w_geo, (hidden, geo.shape[1])),
                                           (proj_send, (proj_send.shape[0], hidden)))):
        pre1 = torch.addmm(proj_recv.index_select(0, recv), geo, w_geo.t())
        pre1 += proj_send.index_select(0, send)
        return (pre1 if keep_pre1 else None), silu(pre1)
    _check_rows(recv, proj_recv.shape[0], "edge_pre1_silu (recv)")
    _check_rows(send, proj_send.shape[0], "edge_pre1_silu (send)")
    w_geo_t = w_geo.t().contiguous()
    pre1 = proj_recv.new_empty(e, hidden) if keep_pre1 else None
    a1 = proj_recv.new_empty(e, hidden)
    lib.edge_pre1_silu(proj_recv.data_ptr(), proj_send.data_ptr(), recv.data_ptr(), send.data_ptr(), geo.data_ptr(),
                       w_geo_t.data_ptr(), e, hidden, geo.shape[1], None if pre1 is None else pre1.data_ptr(),
                       a1.data_ptr())
    return pre1, a1


def edge_pre1_backward(g_a1: Tensor, pre1: Tensor, recv: Tensor, send: Tensor, geo: Tensor, w_geo: Tensor,
                       g_recv: Tensor, g_send: Tensor, g_wgeo: Tensor) -> Tensor:
    """Backward of :func:`edge_pre1_silu` for one chunk, given the gradient g_a1 (e, H) of SiLU(pre1).

    Adds the gradients of proj_recv into g_recv (N, H), of proj_send into g_send (N_all, H) and of w_geo into
    g_wgeo (H, G), in place; returns the gradient of geo (e, G). One pass in C (five with torch).
    """
    lib = library()
    e, hidden = pre1.shape
    small_float32 = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (w_geo, g_wgeo))  # any strides
    g = geo.shape[1]
    if (lib is None or not (_applies(g_a1, pre1, geo, g_recv, g_send) and _indices_apply(recv, send) and small_float32)
            or g > EDGE_GEO_MAX or not _shapes_fit((g_a1, (e, hidden)), (recv, (e,)), (send, (e,)), (geo, (e, g)),
                                                   (w_geo, (hidden, g)), (g_wgeo, (hidden, g)),
                                                   (g_recv, (g_recv.shape[0], hidden)),
                                                   (g_send, (g_send.shape[0], hidden)))):
        g_pre1 = silu_backward(g_a1, pre1)
        index_add_rows(g_recv, recv, g_pre1)
        index_add_rows(g_send, send, g_pre1)
        g_wgeo.addmm_(g_pre1.t(), geo)
        return g_pre1 @ w_geo
    _check_rows(recv, g_recv.shape[0], "edge_pre1_backward (recv)")
    _check_rows(send, g_send.shape[0], "edge_pre1_backward (send)")
    w_geo_t = w_geo.t().contiguous()
    g_wgeo_t = torch.zeros_like(w_geo_t)
    g_geo = geo.new_empty(e, geo.shape[1])
    lib.edge_pre1_backward(g_a1.data_ptr(), pre1.data_ptr(), recv.data_ptr(), send.data_ptr(), geo.data_ptr(),
                           w_geo_t.data_ptr(), e, hidden, geo.shape[1], g_recv.data_ptr(), g_send.data_ptr(),
                           g_wgeo_t.data_ptr(), g_geo.data_ptr())
    g_wgeo += g_wgeo_t.t()
    return g_geo


def virtual_pre1_silu(per_node: Tensor, per_channel: Tensor, dist: Tensor, w_dist: Tensor, batch: Tensor,
                      keep_pre1: bool = True) -> tuple[Tensor | None, Tensor]:
    """pre1[i, c] = per_node[i] + per_channel[batch[i], c] + dist[i, c] w_dist and SiLU(pre1), as (n C, H) rows.

    per_node (n, H), per_channel (B, C, H), dist (n, C), w_dist (H,), batch (n,). Without ``keep_pre1`` the C
    kernel does not store pre1 and None is returned in its place.
    """
    lib = library()
    n, c = dist.shape
    hidden = per_node.shape[1]
    if (lib is None or not (_applies(per_node, per_channel, dist) and _indices_apply(batch))
            or w_dist.dtype != torch.float32
            or not _shapes_fit((per_node, (n, hidden)), (batch, (n,)), (w_dist, (hidden,)),
                               (per_channel, (per_channel.shape[0], c, hidden)))):
        pre1 = per_channel.index_select(0, batch) + per_node.unsqueeze(1)              # (n, C, H)
        pre1 += dist.unsqueeze(-1) * w_dist
        pre1 = pre1.view(-1, hidden)
        return (pre1 if keep_pre1 else None), silu(pre1)
    _check_rows(batch, per_channel.shape[0], "virtual_pre1_silu (batch)")
    w_dist = w_dist.contiguous()
    pre1 = per_node.new_empty(n * c, hidden) if keep_pre1 else None
    a1 = per_node.new_empty(n * c, hidden)
    lib.virtual_pre1_silu(per_node.data_ptr(), per_channel.data_ptr(), dist.data_ptr(), w_dist.data_ptr(),
                          batch.data_ptr(), n, c, hidden, None if pre1 is None else pre1.data_ptr(), a1.data_ptr())
    return pre1, a1


def virtual_pre1_backward(g_a1: Tensor, pre1: Tensor, dist: Tensor, w_dist: Tensor, batch: Tensor,
                          g_channel: Tensor, g_wdist: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`virtual_pre1_silu` given the gradient g_a1 (n C, H) of SiLU(pre1): adds into g_channel
    (B, C, H) and g_wdist (H,) in place and returns the gradients of per_node (n, H) and dist (n, C)."""
    lib = library()
    n, c = dist.shape
    hidden = pre1.shape[1]
    if (lib is None or not (_applies(g_a1, pre1, dist, g_channel, g_wdist) and _indices_apply(batch))
            or w_dist.dtype != torch.float32
            or not _shapes_fit((pre1, (n * c, hidden)), (g_a1, (n * c, hidden)), (batch, (n,)), (w_dist, (hidden,)),
                               (g_wdist, (hidden,)), (g_channel, (g_channel.shape[0], c, hidden)))):
        g_pre1 = silu_backward(g_a1, pre1)
        g_wdist += (dist.reshape(1, -1) @ g_pre1).squeeze(0)
        g_pre1 = g_pre1.view(-1, c, hidden)
        index_add_rows(g_channel, batch, g_pre1)
        return g_pre1.sum(1), g_pre1 @ w_dist
    _check_rows(batch, g_channel.shape[0], "virtual_pre1_backward (batch)")
    w_dist = w_dist.contiguous()
    g_node, g_dist = pre1.new_empty(n, hidden), pre1.new_empty(n, c)
    lib.virtual_pre1_backward(g_a1.data_ptr(), pre1.data_ptr(), dist.data_ptr(), w_dist.data_ptr(), batch.data_ptr(),
                              n, c, hidden, g_node.data_ptr(), g_channel.data_ptr(), g_wdist.data_ptr(),
                              g_dist.data_ptr())
    return g_node, g_dist


def silu_backward_outer(grad: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """silu_backward(grad @ v, x) for grad (R, 1), v (1, H), x (R, H): a scalar head's backward in one pass."""
    lib = library()
    if lib is None or not _applies(grad, v, x) or grad.numel() != x.shape[0] or v.numel() != x.shape[1]:
        return silu_backward(grad @ v, x)
    out = torch.empty_like(x)
    lib.silu_backward_outer(grad.data_ptr(), v.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def index_add_rows(out: Tensor, index: Tensor, source: Tensor, alpha: float = 1.0) -> None:
    """out.index_add_(0, index, source, alpha=alpha), in place; rows of ``source`` are rows of ``out`` (trailing
    dimensions flattened). Not thread-safe on a shared ``out``: each chunk worker adds into its own."""
    lib = library()
    rows = source.shape[0]
    if (lib is None or not (_applies(out, source) and _indices_apply(index)) or out.dtype != source.dtype
            or index.shape != (rows,) or out.shape[1:] != source.shape[1:]):
        out.index_add_(0, index, source, alpha=alpha)
        return
    _check_rows(index, out.shape[0], "index_add_rows")
    width = source[0].numel() if rows else 0
    lib.index_add_rows(out.data_ptr(), index.data_ptr(), source.data_ptr(), rows, width, alpha)
