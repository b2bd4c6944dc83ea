"""Training objective (docs/maths.md §1, §3): L = MSE(pred, target) + λ · MMD(Z_final, X).

MMD² between the virtual coordinates Z = [z_1..z_C] of a graph and M real positions x_m, up to a term that
does not depend on Z:

    MMD² ≈ (1/C²) Σ_{c,c'} k(z_c, z_c') − (2/(M·C)) Σ_{m,c} k(x_m, z_c)

averaged over the graphs of a batch. It is small when the virtual nodes spread over the real nodes rather
than collapsing onto one point.

Walls (node scalar ``type`` = 1, ``moving`` False) are in neither term: the MSE averages over the moving
nodes only, and the MMD's real sample X is drawn from the moving nodes only. The virtual nodes are meant to
summarise the fluid, whose motion they help predict; the walls are static, known and (in a box) far more
numerous than the fluid (~10x in fluid_small), so counting them would pull the virtual nodes onto the box
surface. Kernels: ``gaussian`` k = exp(−|a−b|²/(2σ²)) (the paper, default) and
``unsquared`` k = exp(−|a−b|/(2σ²)) (the authors' code). X is the ground-truth target positions by default,
or the predicted positions (the ICML code).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dist_egnn.errors import ConfigError
from dist_egnn.models.ops import count_per_segment, scatter_sum
from dist_egnn.parallel.seam import SingleProcess

KERNELS = ("gaussian", "unsquared")
MMD_TARGETS = ("truth", "prediction")


def kernel_matrix(a: Tensor, b: Tensor, sigma: float, kernel: str) -> Tensor:
    """k(a_i, b_j) for a (..., 3, P) and b (..., 3, Q) -> (..., P, Q)."""
    dist2 = (a.unsqueeze(-1) - b.unsqueeze(-2)).square().sum(dim=-3)
    if kernel == "gaussian":
        return torch.exp(-dist2 / (2 * sigma**2))
    if kernel == "unsquared":
        # sqrt has an infinite derivative at 0 (z_c == z_c'); the clamp keeps the gradient finite there.
        return torch.exp(-dist2.clamp(min=1e-12).sqrt() / (2 * sigma**2))
    raise ConfigError(f"unknown MMD kernel {kernel!r}: choose one of {KERNELS}")


def mse_loss(pred: Tensor, target: Tensor, total_nodes: Tensor | float | None = None) -> Tensor:
    """Mean squared error over nodes and the 3 coordinates.

    ``total_nodes`` is the number of real nodes over every process holding part of the batch; with it, this
    process's share of the global mean is returned (sum of squares / (3 · total_nodes)), so that the shares of
    all processes add up to the global MSE. Without it: the local mean.
    """
    total = pred.shape[0] if total_nodes is None else total_nodes
    return (pred - target).square().sum() / (3 * total)


def mmd_loss(virtual_pos: Tensor, real_pos: Tensor, batch: Tensor, num_graphs: int, sigma: float,
             kernel: str = "gaussian", selected: Tensor | None = None, comm=None) -> Tensor:
    """MMD² (up to a Z-independent constant) between each graph's virtual and real positions, mean over graphs.

    Shapes: virtual_pos (B, 3, C), real_pos (N, 3), batch (N,), selected (N,) bool: the sampled real nodes
    (default all). With a distributed ``comm`` the real-node average runs over the nodes of every process,
    so each process returns the same, global value.
    """
    comm = comm or SingleProcess()
    channels = virtual_pos.shape[-1]
    self_term = kernel_matrix(virtual_pos, virtual_pos, sigma, kernel).sum(dim=(1, 2)) / channels**2   # (B,)
    cross = kernel_matrix(real_pos.unsqueeze(-1), virtual_pos[batch], sigma, kernel)    # (N, 1, C)
    cross = cross.squeeze(1).mean(dim=1)                                                 # (N,) mean over c
    weight = torch.ones_like(cross) if selected is None else selected.to(cross.dtype)
    cross_sum, count = comm.sum_over_parts(scatter_sum(cross * weight, batch, num_graphs),
                                           scatter_sum(weight, batch, num_graphs))
    cross_mean = cross_sum / count.clamp(min=1)
    return (self_term - 2 * cross_mean).mean()


def sample_nodes(batch: Tensor, num_graphs: int, num_samples: int | None, generator: torch.Generator | None = None,
                 node_count: Tensor | None = None, keys: Tensor | None = None) -> Tensor | None:
    """The real nodes the MMD term looks at: about ``num_samples`` per graph, each node with equal chance.

    Every node is kept with probability min(1, num_samples / N_b) for its graph's node count N_b. ``keys``
    (N,) uniform in [0, 1) can be given instead of drawing them, so that processes holding different parts
    of a graph draw the same nodes as one process would (keys looked up by global node id). None (all
    nodes) when ``num_samples`` is None.
    """
    if num_samples is None:
        return None
    if node_count is None:
        node_count = count_per_segment(batch, num_graphs, torch.float32)
    if keys is None:
        keys = torch.rand(batch.shape[0], generator=generator, device=batch.device)
    keep_prob = (num_samples / node_count.to(keys.dtype).clamp(min=1)).clamp(max=1.0)
    return keys < keep_prob[batch]


@dataclass
class LossTerms:
    """The parts of one evaluation of the objective, for logging."""

    total: Tensor
    mse: Tensor
    mmd: Tensor | None


def objective(pred_pos: Tensor, target: Tensor, virtual_pos: Tensor | None, batch: Tensor, num_graphs: int, *,
              mmd_weight: float, mmd_sigma: float, mmd_kernel: str = "gaussian", mmd_target: str = "truth",
              selected: Tensor | None = None, comm=None, total_nodes: Tensor | float | None = None,
              parts: int = 1, moving: Tensor | None = None) -> LossTerms:
    """L = MSE + λ·MMD; the MMD term only for models with virtual nodes and λ > 0.

    ``moving`` (N,) bool: the nodes that are not walls; the MSE and the MMD's real sample use only those
    (None: every node). ``total_nodes`` then counts the moving nodes of the whole batch.

    Split over ``parts`` processes (each holding part of every graph, ``comm`` their communicator,
    ``total_nodes`` the node count of the whole batch), ``total`` is this process's share, so that the
    shares of all processes add up to the loss of one device: the MSE share is this process's sum of squares
    over 3·N_total (``mse`` is that share too), and, since every process computes the same global MMD,
    each adds λ·MMD / P. Example: P = 2, N_total = 4, rank 0 holds 3 nodes with squared error sum 6.0, rank 1
    one node with 6.0, MMD = 0.2, λ = 0.5: the shares are 6/12 + 0.05 = 0.55 on both, 1.1 together = the
    one-device loss 12/12 + 0.5·0.2.
    """
    if mmd_target not in MMD_TARGETS:
        raise ConfigError(f"unknown loss.mmd_target {mmd_target!r}: choose one of {MMD_TARGETS}")
    if moving is not None:
        mse = mse_loss(pred_pos[moving], target[moving], total_nodes)
        selected = moving if selected is None else selected & moving
    else:
        mse = mse_loss(pred_pos, target, total_nodes)
    if virtual_pos is None or mmd_weight == 0:
        return LossTerms(total=mse, mse=mse, mmd=None)
    real = target if mmd_target == "truth" else pred_pos
    mmd = mmd_loss(virtual_pos, real, batch, num_graphs, mmd_sigma, mmd_kernel, selected, comm)
    return LossTerms(total=mse + mmd_weight * mmd / parts, mse=mse, mmd=mmd)
