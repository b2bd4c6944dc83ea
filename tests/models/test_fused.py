"""The fused message blocks (dist_egnn.models.fused): hand-written backward == autograd, chunking changes nothing.

Guards: a wrong term in a hand-written backward (gradcheck in float64), chunk boundaries that drop or double
rows, halo rows (senders beyond the owned nodes) whose gradients must reach the halo, isolated nodes and
graphs with no edge at all.
"""
import pytest
import torch
from torch.autograd import gradcheck

from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.models.fused import EdgeMessages, VirtualMessages

from equivariance import random_graph

H = 5


def _weights(*shapes):
    return [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]


N_OWNED = 6


def _edge_inputs(n_halo=3, edges=17, edge_features=2, seed=0):
    torch.manual_seed(seed)
    n_all = N_OWNED + n_halo
    recv = torch.randint(0, N_OWNED - 1, (edges,))           # the last owned node receives nothing: isolated
    send = torch.randint(0, n_all, (edges,))                  # senders include halo rows
    h_all, pos_all, edge_attr = _weights((n_all, H), (n_all, 3), (edges, edge_features))
    w_recv, w_send, w_geo, b1, w2, b2, wx, bx, vx = _weights((H, H), (H, H), (H, 1 + edge_features), (H,), (H, H),
                                                             (H,), (H, H), (H,), (1, H))
    return h_all, pos_all, recv, send, edge_attr, w_recv, w_send, w_geo, b1, w2, b2, wx, bx, vx


@pytest.mark.parametrize("chunk", [4, 17, 1000])
def test_edge_messages_backward_matches_finite_differences(chunk):
    inputs = _edge_inputs()
    assert gradcheck(lambda *a: EdgeMessages.apply(*a, N_OWNED, chunk), inputs, eps=1e-6, atol=1e-7)


def test_edge_messages_with_no_edges():
    inputs = _edge_inputs(edges=0)
    msg, disp = EdgeMessages.apply(*inputs, N_OWNED, 8)
    assert msg.abs().sum() == 0 and disp.abs().sum() == 0
    assert gradcheck(lambda *a: EdgeMessages.apply(*a, N_OWNED, 8), inputs, eps=1e-6, atol=1e-7)


def test_edge_messages_gradient_reaches_halo_rows():
    inputs = _edge_inputs()
    msg, disp = EdgeMessages.apply(*inputs, N_OWNED, 4)
    (msg.sum() + disp.square().sum()).backward()
    h_all, pos_all, send = inputs[0], inputs[1], inputs[3]
    halo_senders = send[send >= N_OWNED].unique()
    assert halo_senders.numel() > 0
    assert (h_all.grad[halo_senders].abs().sum(1) > 0).all()
    assert (pos_all.grad[halo_senders].abs().sum(1) > 0).all()


def _virtual_inputs(nodes=7, graphs=2, channels=3, seed=0):
    torch.manual_seed(seed)
    batch = torch.arange(graphs).repeat_interleave(torch.tensor([4, nodes - 4]))
    h, per_channel, dist, w_h, w_dist = _weights((nodes, H), (graphs, channels, H), (nodes, channels), (H, H), (H,))
    w2, b2, wa, ba, va, wb, bb, vb = _weights((H, H), (H,), (H, H), (H,), (1, H), (H, H), (H,), (1, H))
    return h, per_channel, dist, w_h, w_dist, batch, w2, b2, wa, ba, va, wb, bb, vb


@pytest.mark.parametrize("chunk", [2, 3, 100])
def test_virtual_messages_backward_matches_finite_differences(chunk):
    inputs = _virtual_inputs()
    assert gradcheck(lambda *a: VirtualMessages.apply(*a, chunk), inputs, eps=1e-6, atol=1e-7)


class _FixedHalo:
    """A communicator whose halo is fixed extra rows (what a rank receives from its neighbours)."""

    world_size = 1

    def __init__(self, halo_h, halo_pos):
        self.halo_h, self.halo_pos = halo_h, halo_pos

    def sum_over_parts(self, *tensors):
        return tensors

    def exchange_halo(self, h, pos):
        return torch.cat([h, self.halo_h]), torch.cat([pos, self.halo_pos])


def _graph_with_halo_and_isolated_nodes():
    graph = random_graph(num_graphs=2, nodes=14, radius=1.3)
    n = graph.pos.shape[0]
    gen = torch.Generator().manual_seed(3)
    halo = 4
    extra = torch.stack([torch.randint(0, n, (9,), generator=gen), n + torch.randint(0, halo, (9,), generator=gen)])
    edge_index = torch.cat([graph.edge_index, extra], dim=1)
    edge_attr = torch.randn(edge_index.shape[1], 2, generator=gen, dtype=torch.float64)
    comm = _FixedHalo(torch.randn(halo, 64, generator=gen, dtype=torch.float64),
                      torch.randn(halo, 3, generator=gen, dtype=torch.float64))
    kwargs = {**graph.kwargs(), "edge_index": edge_index, "edge_attr": edge_attr}
    return kwargs, comm


@pytest.mark.parametrize("model_cls", [EGNN, FastEGNN])
@pytest.mark.parametrize("chunk", [None, 5])
def test_fused_model_equals_plain_autograd_model(model_cls, chunk):
    # outputs and every parameter gradient of the fused path == the plain autograd composition, with halo
    # rows, isolated nodes (the radius leaves some) and edges in chunks smaller than a node's degree
    torch.manual_seed(0)
    kwargs, comm = _graph_with_halo_and_isolated_nodes()
    plain = model_cls(comm=comm).double()
    for name, module in plain.named_modules():
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)
    plain.set_fused(False)
    fused = model_cls(edge_chunk_size=chunk, comm=comm).double()
    fused.load_state_dict(plain.state_dict())
    assert (torch.bincount(kwargs["edge_index"][0], minlength=kwargs["pos"].shape[0]) == 0).any()
    outs = []
    for model in (plain, fused):
        pos = kwargs["pos"].clone().requires_grad_(True)
        pred = model(**{**kwargs, "pos": pos})
        loss = pred.pos.square().sum() + (0 if pred.virtual_pos is None else pred.virtual_pos.square().sum())
        loss.backward()
        outs.append((pred.pos.detach(), pos.grad))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("model_cls", [EGNN, FastEGNN])
def test_fused_model_with_no_edges_has_finite_gradients(model_cls):
    graph = random_graph()
    model = model_cls(edge_chunk_size=3).double()
    pred = model(**{**graph.kwargs(), "edge_index": graph.edge_index[:, :0], "edge_attr": graph.edge_attr[:0]})
    pred.pos.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("model_cls", [EGNN, FastEGNN])
def test_chunks_on_worker_threads_equal_chunks_in_sequence(model_cls, monkeypatch):
    # guards: a race between worker threads (shared rows written twice, an accumulator lost in the sum)
    from dist_egnn.models import fused
    torch.manual_seed(0)
    kwargs, comm = _graph_with_halo_and_isolated_nodes()
    model = model_cls(edge_chunk_size=6, comm=comm).double()
    results = []
    for parallel, threads in [(False, 1), (True, 2), (True, 3)]:
        monkeypatch.setattr(fused, "PARALLEL_CHUNKS", parallel)
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model.zero_grad()
            pred = model(**kwargs)
            (pred.pos.square().sum()).backward()
        finally:
            torch.set_num_threads(old)
        results.append((pred.pos.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    for pos, grads in results[1:]:
        assert torch.allclose(pos, results[0][0], rtol=1e-12, atol=1e-12)
        assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, results[0][1]))
