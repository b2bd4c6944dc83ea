"""The fused blocks' elementwise work from small C kernels (``fused_avx2.c``) where they apply, else torch.

The kernel is compiled with the system C compiler at first use into a per-user cache
(``$DIST_EGNN_CACHE`` or ``~/.cache/dist_egnn``, keyed by a hash of the source and flags, written atomically so
concurrent ranks can race safely) and called through ctypes, which releases the GIL, so the chunk workers of
``fused.py`` run it in parallel. It applies to contiguous float32 CPU tensors on a CPU with AVX2; everything
else (float64, CUDA, no compiler, ``DIST_EGNN_NATIVE=0``) takes the torch composition beside each function,
which is also the reference the tests compare it with (a few float32 ulp apart).

bfloat16 (the fused blocks under ``torch.autocast(dtype=torch.bfloat16)``): each function also takes bfloat16
(rows, H) activations and gradients, and then calls the ``*_bf16`` kernel of ``fused_avx512bf16.c`` -- bf16 loads
and stores, float32 arithmetic, float32 accumulators -- built the same way with AVX-512 and AVX512-BF16 flags on
CPUs that have them (:func:`bf16_library`). Elsewhere torch's bfloat16 ops run in its place; the torch fallbacks
take any dtype and form the first layers' sums and the scatter-adds in the accumulators' dtype. ``BF16_PATH``
selects the strategy for the benchmarks that chose it (asv_bench/PERF_NOTES.md §12).
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
BF16_SOURCE = Path(__file__).with_name("fused_avx512bf16.c")
BF16_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-shared", "-fPIC"]

BF16_PATH = "native"
"""bfloat16 activations: ``"native"`` (the AVX512-BF16 kernels where they apply, else torch's bf16 ops),
``"convert"`` (to float32, the float32 kernel, back to bfloat16) or ``"torch"`` (torch's bf16 ops). Only the
benchmarks change it (asv_bench/benchmarks/precision.py)."""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_bf16_library: ctypes.CDLL | None = None
_bf16_tried = False


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
                      "same maths)", stacklevel=2)
        return None
    library = _compile(SOURCE, FLAGS, compiler)
    if library is None:
        return None
    _declare(library, "")
    return library


def _compile(source_path: Path, flags: list[str], compiler: str) -> ctypes.CDLL | None:
    """Build ``source_path`` with ``flags`` into the cache (or reuse the build) and load it; None, with a warning,
    where that fails."""
    source = source_path.read_bytes()
    key = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source_path.stem}-{key}.so"
    try:
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler, *flags, str(source_path), "-o", tmp, "-lm"], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(tmp, target)                 # atomic: another rank may have finished first, same bytes
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"dist_egnn: could not build {source_path.name} with {compiler} into {target.parent} "
                      f"({detail}); the fused blocks run on torch's kernels (slower, same maths). "
                      "DIST_EGNN_NATIVE=0 silences this.", stacklevel=3)
        return None


def _declare(library: ctypes.CDLL, suffix: str) -> None:
    """The kernels' argument types (``suffix`` "_bf16": the bfloat16 library, same signatures)."""
    kernels = {
        "silu_forward": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
        "silu_backward": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
        "edge_pre1_silu": [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2,
        "silu_backward_outer": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_void_p],
        "index_add_rows": [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float],
        "edge_pre1_backward": [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4,
        "virtual_pre1_silu": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2,
        "virtual_pre1_backward": [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4,
    }
    for name, argtypes in kernels.items():
        getattr(library, name + suffix).argtypes = argtypes


def library() -> ctypes.CDLL | None:
    """The loaded kernel, built on first call; None where it does not apply."""
    global _library, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _library = _build()
                _tried = True
    return _library


def _cpu_has_avx512_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported())
    except AttributeError:                              # an older torch: read the kernel's CPU flags (Linux)
        try:
            return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
        except OSError:
            return False


def bf16_library() -> ctypes.CDLL | None:
    """The bfloat16 kernels (``fused_avx512bf16.c``), built on first call where the CPU has AVX512-BF16 and the
    float32 kernels apply; None elsewhere (torch's bfloat16 ops run instead)."""
    global _bf16_library, _bf16_tried
    if not _bf16_tried:
        with _lock:
            if not _bf16_tried:
                compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
                if os.environ.get("DIST_EGNN_NATIVE", "1") != "0" and compiler and _cpu_has_avx512_bf16():
                    _bf16_library = _compile(BF16_SOURCE, BF16_FLAGS, compiler)
                    if _bf16_library is not None:
                        _declare(_bf16_library, "_bf16")
                _bf16_tried = True
    return _bf16_library


def _applies(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _bf16_applies(*tensors: Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _bf16_kernels(*tensors: Tensor) -> ctypes.CDLL | None:
    """The bfloat16 library, when these bfloat16 tensors go to its kernels (``BF16_PATH`` "native")."""
    if BF16_PATH != "native" or not _bf16_applies(*tensors):
        return None
    return bf16_library()


def _convert(*tensors: Tensor) -> bool:
    """``BF16_PATH`` "convert": the caller runs itself again on float32 copies and converts its results back."""
    return BF16_PATH == "convert" and _bf16_applies(*tensors) and library() is not None


def _f32(*tensors: Tensor) -> list[Tensor]:
    return [t.float() for t in tensors]


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
    blib = _bf16_kernels(x)
    if blib is not None:
        out = torch.empty_like(x)
        blib.silu_forward_bf16(x.data_ptr(), out.data_ptr(), x.numel())
        return out
    if _convert(x):
        return silu(x.float()).to(x.dtype)
    lib = library()
    if lib is None or not _applies(x):
        return F.silu(x)
    out = torch.empty_like(x)
    lib.silu_forward(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def silu_backward(grad: Tensor, x: Tensor) -> Tensor:
    """grad * d silu(x) / dx."""
    blib = _bf16_kernels(grad, x)
    if blib is not None and grad.shape == x.shape:
        out = torch.empty_like(x)
        blib.silu_backward_bf16(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel())
        return out
    if _convert(grad, x):
        return silu_backward(*_f32(grad, x)).to(x.dtype)
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
    pre1 and SiLU(pre1) have proj_recv's dtype (bfloat16 under autocast); the sum is formed in geo's dtype.
    """
    e, hidden = recv.shape[0], proj_recv.shape[1]
    fits = (_applies(geo) and _indices_apply(recv, send) and w_geo.dtype == torch.float32
            and w_geo.device.type == "cpu"
            and _shapes_fit((send, (e,)), (geo, (e, geo.shape[1])), (w_geo, (hidden, geo.shape[1])),
                            (proj_send, (proj_send.shape[0], hidden))))
    if fits and _convert(proj_recv, proj_send):
        pre1, a1 = edge_pre1_silu(*_f32(proj_recv, proj_send), recv, send, geo, w_geo, keep_pre1)
        return (None if pre1 is None else pre1.to(proj_recv.dtype)), a1.to(proj_recv.dtype)
    blib = _bf16_kernels(proj_recv, proj_send) if fits else None
    lib = library() if blib is None else blib
    if lib is None or not (fits and (blib is not None or _applies(proj_recv, proj_send))):
        pre1 = torch.addmm(proj_recv.index_select(0, recv).to(geo.dtype), geo, w_geo.t())
        pre1 += proj_send.index_select(0, send)
        pre1 = pre1.to(proj_recv.dtype)
        return (pre1 if keep_pre1 else None), silu(pre1)
    _check_rows(recv, proj_recv.shape[0], "edge_pre1_silu (recv)")
    _check_rows(send, proj_send.shape[0], "edge_pre1_silu (send)")
    w_geo_t = w_geo.t().contiguous()
    pre1 = proj_recv.new_empty(e, hidden) if keep_pre1 else None
    a1 = proj_recv.new_empty(e, hidden)
    kernel = lib.edge_pre1_silu if blib is None else blib.edge_pre1_silu_bf16
    kernel(proj_recv.data_ptr(), proj_send.data_ptr(), recv.data_ptr(), send.data_ptr(), geo.data_ptr(),
           w_geo_t.data_ptr(), e, hidden, geo.shape[1], None if pre1 is None else pre1.data_ptr(), a1.data_ptr())
    return pre1, a1


def edge_pre1_backward(g_a1: Tensor, pre1: Tensor, recv: Tensor, send: Tensor, geo: Tensor, w_geo: Tensor,
                       g_recv: Tensor, g_send: Tensor, g_wgeo: Tensor) -> Tensor:
    """Backward of :func:`edge_pre1_silu` for one chunk, given the gradient g_a1 (e, H) of SiLU(pre1).

    Adds the gradients of proj_recv into g_recv (N, H), of proj_send into g_send (N_all, H) and of w_geo into
    g_wgeo (H, G), in place; returns the gradient of geo (e, G). One pass in C (five with torch).
    g_a1 and pre1 may be bfloat16 (autocast); the accumulators and the result keep their dtype.
    """
    if _convert(g_a1, pre1):
        return edge_pre1_backward(*_f32(g_a1, pre1), recv, send, geo, w_geo, g_recv, g_send, g_wgeo)
    blib = _bf16_kernels(g_a1, pre1)
    lib = library() if blib is None else blib
    e, hidden = pre1.shape
    small_float32 = all(t.dtype == torch.float32 and t.device.type == "cpu" for t in (w_geo, g_wgeo))  # any strides
    g = geo.shape[1]
    if (lib is None or not ((blib is not None or _applies(g_a1, pre1)) and _applies(geo, g_recv, g_send)
                            and _indices_apply(recv, send) and small_float32)
            or g > EDGE_GEO_MAX or not _shapes_fit((g_a1, (e, hidden)), (recv, (e,)), (send, (e,)), (geo, (e, g)),
                                                   (w_geo, (hidden, g)), (g_wgeo, (hidden, g)),
                                                   (g_recv, (g_recv.shape[0], hidden)),
                                                   (g_send, (g_send.shape[0], hidden)))):
        g_pre1 = silu_backward(g_a1, pre1).to(g_recv.dtype)
        index_add_rows(g_recv, recv, g_pre1)
        index_add_rows(g_send, send, g_pre1)
        g_wgeo.addmm_(g_pre1.t(), geo)
        return g_pre1 @ w_geo
    _check_rows(recv, g_recv.shape[0], "edge_pre1_backward (recv)")
    _check_rows(send, g_send.shape[0], "edge_pre1_backward (send)")
    w_geo_t = w_geo.t().contiguous()
    g_wgeo_t = torch.zeros_like(w_geo_t)
    g_geo = geo.new_empty(e, geo.shape[1])
    kernel = lib.edge_pre1_backward if blib is None else blib.edge_pre1_backward_bf16
    kernel(g_a1.data_ptr(), pre1.data_ptr(), recv.data_ptr(), send.data_ptr(), geo.data_ptr(), w_geo_t.data_ptr(), e,
           hidden, geo.shape[1], g_recv.data_ptr(), g_send.data_ptr(), g_wgeo_t.data_ptr(), g_geo.data_ptr())
    g_wgeo += g_wgeo_t.t()
    return g_geo


def virtual_pre1_silu(per_node: Tensor, per_channel: Tensor, dist: Tensor, w_dist: Tensor, batch: Tensor,
                      keep_pre1: bool = True) -> tuple[Tensor | None, Tensor]:
    """pre1[i, c] = per_node[i] + per_channel[batch[i], c] + dist[i, c] w_dist and SiLU(pre1), as (n C, H) rows.

    per_node (n, H), per_channel (B, C, H), dist (n, C), w_dist (H,), batch (n,). Without ``keep_pre1`` the C
    kernel does not store pre1 and None is returned in its place. pre1 and SiLU(pre1) have per_node's dtype
    (bfloat16 under autocast); the sum is formed in dist's dtype.
    """
    if _convert(per_node, per_channel):
        pre1, a1 = virtual_pre1_silu(*_f32(per_node, per_channel), dist, w_dist, batch, keep_pre1)
        return (None if pre1 is None else pre1.to(per_node.dtype)), a1.to(per_node.dtype)
    blib = _bf16_kernels(per_node, per_channel)
    lib = library() if blib is None else blib
    n, c = dist.shape
    hidden = per_node.shape[1]
    if (lib is None or not ((blib is not None or _applies(per_node, per_channel)) and _applies(dist)
                            and _indices_apply(batch))
            or w_dist.dtype != torch.float32
            or not _shapes_fit((per_node, (n, hidden)), (batch, (n,)), (w_dist, (hidden,)),
                               (per_channel, (per_channel.shape[0], c, hidden)))):
        pre1 = per_channel.index_select(0, batch).to(dist.dtype) + per_node.unsqueeze(1)    # (n, C, H)
        pre1 += dist.unsqueeze(-1) * w_dist
        pre1 = pre1.view(-1, hidden).to(per_node.dtype)
        return (pre1 if keep_pre1 else None), silu(pre1)
    _check_rows(batch, per_channel.shape[0], "virtual_pre1_silu (batch)")
    w_dist = w_dist.contiguous()
    pre1 = per_node.new_empty(n * c, hidden) if keep_pre1 else None
    a1 = per_node.new_empty(n * c, hidden)
    kernel = lib.virtual_pre1_silu if blib is None else blib.virtual_pre1_silu_bf16
    kernel(per_node.data_ptr(), per_channel.data_ptr(), dist.data_ptr(), w_dist.data_ptr(), batch.data_ptr(), n, c,
           hidden, None if pre1 is None else pre1.data_ptr(), a1.data_ptr())
    return pre1, a1


def virtual_pre1_backward(g_a1: Tensor, pre1: Tensor, dist: Tensor, w_dist: Tensor, batch: Tensor,
                          g_channel: Tensor, g_wdist: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`virtual_pre1_silu` given the gradient g_a1 (n C, H) of SiLU(pre1): adds into g_channel
    (B, C, H) and g_wdist (H,) in place and returns the gradients of per_node (n, H) and dist (n, C), in the
    accumulators' dtype (g_a1 and pre1 may be bfloat16 under autocast)."""
    if _convert(g_a1, pre1):
        return virtual_pre1_backward(*_f32(g_a1, pre1), dist, w_dist, batch, g_channel, g_wdist)
    blib = _bf16_kernels(g_a1, pre1)
    lib = library() if blib is None else blib
    n, c = dist.shape
    hidden = pre1.shape[1]
    if (lib is None or not ((blib is not None or _applies(g_a1, pre1)) and _applies(dist, g_channel, g_wdist)
                            and _indices_apply(batch))
            or w_dist.dtype != torch.float32
            or not _shapes_fit((pre1, (n * c, hidden)), (g_a1, (n * c, hidden)), (batch, (n,)), (w_dist, (hidden,)),
                               (g_wdist, (hidden,)), (g_channel, (g_channel.shape[0], c, hidden)))):
        g_pre1 = silu_backward(g_a1, pre1).to(g_channel.dtype)
        g_wdist += (dist.reshape(1, -1) @ g_pre1).squeeze(0)
        g_pre1 = g_pre1.view(-1, c, hidden)
        index_add_rows(g_channel, batch, g_pre1)
        return g_pre1.sum(1), g_pre1 @ w_dist
    _check_rows(batch, g_channel.shape[0], "virtual_pre1_backward (batch)")
    w_dist = w_dist.contiguous()
    g_node, g_dist = g_channel.new_empty(n, hidden), g_channel.new_empty(n, c)
    kernel = lib.virtual_pre1_backward if blib is None else blib.virtual_pre1_backward_bf16
    kernel(g_a1.data_ptr(), pre1.data_ptr(), dist.data_ptr(), w_dist.data_ptr(), batch.data_ptr(), n, c, hidden,
           g_node.data_ptr(), g_channel.data_ptr(), g_wdist.data_ptr(), g_dist.data_ptr())
    return g_node, g_dist


def silu_backward_outer(grad: Tensor, v: Tensor, x: Tensor) -> Tensor:
    """silu_backward(grad @ v, x) for grad (R, 1), v (1, H), x (R, H): a scalar head's backward in one pass.

    With a bfloat16 x (autocast) the result is bfloat16; grad and v are read in float32."""
    blib = _bf16_kernels(x)
    if blib is not None and grad.numel() == x.shape[0] and v.numel() == x.shape[1]:
        grad, v = grad.float().contiguous(), v.float().contiguous()
        out = torch.empty_like(x)
        blib.silu_backward_outer_bf16(grad.data_ptr(), v.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1],
                                      out.data_ptr())
        return out
    if _convert(x):
        return silu_backward_outer(grad.float(), v.float(), x.float()).to(x.dtype)
    lib = library()
    if lib is None or not _applies(grad, v, x) or grad.numel() != x.shape[0] or v.numel() != x.shape[1]:
        return silu_backward((grad @ v.to(grad.dtype)).to(x.dtype), x)
    out = torch.empty_like(x)
    lib.silu_backward_outer(grad.data_ptr(), v.data_ptr(), x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def index_add_rows(out: Tensor, index: Tensor, source: Tensor, alpha: float = 1.0) -> None:
    """out.index_add_(0, index, source, alpha=alpha), in place; rows of ``source`` are rows of ``out`` (trailing
    dimensions flattened). Not thread-safe on a shared ``out``: each chunk worker adds into its own. A bfloat16
    ``source`` (autocast) is added into a float32 ``out`` without rounding the sums to bfloat16."""
    if _convert(source):
        source = source.float()
    blib = _bf16_kernels(source) if _applies(out) else None
    lib = library() if blib is None else blib
    rows = source.shape[0]
    if (lib is None or not ((blib is not None or _applies(out, source)) and _indices_apply(index))
            or index.shape != (rows,) or out.shape[1:] != source.shape[1:]):
        out.index_add_(0, index, source.to(out.dtype), alpha=alpha)
        return
    _check_rows(index, out.shape[0], "index_add_rows")
    width = source[0].numel() if rows else 0
    kernel = lib.index_add_rows if blib is None else blib.index_add_rows_bf16
    kernel(out.data_ptr(), index.data_ptr(), source.data_ptr(), rows, width, alpha)
