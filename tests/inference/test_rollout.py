"""Rollouts on small hand-made stores (no training): the graph recipe, velocity units, walls, P parts.

The stores move every particle at constant velocity with dyadic numbers (multiples of 1/256, times of 1/4),
so float arithmetic is exact and "exactly" means bit-equal.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from omegaconf import OmegaConf

from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.store import atomic_store, create_split, open_store, write_root_attrs, write_scenes
from dist_egnn.inference.rollout import (
    GraphRecipe,
    Parts,
    Rollout,
    RolloutError,
    build_graph,
    container_box,
    outside_share,
    partitioned_edges,
    rollout,
    velocity_gap_note,
)
from dist_egnn.keys import SPLITS
from dist_egnn.models import FastEGNN, Prediction
from dist_egnn.partitioners.strategies import spatial_assignment

DT = 0.25          # time between stored frames
DELTA_T = 2        # frames per task step: Δt·dt = 0.5


def toy_store(path: Path, *, scenes: int = 2, n: int = 40, frames: int = 9, radius: float | None = 0.6,
              walls: int = 0, seed: int = 0, fall: float = 0.0):
    """Particles in exact constant-velocity motion (with ``fall``: accelerated by -fall along y, the stored
    velocity the instantaneous one); the first ``walls`` nodes of every scene have type 1 and, unlike real
    walls, a stored trajectory that moves (so a wall scored by mistake shows up in the MSE)."""
    rng = np.random.default_rng(seed)
    x0 = rng.integers(0, 128, size=(scenes, n, 3)) / 64
    v = rng.integers(-8, 9, size=(scenes, n, 3)) / 64
    t = np.arange(frames) * DT
    a = np.array([0.0, -fall, 0.0])
    pos = (x0[:, None] + t[None, :, None, None] * v[:, None] + 0.5 * t[None, :, None, None] ** 2 * a).astype(np.float32)
    vel = (v[:, None] + t[None, :, None, None] * a).astype(np.float32)
    kind = np.zeros((scenes, n, 1), np.float32)
    kind[:, :walls] = 1
    with atomic_store(path) as root:
        write_root_attrs(root, dataset="toy", source="toy", dt=DT, units={"length": "m", "time": "s"},
                         radius=radius, node_scalars=["type"], generator={})
        for split in SPLITS:
            write_scenes(create_split(root, split, [n] * scenes, frames, 1), 0, pos, vel, kind)
    return open_store(path)


def run_config(unit: str = "horizon", cutoff_rate: float = 0.0, radius: float | None = None):
    return OmegaConf.create({
        "dataset": {"delta_t": DELTA_T, "frame_start": 0, "velocity_unit": unit, "node_features": ["speed", "type"],
                    "edge_features": ["distance"], "radius": radius, "max_neighbors": None},
        "model": {"cutoff_rate": cutoff_rate}, "trainer": {"eval_batch_size": 1}})


class ConstantVelocity(torch.nn.Module):
    """x + v / (velocity units per displacement per task step): constant-velocity extrapolation as a model."""

    def __init__(self, per_displacement: float):
        super().__init__()
        self.per_displacement = per_displacement

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        return Prediction(pos + vel / self.per_displacement, None)


def open_zarr(info):
    return zarr.open_group(str(info.path), mode="r")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return {"plain": toy_store(root / "plain.zarr"), "walls": toy_store(root / "walls.zarr", walls=6)}


class Damped(torch.nn.Module):
    """x + 0.9 v: a model whose rollout leaves the truth, node by node (no scene hears another)."""

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        return Prediction(pos + 0.9 * vel, None)


def test_scene_ids_roll_out_those_scenes_as_the_whole_split_does(stores):
    """scene_ids picks scenes by index, in the order given; each is rolled out as in a rollout of the whole
    split (so one scene at a time tells which scene a divergence is in). guards: the picked scenes' rows read
    from the first scenes, or from the wrong frames."""
    info = stores["plain"]
    whole = rollout(Damped(), run_config(), info, "test", 3)
    picked = rollout(Damped(), run_config(), info, "test", 3, scene_ids=[1, 0])
    assert picked.scenes == [1, 0] and whole.scenes == [0, 1]
    a, b = whole.scene_ptr[1], whole.scene_ptr[2]
    np.testing.assert_array_equal(picked.pred[:, : b - a], whole.pred[:, a:b])
    np.testing.assert_array_equal(picked.truth[:, b - a:], whole.truth[:, :a])
    assert picked.mse == pytest.approx(whole.mse, rel=1e-6) and max(whole.mse) > 0
    one = rollout(Damped(), run_config(), info, "test", 3, scene_ids=[1])
    np.testing.assert_array_equal(one.pred, whole.pred[:, a:b])


@pytest.mark.parametrize("ids, scenes, says", [([2], None, "names [2]"), ([0, 0], None, "repeats a scene"),
                                               ([], None, "is empty"), ([1], 1, "give one of them")])
def test_scene_ids_outside_the_split_or_beside_scenes_are_refused(stores, ids, scenes, says):
    with pytest.raises(RolloutError, match=re.escape(says)):
        rollout(Damped(), run_config(), stores["plain"], "test", 3, scenes=scenes, scene_ids=ids)


def test_graph_at_one_part_is_the_loaders_sample(stores):
    """guards: a rollout building its graphs with another recipe than the one the model was trained on."""
    info = stores["plain"]
    cfg = run_config(cutoff_rate=0.3)
    data = TrajectoryDataset(info, "test", delta_t=DELTA_T, node_features=["speed", "type"],
                             edge_features=["distance"], cutoff_rate=0.3, velocity_scale=DELTA_T * DT)
    sample = data.read([1])[0]
    scalars = np.asarray(open_zarr(info)["test"]["node_scalars"][info.splits["test"].scene_nodes(sample.scene)])
    graph = build_graph(sample.pos, sample.vel, scalars, GraphRecipe.of(cfg, info))
    assert graph.edge_index.shape[1] > 0
    np.testing.assert_array_equal(graph.edge_index, sample.edge_index)
    np.testing.assert_array_equal(graph.edge_attr, sample.edge_attr)
    np.testing.assert_array_equal(graph.node_features, sample.node_features)


@pytest.mark.parametrize("unit, per_displacement", [("horizon", 1.0), ("store", 1.0 / (DELTA_T * DT))])
def test_constant_velocity_model_reproduces_constant_velocity_exactly(stores, unit, per_displacement):
    """The fed-back velocity is the last displacement in the training unit: a model that extrapolates at
    constant velocity (in that unit) reproduces the constant-velocity reference and the stored motion bit
    for bit. guards: velocities fed back in the wrong unit (off by Δt·dt) or from the wrong frames."""
    info = stores["plain"]
    result = rollout(ConstantVelocity(per_displacement), run_config(unit), info, "test", 3)
    assert result.steps == 3 and result.stopped is None
    np.testing.assert_array_equal(result.pred, result.baseline)
    np.testing.assert_array_equal(result.pred, result.truth)
    assert result.mse == [0.0] * 3 and result.baseline_mse == [0.0] * 3
    # stored velocities of the predicted frames: the displacement over the step's time, in the store's unit
    np.testing.assert_array_equal(result.vel[1:], np.broadcast_to(result.vel[0], result.vel[1:].shape))


def test_walls_never_move_and_are_left_out_of_the_mse(stores):
    """Walls (type 1) stay at their input positions whatever the model says, and no MSE sees them: here the
    stored walls move, so scoring them would make the MSE non-zero. guards: walls moved or scored."""
    info = stores["walls"]
    result = rollout(ConstantVelocity(1.0), run_config("horizon"), info, "test", 3)
    walls = ~result.moving
    assert walls.sum() == 12 and result.moving.sum() == 68
    for k in range(1, 4):
        np.testing.assert_array_equal(result.pred[k, walls], result.pred[0, walls])
        np.testing.assert_array_equal(result.baseline[k, walls], result.baseline[0, walls])
    assert np.abs(result.pred[3, walls] - result.truth[3, walls]).max() > 0.1      # they would count
    assert result.mse == [0.0] * 3 and result.baseline_mse == [0.0] * 3


def small_model(dtype=torch.float64) -> FastEGNN:
    torch.manual_seed(0)
    return FastEGNN(node_features=2, edge_features=1, hidden=16, layers=2, virtual_channels=2).to(dtype).eval()


@pytest.mark.parametrize("method", ["metis", "spatial"])
def test_exact_parts_equal_one_process_in_float64(stores, method):
    """P = 2 in exact mode, re-partitioned every step from the predicted positions, equals one process.
    guards: a partition or halo that misses edges once the particles have moved."""
    info, cfg = stores["walls"], run_config(cutoff_rate=0.25)
    model = small_model()
    one = rollout(model, cfg, info, "test", 3, dtype=torch.float64)
    two = rollout(model, cfg, info, "test", 3, parts=Parts(2, "exact", method), dtype=torch.float64)
    assert one.steps == two.steps == 3
    np.testing.assert_allclose(two.pred, one.pred, rtol=0, atol=1e-12)
    np.testing.assert_allclose(two.mse, one.mse, rtol=1e-12)
    assert len(two.cut_fraction) == 3 and all(0 < c < 1 for c in two.cut_fraction)
    drop = rollout(model, cfg, info, "test", 3, parts=Parts(2, "none", method), dtype=torch.float64)
    assert np.abs(drop.pred[1:] - one.pred[1:]).max() > 1e-9     # drop mode misses the cut edges


def test_a_run_that_drops_unwired_walls_rolls_out_on_the_graphs_it_trained_on(tmp_path):
    """dataset.unwired_walls=drop: a step's graph is the loader's (walls no edge touches left out), and with
    virtual nodes that talk to the moving nodes alone the rollout equals one keeping every wall, walls held
    where they are. guards: a rollout feeding the model other nodes than training did, or rows put back in the
    wrong places."""
    info = toy_store(tmp_path / "sparse.zarr", walls=30)          # 10 moving nodes: many walls far from all
    cfg = run_config(cutoff_rate=0.25)
    cfg.dataset.unwired_walls = "drop"
    data = TrajectoryDataset(info, "test", delta_t=DELTA_T, node_features=["speed", "type"], edge_features=["distance"],
                             cutoff_rate=0.25, velocity_scale=DELTA_T * DT, unwired_walls="drop")
    sample = data.read([1])[0]
    nodes = info.splits["test"].scene_nodes(sample.scene)
    pos, vel = (np.asarray(open_zarr(info)["test"][key][sample.frame, nodes]) for key in ("pos", "vel"))
    scalars = np.asarray(open_zarr(info)["test"]["node_scalars"][nodes])
    graph = build_graph(pos, vel * DELTA_T * DT, scalars, GraphRecipe.of(cfg, info))
    assert 10 < len(graph.kept) < 40 and len(sample.pos) == len(graph.kept)
    np.testing.assert_array_equal(sample.pos, pos[graph.kept])
    for got, want in ((graph.edge_index, sample.edge_index), (graph.edge_attr, sample.edge_attr),
                      (graph.node_features, sample.node_features)):
        np.testing.assert_array_equal(got, want)
    torch.manual_seed(0)
    model = FastEGNN(node_features=2, edge_features=1, hidden=16, layers=2, virtual_channels=2,
                     virtual_walls=False).double().eval()
    keep = rollout(model, run_config(cutoff_rate=0.25), info, "test", 3, dtype=torch.float64)
    drop = rollout(model, cfg, info, "test", 3, dtype=torch.float64)
    assert keep.steps == drop.steps == 3
    np.testing.assert_allclose(drop.pred, keep.pred, rtol=0, atol=1e-12)
    assert np.abs(drop.pred[3, drop.moving] - drop.pred[0, drop.moving]).max() > 1e-3      # the fluid moved


def test_drop_mode_keeps_only_edges_inside_parts(stores):
    info = stores["plain"]
    pos = np.asarray(open_zarr(info)["test"]["pos"][0, info.splits["test"].scene_nodes(0)])
    recipe = GraphRecipe.of(run_config(), info)
    whole = build_graph(pos, np.zeros_like(pos), np.zeros((len(pos), 1), np.float32), recipe).edge_index
    exact, cut = partitioned_edges(pos, whole, 0.0, Parts(2, "exact", "spatial"))
    drop, _ = partitioned_edges(pos, whole, 0.0, Parts(2, "none", "spatial"))
    np.testing.assert_array_equal(exact, whole)
    assert 0 < cut < 1 and drop.shape[1] == round(whole.shape[1] * (1 - cut))
    part = spatial_assignment(pos, 2)
    assert np.all(part[drop[0]] == part[drop[1]])


def test_rollout_stops_where_the_trajectory_ends_and_says_so(stores):
    result = rollout(ConstantVelocity(1.0), run_config(), stores["plain"], "val", 10, start=2)
    assert result.steps == 3 and result.requested == 10 and result.frames == [2, 4, 6, 8]
    assert "stopped after 3 of 10 steps" in result.stopped and "frame 8" in result.stopped
    with pytest.raises(RolloutError, match="start=7"):
        rollout(ConstantVelocity(1.0), run_config(), stores["plain"], "val", 1, start=7)
    with pytest.raises(RolloutError, match="steps=0"):
        rollout(ConstantVelocity(1.0), run_config(), stores["plain"], "val", 0)


class Collapse(torch.nn.Module):
    """Moves every particle half way to its graph's centroid each step: the graphs densify until the rollout
    stops them."""

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        return Prediction(pos - 0.5 * (pos - pos.mean(dim=0)), None)


def test_a_rollout_whose_particles_pile_together_stops_before_memory_runs_out(stores, tmp_path):
    """guards the 13 GB rollout of an under-trained fluid model: a scene's graph past EDGE_GROWTH_LIMIT times
    its first step's edges stops the rollout, saying why; the steps before are kept and scored."""
    import dist_egnn.inference.rollout as ro

    info = toy_store(tmp_path / "dense.zarr", scenes=1, n=200, frames=21, radius=0.2)
    result = rollout(Collapse(), run_config(), info, "test", 10)
    assert 1 <= result.steps < 10 and len(result.mse) == result.steps == len(result.baseline_mse)
    assert f"stopped after {result.steps} of 10 steps" in result.stopped and "piled together" in result.stopped
    first = build_graph(result.pred[0], np.zeros((200, 3)), np.zeros((200, 1), np.float32),
                        GraphRecipe.of(run_config(), info)).edge_index.shape[1]
    last = build_graph(result.pred[-1], np.zeros((200, 3)), np.zeros((200, 1), np.float32),
                       GraphRecipe.of(run_config(), info)).edge_index.shape[1]
    assert last > ro.EDGE_GROWTH_LIMIT * first                     # the graph the rollout refused to run



class Scatter(torch.nn.Module):
    """Throws every particle 20x as far from its graph's centroid each step: finite for a long while, soon
    meaningless."""

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        return Prediction(pos + 19.0 * (pos - pos.mean(dim=0)), None)


def test_a_rollout_whose_particles_fly_apart_stops_before_the_numbers_mean_nothing(tmp_path):
    """guards a 200-step fluid rollout whose last written frame had a spread of 1.5e22 (predict stopped only at
    NaN): a scene whose predicted extent passes SPREAD_LIMIT times the truth's stops the rollout, saying why;
    the steps before are kept and scored, and none of them is past the limit."""
    import dist_egnn.inference.rollout as ro

    info = toy_store(tmp_path / "toy.zarr", scenes=2, n=40, frames=21)
    result = rollout(Scatter(), run_config(), info, "test", 10)
    assert result.steps == 2                         # spreads ~20x, ~400x, then ~8000x: the third step is refused
    assert len(result.pred) == 3 and len(result.mse) == len(result.spread_ratio) == 2
    assert max(result.spread_ratio) < ro.SPREAD_LIMIT
    assert "stopped after 2 of 10 steps" in result.stopped and "flew apart" in result.stopped


class NaNAtStepTwo(torch.nn.Module):
    """Constant velocity at step 1, NaN everywhere from step 2."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        self.calls += 1
        return Prediction(pos + vel if self.calls == 1 else torch.full_like(pos, float("nan")), None)


def test_a_rollout_that_turns_nan_stops_and_keeps_the_steps_before(tmp_path):
    info = toy_store(tmp_path / "toy.zarr", scenes=1, n=40, frames=21)
    result = rollout(NaNAtStepTwo(), run_config(), info, "test", 5)
    assert result.steps == 1 and len(result.pred) == 2 and np.isfinite(result.pred).all()
    assert result.stopped == "stopped after 1 of 5 steps: the predictions of step 2 hold NaN or Inf at 40 nodes " \
                             "(the model diverged)"


class ThrowsOneThenNaN(torch.nn.Module):
    """Step 1: constant velocity, but moving node 10 thrown 50 m along x; step 2: NaN everywhere (as virtual
    nodes that heard the thrown particle would make it)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, node_features, pos, vel, edge_index, edge_attr=None, batch=None, num_graphs=None, **_):
        self.calls += 1
        if self.calls > 1:
            return Prediction(torch.full_like(pos, float("nan")), None)
        out = pos + vel
        out[10, 0] += 50.0
        return Prediction(out, None)


def test_a_stop_names_the_node_that_ran_away_and_since_when_it_is_outside_the_walls(tmp_path):
    """guards the small fluid's late divergences, reported as "NaN or Inf at 2002 nodes" although each began
    with one particle that had left the box long before: the stop names the farthest mover of the last kept
    step, its move beside the median one's, and the step since which it is outside its scene's walls."""
    info = toy_store(tmp_path / "walls.zarr", scenes=1, n=40, frames=21, walls=8)
    result = rollout(ThrowsOneThenNaN(), run_config(), info, "test", 5)
    assert result.steps == 1
    assert result.stopped.startswith("stopped after 1 of 5 steps: the predictions of step 2 hold NaN or Inf at ")
    moved = np.linalg.norm(result.pred[1] - result.pred[0], axis=1)[8:]
    assert result.stopped.endswith(f"(the model diverged); before it, node 10 of scene 0 moved {moved[2]:.3g} in "
                                   f"step 1 (the moving nodes' median: {np.median(moved):.3g}), outside its "
                                   f"scene's walls since step 1")



def test_a_runaway_outside_the_walls_names_the_reach_that_bounds_its_wall_edges(tmp_path):
    """With unbounded nearest-wall edges the stop says how to bound them; with a reach it does not."""
    info = toy_store(tmp_path / "walls.zarr", scenes=1, n=40, frames=21, walls=8)
    config = run_config()
    config.dataset.wall_neighbors = 2
    stopped = rollout(ThrowsOneThenNaN(), config, info, "test", 5).stopped
    assert stopped.endswith("outside its scene's walls since step 1, still wired to its 2 nearest walls however far "
                            "(bound them with wall_neighbors_reach=R just above the training graphs' longest: "
                            "python -m dist_egnn.measure.reach STORE --wall-neighbors 2)")
    config.dataset.wall_neighbors_reach = 1.0
    assert rollout(ThrowsOneThenNaN(), config, info, "test", 5).stopped.endswith("outside its scene's walls since "
                                                                                 "step 1")


def test_a_capped_graph_lets_a_piling_rollout_run_on_and_shows_the_piling(stores, tmp_path):
    """With dataset.max_neighbors the graph cannot outgrow n · cap edges, so the same collapsing model runs all
    its steps; edges_per_node climbs to the cap and says what happened."""
    info = toy_store(tmp_path / "dense.zarr", scenes=1, n=200, frames=21, radius=0.2)
    config = run_config()
    config.dataset.max_neighbors = 12
    result = rollout(Collapse(), config, info, "test", 10)
    assert result.steps == 10 and result.stopped is None
    assert len(result.edges_per_node) == 10 and max(result.edges_per_node) <= 12
    assert result.edges_per_node[-1] == 12 > result.edges_per_node[0]   # piled: every node at the cap


def test_edges_per_node_counts_what_the_moving_nodes_receive(stores):
    info = stores["walls"]
    result = rollout(ConstantVelocity(1.0), run_config(radius=0.6), info, "test", 2)
    recipe = GraphRecipe.of(run_config(radius=0.6), info)
    group, moving = open_zarr(info)["test"], result.moving
    ptr = result.scene_ptr
    received = 0
    for b in range(len(result.scenes)):
        sl = slice(ptr[b], ptr[b + 1])
        g = build_graph(result.pred[0][sl], np.zeros_like(result.pred[0][sl]), np.asarray(group["node_scalars"][sl]),
                        recipe)
        received += int(moving[sl][g.edge_index[0]].sum())
    assert result.edges_per_node[0] == pytest.approx(received / moving.sum())


def test_spread_ratio_is_one_for_the_exact_model_and_falls_as_predictions_contract(stores, tmp_path):
    """The toy stores move in exact constant velocity, so the constant-velocity model is exact (ratio 1); the
    collapsing model halves every node's distance from the centroid each step (ratio 1/2, 1/4, ...)."""
    exact = rollout(ConstantVelocity(1.0), run_config(), stores["plain"], "test", 3)
    np.testing.assert_allclose(exact.spread_ratio, 1.0, rtol=1e-6)
    info = toy_store(tmp_path / "still.zarr", scenes=2, n=50, frames=9, radius=0.2)
    group = zarr.open_group(str(info.path), mode="r+")["test"]
    group["pos"][:] = np.broadcast_to(group["pos"][0], group["pos"].shape)        # truth stands still
    config = run_config()
    config.dataset.max_neighbors = 12
    collapsing = rollout(Collapse(), config, info, "test", 3)
    np.testing.assert_allclose(collapsing.spread_ratio, [0.5, 0.25, 0.125], rtol=1e-5)


def test_outside_share_counts_the_fluid_beyond_the_box_of_the_walls():
    """Scene 0: walls at the corners of the unit cube, one of four fluid nodes below its floor (1/4); scene 1 has
    no walls and is left out of the mean; without walls anywhere the share is NaN."""
    walls = np.array([[0, 0, 0], [1, 1, 1]], float)
    fluid = np.array([[0.5, 0.5, 0.5], [0.1, 0.9, 0.2], [1.0, 1.0, 1.0], [0.5, -0.3, 0.5]])
    pred = np.concatenate([walls, fluid, np.full((3, 3), 9.0)])
    moving = np.array([False, False, True, True, True, True, True, True, True])
    ptr = np.array([0, 6, 9])
    assert outside_share(pred, moving, ptr) == pytest.approx(0.25)
    assert np.isnan(outside_share(pred[6:], moving[6:], np.array([0, 3])))


def boxed_store(path: Path, box: list[float], particle_radius: float, lift: float = 0.0, **kwargs):
    """toy_store's particles, ``lift`` higher, with the container an SPH store records (``generator.box``,
    ``generator.particle_radius``)."""
    toy_store(path, **kwargs)
    root = zarr.open_group(str(path), mode="r+")
    root.attrs.update(source="sph", generator={"box": box, "particle_radius": particle_radius})
    for split in SPLITS:
        pos = np.asarray(root[split]["pos"])
        pos[..., 1] += lift
        root[split]["pos"][:] = pos
    return open_store(path)


def test_a_contained_rollout_holds_the_fluid_and_its_reference_inside_the_container(tmp_path):
    """contain=True puts every predicted moving node outside the container (the SPH box less one particle radius)
    on its nearest point, counts them per step, and holds constant velocity inside the same box; walls stay
    where they are. guards: a constraint that lets fluid through, touches walls, or is scored against an
    unconstrained reference."""
    info = boxed_store(tmp_path / "box.zarr", [3.0, 2.5, 3.0], 0.25, scenes=2, n=40, frames=9, walls=4)
    lower, upper = container_box(info)
    np.testing.assert_array_equal(lower, [-1.25, 0.25, -1.25])
    np.testing.assert_array_equal(upper, [1.25, 2.25, 1.25])
    free = rollout(ConstantVelocity(1.0), run_config(), info, "test", 4)
    held = rollout(ConstantVelocity(1.0), run_config(), info, "test", 4, contain=True)
    moving = held.moving
    v0 = free.baseline[1, moving] - free.baseline[0, moving]           # constant velocity's move per step
    assert free.contained_share is None and len(held.contained_share) == 4
    for k in range(1, 5):
        fluid = held.pred[k, moving]
        assert (fluid >= lower).all() and (fluid <= upper).all()
        np.testing.assert_array_equal(held.pred[k, ~moving], held.pred[0, ~moving])
        reference = np.clip(held.baseline[k - 1, moving] + v0, lower, upper)
        np.testing.assert_array_equal(held.baseline[k, moving], reference)     # each step's v_0 held inside
    # step 1 starts from the stored state, so what it held is what constant velocity's first step leaves outside
    first = free.pred[1, moving]
    assert held.contained_share[0] == pytest.approx(np.mean(((first < lower) | (first > upper)).any(axis=1)))
    assert 0 < held.contained_share[0] < 1
    np.testing.assert_array_equal(held.truth, free.truth)


def test_a_rollout_that_stays_inside_is_the_same_contained_or_not(tmp_path):
    """A container wide enough for every prediction changes nothing, bit for bit, and holds no node."""
    info = boxed_store(tmp_path / "wide.zarr", [64.0, 64.0, 64.0], 0.25, lift=8.0, scenes=1, n=40, frames=9,
                       walls=4)
    free = rollout(ConstantVelocity(1.0), run_config(), info, "test", 3)
    held = rollout(ConstantVelocity(1.0), run_config(), info, "test", 3, contain=True)
    np.testing.assert_array_equal(held.pred, free.pred)
    np.testing.assert_array_equal(held.baseline, free.baseline)
    assert held.mse == free.mse and held.contained_share == [0.0] * 3


def test_a_store_without_a_container_refuses_containment(stores):
    with pytest.raises(RolloutError, match="contain=true .* records none: leave contain out"):
        rollout(ConstantVelocity(1.0), run_config(), stores["walls"], "test", 2, contain=True)


def test_the_picture_of_a_long_rollout_that_diverged_stays_readable():
    # 121 steps whose last one blew up (seen: MSE 1.6e45, spread 1.5e22 at Δt = 1): the right axis keeps the
    # spread and outside share of the sane steps readable, and the step axis does not label all 121 steps.
    from dist_egnn.inference.writers import LABELLED_STEPS, SPREAD_AXIS_TOP, rollout_figure

    steps, nodes = 121, 10
    pos = np.random.default_rng(0).uniform(size=(steps + 1, nodes, 3))
    spread = np.linspace(1.0, 1.3, steps)
    spread[-1] = 1.5e22
    result = Rollout(split="test", start=0, delta_t=1, requested=200, scenes=[0], scene_ptr=np.array([0, nodes]),
                     pred=pos, vel=np.zeros_like(pos), truth=pos, baseline=pos, scalars=np.zeros((nodes, 1)),
                     moving=np.arange(nodes) < 8, mse=[*np.geomspace(1e-8, 16.0, steps - 1), 1.6e45],
                     baseline_mse=list(np.geomspace(1e-6, 7.0, steps)), spread_ratio=list(spread),
                     outside_share=list(np.linspace(0.0, 0.99, steps)), stopped="diverged")
    fig = rollout_figure(result, "diverged")
    mse_axis, extent = fig.axes[-2], fig.axes[-1]
    assert extent.get_ylim() == (0.0, SPREAD_AXIS_TOP)
    assert len(mse_axis.get_xticks()) <= LABELLED_STEPS
    assert mse_axis.get_yscale() == "log"

    short = Rollout(**{**result.__dict__, "mse": result.mse[:10], "baseline_mse": result.baseline_mse[:10],
                       "spread_ratio": list(spread[:10]), "outside_share": result.outside_share[:10]})
    short_axis, short_extent = rollout_figure(short, "ten steps").axes[-2:]
    assert list(short_axis.get_xticks()) == list(range(1, 11))                 # every step labelled
    assert short_extent.get_ylim() == (0.0, 1.1)                                # spread 1.00-1.02: at least 1.1


def test_a_rollout_whose_first_step_diverged_still_gets_its_picture(tmp_path):
    # 0 steps kept (NaN at step 1): the picture shows the input frame and an empty error panel instead of an
    # IndexError that hid the "stopped after 0 of K steps" explanation behind a traceback
    from dist_egnn.inference.writers import write_png

    nodes = 10
    pos = np.random.default_rng(0).uniform(size=(1, nodes, 3))
    result = Rollout(split="test", start=0, delta_t=1, requested=5, scenes=[0], scene_ptr=np.array([0, nodes]),
                     pred=pos, vel=np.zeros_like(pos), truth=pos, baseline=pos, scalars=np.zeros((nodes, 1)),
                     moving=np.ones(nodes, bool), stopped="stopped after 0 of 5 steps: NaN")
    write_png(result, tmp_path / "rollout.png", "diverged at once")
    assert (tmp_path / "rollout.png").stat().st_size > 0


@pytest.mark.parametrize("unit", ["horizon", "store"])
def test_a_stored_velocity_run_learns_how_far_a_rollout_feeds_it_from_its_training_velocity(tmp_path, unit):
    """guards the small fluid's rollouts falling at 5-6 m/s^2 instead of 9.81 without a word: under a constant
    acceleration a the displacement over a task step of T = Δt·dt lags the stored (end-of-step) velocity by
    a·T/2; the rollout measures that gap on the true frames at the input of step 2, relative to the stored
    velocity, and the note names the fix. None where nothing is fed back or training fed displacements."""
    info = toy_store(tmp_path / "fall.zarr", fall=1.0)
    cfg = run_config(unit)
    result = rollout(ConstantVelocity(1.0), cfg, info, "test", 2)
    vel = np.asarray(open_zarr(info)["test"]["vel"][DELTA_T]).astype(np.float64)     # v(t1), t1 = 0 + Δt
    expected = (1.0 * DELTA_T * DT / 2) / np.sqrt(np.mean(np.sum(vel ** 2, axis=1)))
    assert result.velocity_gap == pytest.approx(expected, rel=1e-5)
    note = velocity_gap_note(result.velocity_gap, DELTA_T)
    assert f"{expected:.1%}" in note and "dataset.input_velocity=displacement" in note
    assert rollout(ConstantVelocity(1.0), cfg, info, "test", 1).velocity_gap is None
    shifted = OmegaConf.merge(cfg, {"dataset": {"input_velocity": "displacement"}})
    assert rollout(ConstantVelocity(1.0), shifted, info, "test", 2, start=DELTA_T).velocity_gap is None
    steady = rollout(ConstantVelocity(1.0), cfg, toy_store(tmp_path / "steady.zarr"), "test", 2)
    assert steady.velocity_gap < 1e-6 and velocity_gap_note(steady.velocity_gap, DELTA_T) is None
