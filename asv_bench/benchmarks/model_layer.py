"""One layer, forward + backward, of EGNN and FastEGNN on a graph: where a step's time goes, per layer."""
import torch

from dist_egnn.models.egnn import EGNNLayer

from . import common


class LayerStep:
    params = [common.sizes("small", "20k"), ["fastegnn", "egnn"]]
    param_names = ["size", "model"]
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0.0
    timeout = 600

    def setup_cache(self):
        return {size: common.graph(size) for size in self.params[0]}

    def setup(self, graphs, size, model):
        g = graphs[size]
        net = common.make_model(model)
        self.layer = net.layers[0]
        inputs = common.model_inputs(g)
        self.ctx = net.context(inputs["node_features"], inputs["pos"], inputs["vel"], inputs["edge_index"],
                               inputs["edge_attr"], inputs["batch"], inputs["num_graphs"], None)
        torch.manual_seed(0)
        self.h = torch.randn(g["pos"].shape[0], net.hidden, requires_grad=True)
        self.pos, self.vel = g["pos"], g["vel"]
        c = getattr(net, "virtual_channels", 0)
        self.virtual = (torch.randn(1, net.hidden, c), g["pos"].mean(0).view(1, 3, 1).repeat(1, 1, c)) if c else ()

    def time_layer_forward_backward(self, graphs, size, model):
        if isinstance(self.layer, EGNNLayer) and not self.virtual:
            h, pos = self.layer(self.h, self.pos, self.vel, self.ctx)
            out = h.square().mean() + pos.square().mean()
        else:
            h, pos, vh, vpos = self.layer(self.h, self.pos, self.vel, *self.virtual, self.ctx)
            out = h.square().mean() + pos.square().mean() + vpos.square().mean()
        out.backward()
