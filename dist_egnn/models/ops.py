"""Small tensor operations shared by the layers: segment sums, the split first Linear of an MLP, precision."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def low_precision(like: Tensor) -> torch.dtype | None:
    """The dtype torch.autocast asks matrix products to run in on ``like``'s device (bfloat16 under
    ``trainer.precision=bf16``), or None: autocast off, or ``like`` not float32 (autocast leaves float64 alone)."""
    device = like.device.type
    if like.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return None
    dtype = torch.get_autocast_dtype(device)
    return None if dtype == torch.float32 else dtype


def mlp_inputs(low: torch.dtype | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """Node tensors that only MLPs read, as the MLPs read them: cast to ``low`` (what autocast would do inside each
    MLP), or unchanged without it. One low-precision copy, shared by its readers, is what backward keeps (half
    the bytes of a float32 one); autograd casts its gradient back to float32."""
    return tensors if low is None else tuple(t.to(low) for t in tensors)


def full_precision(like: Tensor):
    """A context with torch.autocast off on ``like``'s device; nothing to do (a null context) when it is off.

    Under ``trainer.precision=bf16`` the MLPs' products run in bfloat16, but the geometry does not: products of
    positions (the Gram matrix of the virtual nodes), the geometry columns of the first layers and the embedding
    run in float32 inside this context (docs/maths.md §2; the model docstrings list what stays float32).
    """
    device = like.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


def scatter_sum(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum the rows of ``values`` (M, *S) into ``num_segments`` rows chosen by ``index`` (M,).

    Autograd keeps only ``index`` (``Tensor.index_add_`` would also keep ``values`` for backward).
    """
    return _ScatterSum.apply(values, index, num_segments)


class _ScatterSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: Tensor, index: Tensor, num_segments: int) -> Tensor:
        ctx.save_for_backward(index)
        return values.new_zeros((num_segments, *values.shape[1:])).index_add_(0, index, values)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return grad.index_select(0, index), None, None


def count_per_segment(index: Tensor, num_segments: int, dtype: torch.dtype) -> Tensor:
    """How many rows of ``index`` fall in each segment: (num_segments,) of ``dtype``."""
    ones = torch.ones(index.shape[0], dtype=dtype, device=index.device)
    return torch.zeros(num_segments, dtype=dtype, device=index.device).index_add_(0, index, ones)


def split_columns(linear: nn.Linear, widths: list[int]) -> list[Tensor]:
    """The weight of ``linear`` cut by input columns, one (out, width) block per input part.

    ``linear([a, b, c])`` equals ``a @ Wa.T + b @ Wb.T + c @ Wc.T + bias``. Applying the blocks separately
    lets a part that is shared by many rows (a node's features, read by each of its edges) be projected
    once per node instead of once per edge: same parameters, same function, less work.
    """
    if sum(widths) != linear.in_features:
        raise ValueError(f"widths {widths} do not add up to in_features={linear.in_features}")
    return list(torch.split(linear.weight, widths, dim=1))
