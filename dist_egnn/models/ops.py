"""Small tensor operations shared by the layers: segment sums and the split first Linear of an MLP."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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
