"""The MLPs of docs/maths.md §2, built once here so EGNN and FastEGNN use identical pieces."""
from __future__ import annotations

from torch import nn


def message_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """phi_e / phi_ev: Linear -> SiLU -> Linear -> SiLU (the message keeps its activation)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())


def update_mlp(in_dim: int, hidden: int) -> nn.Sequential:
    """phi_h / phi_hv: Linear -> SiLU -> Linear; the residual is added by the caller."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))


def coordinate_mlp(hidden: int, init_scale: float = 1e-3) -> nn.Sequential:
    """phi_x / phi_xv / phi_X: Linear(H, H) -> SiLU -> Linear(H, 1, no bias), last layer near zero.

    A tiny last layer makes every layer start close to the identity on coordinates, which keeps early
    training stable (Satorras et al. 2021).
    """
    last = nn.Linear(hidden, 1, bias=False)
    nn.init.xavier_uniform_(last.weight, gain=init_scale)
    return nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)


def velocity_mlp(hidden: int) -> nn.Sequential:
    """phi_v: Linear(H, H) -> SiLU -> Linear(H, 1): a per-node scale of the input velocity."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))


def field_mlp(hidden: int, init_scale: float = 1e-3) -> nn.Sequential:
    """phi_g: Linear(H, H) -> SiLU -> Linear(H, 1), shaped like phi_v: a per-node scale of the external field g.

    Its last layer starts near zero, as the coordinate heads' do: g in the task's units is a displacement of the
    order of one task step's fall (g T^2, 1.6 m for Δt = 0.4 s), so a default-initialised phi_g would move every
    node by about that much in every layer before training has seen a sample; near zero, a model given a field
    starts as the model without one.
    """
    last = nn.Linear(hidden, 1)
    nn.init.xavier_uniform_(last.weight, gain=init_scale)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
