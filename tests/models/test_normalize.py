"""``model.normalize`` (the authors' N-body configuration): in the real-real sum of term (4), x_i - x_j is
divided by (|x_i - x_j| + 1e-8) with the norm detached from autograd (docs/maths.md §8).

Guards: the fused backward and the plain autograd path disagreeing (the fused one treats the norm as a constant
by hand), a norm that gradients flow through after all, normalising the virtual terms too, a broken symmetry.
"""
import pytest
import torch

from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.models.fused import NORMALIZE_EPS

from equivariance import assert_equivariant, random_graph

MODELS = [EGNN, FastEGNN]


def scale_up_heads(model):
    for name, module in model.named_modules():
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)


def outputs_and_gradients(model, graph):
    pos = graph.pos.clone().requires_grad_(True)
    pred = model(**{**graph.kwargs(), "pos": pos})
    (pred.pos.square().sum() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().sum())).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return pred.pos.detach(), pos.grad, grads


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("chunk", [None, 29])
def test_fused_equals_plain_with_normalize(model_cls, chunk):
    torch.manual_seed(0)
    graph = random_graph(num_graphs=3, nodes=15)
    fused = model_cls(normalize=True, edge_chunk_size=chunk).double()
    scale_up_heads(fused)
    plain = model_cls(normalize=True, edge_chunk_size=chunk).double()
    plain.load_state_dict(fused.state_dict())
    plain.set_fused(False)
    out_f, pos_grad_f, grads_f = outputs_and_gradients(fused, graph)
    out_p, pos_grad_p, grads_p = outputs_and_gradients(plain, graph)
    assert torch.allclose(out_f, out_p, rtol=1e-12, atol=1e-12)
    assert torch.allclose(pos_grad_f, pos_grad_p, rtol=1e-10, atol=1e-12)
    assert grads_f.keys() == grads_p.keys()
    for name in grads_f:
        assert torch.allclose(grads_f[name], grads_p[name], rtol=1e-10, atol=1e-12), name
    # and normalize is not a no-op: the same weights without it give other positions
    unnormalised = model_cls(edge_chunk_size=chunk).double()
    unnormalised.load_state_dict(fused.state_dict())
    assert (unnormalised(**graph.kwargs()).pos - out_f).abs().max() > 1e-3


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
def test_normalize_keeps_equivariance(model_cls, dtype, fused):
    torch.manual_seed(0)
    model = model_cls(normalize=True).to(dtype)
    model.set_fused(fused)
    scale_up_heads(model)
    assert_equivariant(lambda g: model(**g.kwargs()).pos, random_graph(), dtype)


def three_nodes():
    """Node 0 receives from nodes 1 and 2, node 1 from node 0; node 2 receives nothing (it moves by phi_v alone)."""
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.5, -0.2], [-0.3, 2.0, 0.7]], dtype=torch.float64)
    edge_index = torch.tensor([[0, 0, 1], [1, 2, 0]])
    features = torch.tensor([[0.3, -1.0], [1.2, 0.4], [-0.5, 0.8]], dtype=torch.float64)
    vel = torch.tensor([[0.1, 0.0, -0.2], [0.0, 0.3, 0.1], [-0.1, 0.2, 0.0]], dtype=torch.float64)
    return pos, edge_index, features, vel


@pytest.mark.parametrize("fused", [True, False])
def test_no_gradient_flows_through_the_norm(fused):
    # One EGNN layer whose phi_x is a constant w (its first Linear's weight zeroed: SiLU(b_x) . v_x for every
    # edge), so x_i' = x_i + (w / deg_i) sum_j (x_i - x_j) / n_ij + phi_v(h_i) v_i, n_ij = |x_i - x_j| + 1e-8,
    # with h = the embedding of the features alone. With n_ij a constant the Jacobian is, per 3x3 block,
    #   d x_i' / d x_i = (1 + (w / deg_i) sum_j 1 / n_ij) I,   d x_i' / d x_j = -(w / deg_i) / n_ij I   (j -> i)
    # (diagonal: a gradient through the norm would add the off-diagonal -u u^T / n^2 terms).
    torch.manual_seed(0)
    model = EGNN(hidden=8, layers=1, normalize=True).double()
    model.set_fused(fused)
    coord = model.layers[0].coord_mlp
    with torch.no_grad():
        coord[0].weight.zero_()
        coord[0].bias.normal_()
        coord[2].weight.normal_()
    w = float(torch.nn.functional.silu(coord[0].bias.detach()) @ coord[2].weight[0].detach())
    pos, edge_index, features, vel = three_nodes()
    attr = torch.ones(edge_index.shape[1], 2, dtype=torch.float64)

    def layer(x):
        return model(features, x, vel, edge_index, attr).pos

    n = {(int(i), int(j)): float(torch.linalg.vector_norm(pos[i] - pos[j])) + NORMALIZE_EPS
         for i, j in edge_index.T}
    degree = {0: 2, 1: 1, 2: 0}
    phi_v = model.layers[0].velocity_mlp(model.embedding(features)).detach()          # (3, 1)
    expected = pos + phi_v * vel
    jacobian = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    eye = torch.eye(3, dtype=torch.float64)
    for i in range(3):
        jacobian[i, :, i, :] = eye
    for (i, j), n_ij in n.items():
        expected[i] += w / degree[i] * (pos[i] - pos[j]) / n_ij
        jacobian[i, :, i, :] += w / degree[i] / n_ij * eye
        jacobian[i, :, j, :] -= w / degree[i] / n_ij * eye
    assert torch.allclose(layer(pos), expected, rtol=1e-12, atol=1e-14)
    got = torch.autograd.functional.jacobian(layer, pos)                                # (3, 3, 3, 3)
    assert torch.allclose(got, jacobian, rtol=1e-12, atol=1e-14)
    # the test can fail: the derivative through the norm, (I - u u^T) / n per edge, is another matrix
    u = (pos[0] - pos[1]) / torch.linalg.vector_norm(pos[0] - pos[1])
    assert (w / 2 / n[(0, 1)] * torch.outer(u, u)).abs().max() > 1e-3


def test_normalize_leaves_the_virtual_terms_alone():
    # FastEGNN with every real edge removed: only the virtual terms move the nodes, and normalize changes nothing
    torch.manual_seed(0)
    graph = random_graph()
    model = FastEGNN(normalize=True).double()
    scale_up_heads(model)
    plain = FastEGNN().double()
    plain.load_state_dict(model.state_dict())
    no_edges = {**graph.kwargs(), "edge_index": graph.edge_index[:, :0], "edge_attr": graph.edge_attr[:0]}
    a, b = model(**no_edges), plain(**no_edges)
    assert torch.equal(a.pos, b.pos) and torch.equal(a.virtual_pos, b.virtual_pos)
    assert (a.pos - graph.pos).abs().max() > 1e-3                 # the virtual terms did move the nodes
