"""EGNN and FastEGNN: the interface, the parameter count, equivariance, chunking, input checks."""
import pytest
import torch

from dist_egnn.models import EGNN, FastEGNN

from equivariance import TOLERANCE, assert_equivariant, equivariance_error, random_graph, random_orthogonal

MODELS = [EGNN, FastEGNN]


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_fastegnn_default_has_the_authors_parameter_count():
    # guards: any drift from docs/maths.md §2's MLP shapes (wrong input width of phi_ev, an extra head, a bias)
    assert trainable(FastEGNN()) == 284_804


def test_egnn_default_is_fastegnn_without_the_virtual_parts():
    assert trainable(EGNN()) == 134_084


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_models_are_e3_and_permutation_equivariant(model_cls, dtype):
    torch.manual_seed(0)
    model = model_cls().to(dtype)
    _scale_up_coordinate_heads(model)
    graph = random_graph()
    assert_equivariant(lambda g: model(**g.kwargs()).pos, graph, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fastegnn_virtual_positions_are_equivariant(dtype):
    # virtual nodes are an ordered set: they rotate and translate with the graph, and ignore the node order
    torch.manual_seed(1)
    model = FastEGNN().to(dtype)
    _scale_up_coordinate_heads(model)
    graph = random_graph(num_graphs=1)

    def virtual_as_nodes(g):
        return model(**g.kwargs()).virtual_pos[0].T          # (C, 3): one "node" per virtual channel

    for seed, reflect in [(0, False), (1, True)]:
        gen = torch.Generator().manual_seed(seed)
        q = random_orthogonal(gen, reflect, dtype)
        t = torch.randn(3, generator=gen, dtype=dtype)
        perm = torch.randperm(graph.pos.shape[0], generator=gen)
        from equivariance import transform
        moved = transform(graph.to(dtype), q, t, perm)
        expected = virtual_as_nodes(graph.to(dtype)) @ q.T + t
        err = (virtual_as_nodes(moved) - expected).abs().max() / expected.abs().max()
        assert err < TOLERANCE[dtype]


def _scale_up_coordinate_heads(model):
    # The coordinate MLPs start near zero (gain 1e-3), which would make an equivariance test nearly
    # vacuous: pos' ≈ pos. Larger last layers make every coordinate term contribute visibly.
    for name, module in model.named_modules():
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)


def test_coordinate_terms_matter_in_the_equivariance_test():
    # guards: a test that passes because the model returns its input
    torch.manual_seed(0)
    model = FastEGNN().double()
    _scale_up_coordinate_heads(model)
    graph = random_graph()
    out = model(**graph.kwargs()).pos
    assert (out - graph.pos).abs().max() > 0.1


@pytest.mark.parametrize("model_cls", MODELS)
def test_edge_chunking_gives_the_same_outputs_and_gradients(model_cls):
    torch.manual_seed(0)
    graph = random_graph(num_graphs=3, nodes=15)
    plain = model_cls().double()
    chunked = model_cls(edge_chunk_size=37).double()
    chunked.load_state_dict(plain.state_dict())
    outs = []
    for model in (plain, chunked):
        pred = model(**graph.kwargs())
        loss = pred.pos.square().sum() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().sum())
        loss.backward()
        outs.append(pred.pos)
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("model_cls", MODELS)
def test_isolated_nodes_and_empty_edge_sets_are_fine(model_cls):
    # a node with no edges gets a zero real-real mean (docs/maths.md §2), not NaN; r = 1 drops every edge
    graph = random_graph()
    model = model_cls().double()
    pred = model(**{**graph.kwargs(), "edge_index": graph.edge_index[:, :0], "edge_attr": graph.edge_attr[:0]})
    assert torch.isfinite(pred.pos).all()
    pred.pos.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batched_graphs_do_not_talk_to_each_other():
    # the virtual nodes of graph 0 must not see graph 1's nodes
    torch.manual_seed(0)
    model = FastEGNN().double()
    both = random_graph(num_graphs=2, nodes=10)
    first = random_graph(num_graphs=2, nodes=10)
    keep = first.batch == 0
    alone = model(node_features=first.node_features[keep], pos=first.pos[keep], vel=first.vel[keep],
                  edge_index=first.edge_index[:, keep[first.edge_index[0]]],
                  edge_attr=first.edge_attr[keep[first.edge_index[0]]])
    together = model(**both.kwargs())
    assert torch.allclose(alone.pos, together.pos[keep], atol=1e-12)
    assert torch.allclose(alone.virtual_pos[0], together.virtual_pos[0], atol=1e-12)


def test_virtual_nodes_start_at_the_centroid_and_spread():
    torch.manual_seed(0)
    model = FastEGNN(layers=1).double()
    _scale_up_coordinate_heads(model)
    graph = random_graph(num_graphs=1)
    z = model(**graph.kwargs()).virtual_pos[0]               # (3, C)
    assert (z[:, 0] - z[:, 1]).abs().max() > 1e-6            # distinct channels thanks to S


@pytest.mark.parametrize("model_cls", MODELS)
def test_wrong_feature_width_is_a_clear_error(model_cls):
    graph = random_graph(node_features=3)
    with pytest.raises(ValueError, match="node_features"):
        model_cls().double()(**graph.kwargs())
    graph = random_graph(edge_features=1)
    with pytest.raises(ValueError, match="edge_features"):
        model_cls().double()(**graph.kwargs())


def test_node_attributes_are_used():
    torch.manual_seed(0)
    graph = random_graph()
    model = FastEGNN(node_attrs=2).double()
    attr = torch.randn(graph.pos.shape[0], 2, dtype=torch.float64)
    a = model(**graph.kwargs(), node_attr=attr).pos
    b = model(**graph.kwargs(), node_attr=attr * 2).pos
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="node_attrs"):
        model(**graph.kwargs())


def test_float32_equivariance_error_is_small_but_nonzero():
    # documents the float32 error level (reported in the issue note), and that the helper detects breakage
    torch.manual_seed(0)
    model = FastEGNN()
    _scale_up_coordinate_heads(model)
    graph = random_graph()
    err = equivariance_error(lambda g: model(**g.kwargs()).pos, graph, torch.float32)
    assert 0 < err < TOLERANCE[torch.float32]
    broken = lambda g: model(**g.kwargs()).pos + g.pos[:, :1]          # noqa: E731  adds a non-equivariant term
    assert equivariance_error(broken, graph, torch.float32) > 1e-3
