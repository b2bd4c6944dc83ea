"""MSE and MMD (docs/maths.md §3)."""
import math

import pytest
import torch

from dist_egnn.losses import kernel_matrix, mmd_loss, mse_loss, objective, sample_nodes


def test_kernels_match_their_formulas():
    a = torch.tensor([[[0.0], [0.0], [0.0]]], dtype=torch.float64)       # (1, 3, 1)
    b = torch.tensor([[[3.0], [4.0], [0.0]]], dtype=torch.float64)       # distance 5
    sigma = 2.0
    assert kernel_matrix(a, b, sigma, "gaussian").item() == pytest.approx(math.exp(-25 / 8))
    assert kernel_matrix(a, b, sigma, "unsquared").item() == pytest.approx(math.exp(-5 / 8))
    with pytest.raises(ValueError, match="unknown MMD kernel"):
        kernel_matrix(a, b, sigma, "laplace")


def test_mmd_matches_a_hand_computed_value():
    torch.manual_seed(0)
    z = torch.randn(1, 3, 3, dtype=torch.float64)
    x = torch.randn(7, 3, dtype=torch.float64)
    sigma = 1.3
    k = lambda p, q: math.exp(-float(((p - q) ** 2).sum()) / (2 * sigma**2))  # noqa: E731
    zs = [z[0, :, c] for c in range(3)]
    expected = sum(k(p, q) for p in zs for q in zs) / 9 - 2 * sum(k(xm, q) for xm in x for q in zs) / (7 * 3)
    got = mmd_loss(z, x, torch.zeros(7, dtype=torch.long), 1, sigma)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_mmd_prefers_virtual_nodes_spread_over_the_real_ones():
    # guards the sign of the cross term: collapsed virtual nodes must score worse than spread ones
    torch.manual_seed(0)
    real = torch.randn(200, 3, dtype=torch.float64) * 2
    batch = torch.zeros(200, dtype=torch.long)
    collapsed = torch.zeros(1, 3, 3, dtype=torch.float64)
    spread = torch.tensor([[[-2.0, 0.0, 2.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]], dtype=torch.float64)
    far = collapsed + 50
    values = [mmd_loss(z, real, batch, 1, sigma=1.5).item() for z in (spread, collapsed, far)]
    assert values[0] < values[1] < values[2]


def test_mmd_is_a_mean_over_graphs_and_ignores_other_graphs_nodes():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 3, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64)
    batch = torch.tensor([0] * 4 + [1] * 6)
    joint = mmd_loss(z, x, batch, 2, 1.0)
    single = [mmd_loss(z[b:b + 1], x[batch == b], torch.zeros(int((batch == b).sum()), dtype=torch.long), 1, 1.0)
              for b in range(2)]
    assert joint.item() == pytest.approx((single[0] + single[1]).item() / 2, rel=1e-12)


def test_unsquared_kernel_has_finite_gradients_at_coincident_virtual_nodes():
    # all C virtual nodes start at the centroid: |z_c - z_c'| = 0, where sqrt has an infinite slope
    z = torch.zeros(1, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    mmd_loss(z, x, torch.zeros(5, dtype=torch.long), 1, 1.0, kernel="unsquared").backward()
    assert torch.isfinite(z.grad).all()


def test_sampling_keeps_about_the_requested_number_and_all_when_small():
    batch = torch.tensor([0] * 1000 + [1] * 20)
    gen = torch.Generator().manual_seed(0)
    mask = sample_nodes(batch, 2, 150, generator=gen)
    assert 100 < int(mask[:1000].sum()) < 200
    assert bool(mask[1000:].all())                       # fewer nodes than requested: all of them
    assert sample_nodes(batch, 2, None) is None


def test_sampling_with_shared_keys_is_identical_however_nodes_are_split():
    # processes holding different parts of a graph draw the same nodes when keys come from global ids
    keys = torch.rand(100, generator=torch.Generator().manual_seed(1))
    whole = sample_nodes(torch.zeros(100, dtype=torch.long), 1, 30, node_count=torch.tensor([100.0]), keys=keys)
    part = sample_nodes(torch.zeros(40, dtype=torch.long), 1, 30, node_count=torch.tensor([100.0]),
                        keys=keys[60:])
    assert torch.equal(whole[60:], part)


def test_mse_share_adds_up_to_the_global_mean():
    torch.manual_seed(0)
    pred, target = torch.randn(10, 3), torch.randn(10, 3)
    whole = mse_loss(pred, target)
    shares = mse_loss(pred[:3], target[:3], total_nodes=10) + mse_loss(pred[3:], target[3:], total_nodes=10)
    assert shares.item() == pytest.approx(whole.item(), rel=1e-6)


def test_objective_adds_weighted_mmd_only_with_virtual_nodes():
    torch.manual_seed(0)
    pred, target = torch.randn(6, 3), torch.randn(6, 3)
    batch = torch.zeros(6, dtype=torch.long)
    plain = objective(pred, target, None, batch, 1, mmd_weight=0.5, mmd_sigma=1.0)
    assert plain.mmd is None and plain.total == plain.mse
    z = torch.randn(1, 3, 3)
    full = objective(pred, target, z, batch, 1, mmd_weight=0.5, mmd_sigma=1.0)
    assert full.total.item() == pytest.approx((full.mse + 0.5 * full.mmd).item())
    on_pred = objective(pred, target, z, batch, 1, mmd_weight=0.5, mmd_sigma=1.0, mmd_target="prediction")
    assert on_pred.mmd.item() != pytest.approx(full.mmd.item())
    with pytest.raises(ValueError, match="mmd_target"):
        objective(pred, target, z, batch, 1, mmd_weight=0.5, mmd_sigma=1.0, mmd_target="other")
