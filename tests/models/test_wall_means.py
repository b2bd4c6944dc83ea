"""FastEGNN's per-graph means with walls (docs/maths.md §8): the centroid x̄ of term 2, where the virtual nodes
start, is the moving nodes' mean; walls stay senders of m_ic, counted (with all real nodes) in the means of
terms 5 and 7, unless ``virtual_walls=False``, where the virtual nodes talk to the moving nodes alone; the model
stays E(3)-equivariant with the walls moved along; without walls it is unchanged."""
from dataclasses import replace

import pytest
import torch

from dist_egnn.models import EGNN, FastEGNN

from equivariance import Graph, assert_equivariant, random_graph

WALLS_PER_GRAPH = 6


def walled_graph(seed: int = 0, num_graphs: int = 2, nodes: int = 16) -> Graph:
    """Random graphs whose last ``WALLS_PER_GRAPH`` nodes are walls (node feature 1, ``type``), shifted well
    away from the fluid so that every mean with and without them differs; no edge joins two walls."""
    g = random_graph(num_graphs=num_graphs, nodes=nodes, seed=seed)
    wall = (torch.arange(len(g.pos)) % nodes) >= nodes - WALLS_PER_GRAPH
    features = g.node_features.clone()
    features[:, 1] = wall.to(features.dtype)
    pos = g.pos + 3.0 * wall.unsqueeze(1).to(g.pos.dtype)
    recv, send = g.edge_index
    keep = ~(wall[recv] & wall[send])
    return replace(g, node_features=features, pos=pos, edge_index=g.edge_index[:, keep], edge_attr=g.edge_attr[keep])


def moving_of(graph: Graph) -> torch.Tensor:
    return graph.node_features[:, 1] == 0


def fastegnn(layers: int = 2, heads: float = 1.0, virtual_walls: bool = True) -> FastEGNN:
    """A small float64 FastEGNN; ``heads`` scales the coordinate heads' last layers (near zero at init) so that
    coordinates really move."""
    torch.manual_seed(0)
    model = FastEGNN(hidden=8, layers=layers, virtual_channels=3, virtual_walls=virtual_walls).double()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("2.weight") and param.shape[0] == 1:
                param.mul_(heads)
    return model


def context(model, graph: Graph, moving):
    return model.context(graph.node_features, graph.pos, graph.vel, graph.edge_index, graph.edge_attr, graph.batch,
                         graph.num_graphs, None, moving=moving)


def fluid_means(graph: Graph, moving: torch.Tensor) -> torch.Tensor:
    return torch.stack([graph.pos[(graph.batch == b) & moving].mean(0) for b in range(graph.num_graphs)])


def test_centroid_is_the_moving_nodes_mean_and_ignores_the_walls():
    model, g = fastegnn(), walled_graph()
    moving = moving_of(g)
    ctx = context(model, g, moving)
    centroid = ctx.centroid(g.pos)
    assert torch.allclose(centroid, fluid_means(g, moving), rtol=0, atol=1e-12)
    every = torch.stack([g.pos[g.batch == b].mean(0) for b in range(g.num_graphs)])
    assert (centroid - every).abs().max() > 0.5                                        # the walls would pull it
    walls_elsewhere = g.pos + 7.0 * (~moving).unsqueeze(1).to(g.pos.dtype)
    assert torch.equal(ctx.centroid(walls_elsewhere), centroid)
    assert ctx.node_count.flatten().tolist() == [16.0, 16.0]                          # terms 5, 7: every real node
    assert ctx.moving_count.flatten().tolist() == [10.0, 10.0]
    only_walls = moving & (g.batch == 0)                                              # graph 1: walls alone
    alone = context(model, g, only_walls).centroid(g.pos)
    assert torch.equal(alone[0], centroid[0]) and torch.allclose(alone[1], every[1], rtol=0, atol=1e-12)


def test_virtual_nodes_start_at_the_fluid_centroid():
    model, g = fastegnn(), walled_graph()
    seen = {}
    model.layers[0].register_forward_pre_hook(lambda layer, args: seen.update(virtual_pos=args[4]))
    model(**g.kwargs(), moving=moving_of(g))
    start = fluid_means(g, moving_of(g)).unsqueeze(-1).expand(-1, -1, 3)
    assert torch.allclose(seen["virtual_pos"], start, rtol=0, atol=1e-12)


@pytest.mark.parametrize("virtual_walls", [True, False])
def test_walls_are_counted_in_the_virtual_coordinate_update_unless_left_out(virtual_walls):
    """Term 5 with phi_X = 1: z' = z + mean_i (z - x_i) over every real node = 2 x̄_fluid - x̄_all (z starts at
    the fluid's centroid). With ``virtual_walls=False`` the mean is over the fluid: z' = x̄_fluid."""
    model, g = fastegnn(layers=1, virtual_walls=virtual_walls), walled_graph()
    head = model.layers[0].virtual_pos_mlp                                            # phi_X: exactly 1
    with torch.no_grad():
        head[0].weight.zero_()
        head[0].bias.fill_(1.0)
        head[2].weight.fill_(1.0 / (8 * torch.nn.functional.silu(torch.tensor(1.0, dtype=torch.float64)).item()))
    moving = moving_of(g)
    virtual = model(**g.kwargs(), moving=moving).virtual_pos
    every = torch.stack([g.pos[g.batch == b].mean(0) for b in range(g.num_graphs)])
    counted = every if virtual_walls else fluid_means(g, moving)
    want = (2 * fluid_means(g, moving) - counted).unsqueeze(-1).expand(-1, -1, 3)
    assert torch.allclose(virtual, want, rtol=0, atol=1e-10)


def test_walls_send_to_the_virtual_nodes():
    """A wall without edges reaches the fluid only through m_ic (terms 5 and 7): moving it changes the fluid's
    prediction, while the centroid stays where the fluid is."""
    model, g = fastegnn(heads=20.0), walled_graph()
    moving = moving_of(g)
    wall = int(torch.nonzero(~moving)[0])
    isolated = (g.edge_index != wall).all(dim=0)
    g = replace(g, edge_index=g.edge_index[:, isolated], edge_attr=g.edge_attr[isolated])
    moved = g.pos.clone()
    moved[wall] += torch.tensor([0.5, -0.3, 0.2], dtype=moved.dtype)
    before, after = (model(**replace(g, pos=p).kwargs(), moving=moving) for p in (g.pos, moved))
    # float64 rounding is ~1e-15 of the outputs: these changes are the wall's messages to the virtual nodes
    assert (before.pos[moving] - after.pos[moving]).abs().max() > 1e-10 * before.pos.abs().max()
    assert (before.virtual_pos - after.virtual_pos).abs().max() > 1e-6 * before.virtual_pos.abs().max()
    ctx = context(model, g, moving)
    assert torch.equal(ctx.centroid(g.pos), ctx.centroid(moved))


def test_without_virtual_walls_a_wall_without_edges_is_not_there():
    """``virtual_walls=False``: the virtual nodes hear the fluid alone, so walls that no edge touches change
    nothing: the fluid's prediction and the virtual nodes equal those of the graph without the walls."""
    model, g = fastegnn(heads=20.0, virtual_walls=False), walled_graph()
    moving = moving_of(g)
    recv, send = g.edge_index
    fluid_edges = moving[recv] & moving[send]
    g = replace(g, edge_index=g.edge_index[:, fluid_edges], edge_attr=g.edge_attr[fluid_edges])
    with_walls = model(**g.kwargs(), moving=moving)
    renumber = torch.cumsum(moving.long(), 0) - 1
    fluid = replace(g, node_features=g.node_features[moving], pos=g.pos[moving], vel=g.vel[moving],
                    batch=g.batch[moving], edge_index=renumber[g.edge_index])
    alone = model(**fluid.kwargs())
    assert torch.allclose(with_walls.pos[moving], alone.pos, rtol=0, atol=1e-12)
    assert torch.allclose(with_walls.virtual_pos, alone.virtual_pos, rtol=0, atol=1e-12)
    assert (with_walls.pos[moving] - g.pos[moving]).abs().max() > 1e-3                    # it did move them


@pytest.mark.parametrize("virtual_walls", [True, False])
def test_fastegnn_with_walls_is_e3_equivariant(virtual_walls, reflect_trials=2):
    """Walls rotate, reflect, translate and permute with the fluid (their mask is the permuted type column)."""
    model = fastegnn(layers=3, heads=20.0, virtual_walls=virtual_walls)

    def fn(graph: Graph) -> torch.Tensor:
        return model(**graph.kwargs(), moving=moving_of(graph)).pos

    assert_equivariant(fn, walled_graph(seed=1), torch.float64, trials=reflect_trials)

    def virtual(graph: Graph) -> torch.Tensor:              # virtual nodes (B, 3, C) as C rows per graph
        return model(**graph.kwargs(), moving=moving_of(graph)).virtual_pos.transpose(1, 2).reshape(-1, 3)

    g = walled_graph(seed=2)
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5),
                                           dtype=torch.float64))[0]
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    turned = replace(g, pos=g.pos @ rotation.T + shift, vel=g.vel @ rotation.T)
    assert torch.allclose(virtual(turned), virtual(g) @ rotation.T + shift, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_cls", [FastEGNN, EGNN])
def test_without_walls_the_model_is_unchanged_bit_for_bit(model_cls):
    """No mask is the model of docs/maths.md §2; a mask without walls (a store with ``type``, none of them 1)
    takes the masked path and gives the same bits, forward and backward."""
    g = random_graph(num_graphs=2, nodes=14, seed=3)
    outputs = []
    for moving in (None, torch.ones(len(g.pos), dtype=torch.bool)):
        torch.manual_seed(0)
        model = model_cls(hidden=8, layers=2).double()
        pred = model(**g.kwargs(), moving=moving)
        pred.pos.square().sum().backward()
        outputs.append((pred, [p.grad for p in model.parameters() if p.grad is not None]))
    (plain, plain_grads), (masked, masked_grads) = outputs
    assert torch.equal(plain.pos, masked.pos)
    assert (plain.virtual_pos is None) == (masked.virtual_pos is None)
    if plain.virtual_pos is not None:
        assert torch.equal(plain.virtual_pos, masked.virtual_pos)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, masked_grads))


def test_a_mask_of_the_wrong_shape_or_type_is_refused():
    model, g = fastegnn(), walled_graph()
    with pytest.raises(ValueError, match="moving must be a bool"):
        model(**g.kwargs(), moving=moving_of(g)[:-1])
    with pytest.raises(ValueError, match="moving must be a bool"):
        model(**g.kwargs(), moving=moving_of(g).double())
