"""The external field (gravity, docs/maths.md §8): phi_g(h_i) g as one more summand of term (4).

Guards: a field that breaks equivariance (not rotated with the positions, or translated), a model that ignores
g, a field term that leaks into a model built without one (parameters, state dict, outputs), the fused and plain
paths disagreeing, and inputs of the wrong shape.
"""
import pytest
import torch

from dist_egnn.models import EGNN, FastEGNN

from equivariance import TOLERANCE, assert_equivariant, equivariance_error, random_graph

MODELS = [EGNN, FastEGNN]


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def scale_up_heads(model):
    # The coordinate heads and phi_g start near zero (gain 1e-3): larger last layers make every summand of (4),
    # the field's included, visible in an equivariance test (see test_models._scale_up_coordinate_heads).
    for name, module in model.named_modules():
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp", "field_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)


@pytest.mark.parametrize("model_cls", MODELS)
def test_without_a_field_the_model_is_unchanged(model_cls):
    # checkpoints of runs without gravity must load: no phi_g, the same names and the same count as before
    plain = model_cls()
    assert not any("field_mlp" in name for name in plain.state_dict())
    assert trainable(plain) == {EGNN: 134_084, FastEGNN: 284_804}[model_cls]
    with_field = model_cls(external_field=True)
    hidden, layers = 64, 4
    assert trainable(with_field) - trainable(plain) == layers * (hidden * hidden + 2 * hidden + 1)   # phi_g per layer


@pytest.mark.parametrize("model_cls", MODELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
def test_models_with_gravity_are_equivariant(model_cls, dtype, fused):
    # f(Qx + t, Qv, Qg) = Q f(x, v, g) + t, permutations of the real nodes included
    torch.manual_seed(0)
    model = model_cls(external_field=True).to(dtype)
    model.set_fused(fused)
    scale_up_heads(model)
    graph = random_graph(gravity=True)
    assert_equivariant(lambda g: model(**g.kwargs()).pos, graph, dtype)


def test_the_field_must_rotate_with_the_positions():
    # guards: a helper or a model for which g does not matter. Holding g fixed while everything else rotates
    # breaks equivariance by far more than the float64 tolerance.
    torch.manual_seed(0)
    model = FastEGNN(external_field=True).double()
    scale_up_heads(model)
    graph = random_graph(gravity=True)
    fixed = graph.gravity

    def fixed_field(g):
        return model(**{**g.kwargs(), "gravity": fixed}).pos
    assert equivariance_error(fixed_field, graph, torch.float64) > 1e3 * TOLERANCE[torch.float64]


@pytest.mark.parametrize("model_cls", MODELS)
def test_the_output_moves_with_the_field(model_cls):
    torch.manual_seed(0)
    model = model_cls(external_field=True).double()
    graph = random_graph(gravity=True)
    base = model(**graph.kwargs()).pos
    stronger = model(**{**graph.kwargs(), "gravity": 2 * graph.gravity}).pos
    # with phi_g's default (small) initialisation a field still moves every graph's nodes
    assert (stronger - base).abs().max() > 1e-5
    other = graph.gravity.clone()
    other[1] = -other[1]                                     # only graph 1's field changes: only its nodes move
    moved = model(**{**graph.kwargs(), "gravity": other}).pos
    assert torch.equal(moved[graph.batch == 0], base[graph.batch == 0])
    assert (moved[graph.batch == 1] - base[graph.batch == 1]).abs().max() > 1e-5


@pytest.mark.parametrize("model_cls", MODELS)
def test_zero_field_is_the_model_without_one(model_cls):
    # the field is one more summand and nothing else: at g = 0 the model equals the same weights without phi_g
    torch.manual_seed(0)
    with_field = model_cls(external_field=True).double()
    scale_up_heads(with_field)
    without = model_cls().double()
    without.load_state_dict({k: v for k, v in with_field.state_dict().items() if "field_mlp" not in k})
    graph = random_graph()
    zero = torch.zeros(graph.num_graphs, 3, dtype=torch.float64)
    assert torch.equal(with_field(**graph.kwargs(), gravity=zero).pos, without(**graph.kwargs()).pos)


@pytest.mark.parametrize("model_cls", MODELS)
def test_fused_equals_plain_with_gravity(model_cls):
    torch.manual_seed(0)
    graph = random_graph(num_graphs=3, nodes=15, gravity=True)
    fused = model_cls(external_field=True, edge_chunk_size=37).double()
    scale_up_heads(fused)
    plain = model_cls(external_field=True, edge_chunk_size=37).double()
    plain.load_state_dict(fused.state_dict())
    plain.set_fused(False)
    outs, field_grads = [], []
    for model in (fused, plain):
        gravity = graph.gravity.clone().requires_grad_(True)
        pred = model(**{**graph.kwargs(), "gravity": gravity})
        (pred.pos.square().sum() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().sum())).backward()
        outs.append(pred.pos.detach())
        field_grads.append(gravity.grad)
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    assert torch.allclose(field_grads[0], field_grads[1], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name
    assert all(layer.field_mlp[2].weight.grad.abs().sum() > 0 for layer in fused.layers)


@pytest.mark.parametrize("model_cls", MODELS)
def test_gravity_of_the_wrong_kind_is_a_clear_error(model_cls):
    graph = random_graph(gravity=True)
    with pytest.raises(ValueError, match="without an external field"):
        model_cls().double()(**graph.kwargs())
    field_model = model_cls(external_field=True).double()
    with pytest.raises(ValueError, match="got no gravity"):
        field_model(**{k: v for k, v in graph.kwargs().items() if k != "gravity"})
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        field_model(**{**graph.kwargs(), "gravity": graph.gravity[0]})
