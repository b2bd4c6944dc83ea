"""Walls (node scalar type 1): they send messages but are never moved, never in the loss or the metrics, no
edge joins two of them (graphs, halos and stored partitions alike), and P ranks in exact halo mode still
equal one process when walls are halo nodes (issue 17 item 1).

The store here is made by hand (no simulator): a few fluid particles falling inside a unit box, surrounded
by one layer of wall particles (``datasets.sph.box_walls``), as an SPH store of schema 2 holds them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zarr
from omegaconf import OmegaConf

from dist_egnn.datasets.graphs import radius_graph
from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.sph import box_walls
from dist_egnn.datasets.store import WALL, atomic_store, create_split, open_store, write_root_attrs, write_scenes
from dist_egnn.losses import mmd_loss, objective
from dist_egnn.models import Prediction
from dist_egnn.parallel.seam import SingleProcess
from dist_egnn.partitioners.artifacts import StalePartitionError, load_assignments, partition_status, prepare_partitions
from dist_egnn.partitioners.subgraphs import halo_mask, part_nodes
from dist_egnn.training.normalization import NONE
from dist_egnn.training.rank_data import RankData
from dist_egnn.training.trainer import Trainer, forward_loss

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FLUID, FRAMES, RADIUS = 40, 6, 0.35
SCENES = {"train": 4, "val": 2, "test": 2}


def wall_store(path: Path, seed: int = 0, wall_type: float = WALL) -> Path:
    """Fluid rows first, then 152 static walls (type 1) on the faces of a 1 x 1 x 1 box, every 0.2 (with
    ``wall_type=0`` static particles of type 0: a store with `type` and no walls)."""
    walls = box_walls([1.0, 1.0, 1.0], 0.1, 1)
    rng = np.random.default_rng(seed)
    n = FLUID + len(walls)
    t = np.arange(FRAMES)[:, None, None] * 0.05
    with atomic_store(path) as root:
        write_root_attrs(root, dataset="walls", source="sph", dt=0.05, units={"length": "m", "time": "s"},
                         radius=RADIUS, node_scalars=["type"], generator={})
        for split, scenes in SCENES.items():
            group = create_split(root, split, [n] * scenes, FRAMES, num_scalars=1)
            pos = np.empty((scenes, FRAMES, n, 3), np.float32)
            vel = np.zeros_like(pos)
            for s in range(scenes):
                start = rng.uniform([-0.4, 0.3, -0.4], [0.4, 0.9, 0.4], size=(FLUID, 3))
                v0 = rng.normal(0, 0.5, size=(FLUID, 3))
                gravity = np.array([0.0, -9.81, 0.0])
                pos[s, :, :FLUID] = start + v0 * t + 0.5 * gravity * t**2
                vel[s, :, :FLUID] = v0 + gravity * t
                pos[s, :, FLUID:] = walls
            scalars = np.zeros((scenes, n, 1), np.float32)
            scalars[:, FLUID:] = wall_type
            write_scenes(group, 0, pos, vel, scalars)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return wall_store(tmp_path_factory.mktemp("walls") / "data" / "walls.zarr")


def dataset(store: Path, split: str = "train", edge_features=("distance",), **kw) -> TrajectoryDataset:
    return TrajectoryDataset(open_store(store), split, delta_t=2, node_features=["speed", "type"],
                             edge_features=list(edge_features), **kw)


def test_loader_marks_the_walls_and_counts_the_moving_nodes(store):
    data = dataset(store)
    sample = data.read([0])[0]
    assert sample.moving.sum() == FLUID and not sample.moving[FLUID:].any()
    np.testing.assert_array_equal(sample.node_features[:, 1], ~sample.moving)       # type as a feature
    assert sample.target[FLUID:].tolist() == sample.pos[FLUID:].tolist()          # walls do not move
    walls_receive = np.isin(sample.edge_index[0], np.arange(FLUID, len(sample.pos)))
    fluid_from_walls = (sample.edge_index[0] < FLUID) & (sample.edge_index[1] >= FLUID)
    assert walls_receive.any() and fluid_from_walls.any()                         # walls are in the graph
    batch = RankData(data).build([0, 5])
    assert batch.graph.moving.sum() == 2 * FLUID and batch.total_moving == 2 * FLUID
    assert batch.total_nodes == 2 * len(sample.pos)


def rows_by_place(graph) -> dict[tuple, int]:
    """Batch row of every (graph, position) of a batch: the same node in two batches of the same samples."""
    return {(int(b), *p): r for r, (b, p) in enumerate(zip(graph.batch.tolist(), graph.pos.tolist()))}


def test_unwired_walls_leave_the_graph_and_nothing_the_fluid_hears_changes(store):
    """dataset.unwired_walls=drop: each graph keeps its fluid and the walls its edges touch, with the same edges
    and the MMD keys of the same nodes; a FastEGNN whose virtual nodes talk to the fluid alone
    (virtual_walls=False) then predicts the fluid as with every wall, in float64; with walls in the virtual
    exchange its means count fewer walls and the fluid moves differently. guards: a wired wall dropped, edges
    moved onto the wrong rows, keys of other nodes."""
    from dist_egnn.models import FastEGNN

    every = RankData(dataset(store)).build([0, 5], seed=1, epoch=2)
    wired = RankData(dataset(store, unwired_walls="drop")).build([0, 5], seed=1, epoch=2)
    g, h = every.graph, wired.graph
    assert h.moving.sum() == g.moving.sum() == 2 * FLUID and wired.total_moving == every.total_moving
    assert 0 < int((~h.moving).sum()) < int((~g.moving).sum())                   # some walls go, some stay
    row = rows_by_place(g)
    at = np.array([row[key] for key in rows_by_place(h)])                          # h's rows in g
    moved_back = at[h.edge_index.numpy()]
    assert sorted(map(tuple, moved_back.T.tolist())) == sorted(map(tuple, g.edge_index.T.tolist()))
    touched = np.zeros(len(g.pos), bool)
    touched[g.edge_index.numpy().reshape(-1)] = True
    np.testing.assert_array_equal(np.sort(at), np.flatnonzero(touched | g.moving.numpy()))
    np.testing.assert_array_equal(wired.mmd_keys, every.mmd_keys[at])
    for virtual_walls, same in ((False, True), (True, False)):
        torch.manual_seed(0)
        model = FastEGNN(node_features=2, edge_features=1, hidden=16, layers=2, virtual_channels=2,
                         virtual_walls=virtual_walls).double()
        with torch.no_grad():
            full = model(**g.to("cpu", torch.float64).model_inputs()).pos[at][h.moving]
            pruned = model(**h.to("cpu", torch.float64).model_inputs()).pos[h.moving]
        gap = (full - pruned).abs().max().item()
        assert gap < 1e-12 if same else gap > 1e-9, (virtual_walls, gap)


def test_no_edge_joins_two_walls_in_any_graph_a_rank_builds(store):
    """The loader's graph, one rank's part and halo, and the stored partition's halo masks all come from the
    graph without wall -> wall edges: no such edge, and no wall in a halo that only walls across the cut see."""
    data = dataset(store)
    for sample in data.read(range(len(data))):
        walls = ~sample.moving
        recv, send = sample.edge_index
        assert not (walls[recv] & walls[send]).any()
        assert (walls[recv] & ~walls[send]).any() and (~walls[recv] & walls[send]).any()
    splits = {split: dataset(store, split) for split in SCENES}
    path = prepare_partitions(splits, "metis", 2, progress=False, scheduler="threads")
    assert zarr.open_group(str(path), mode="r").attrs["inputs"]["graph"] == "no wall-wall edges"
    stored = load_assignments(path, "train")
    wall_halo = False
    for i in range(len(data)):
        scene, frame = data.locate(i)
        sample = data.read([i])[0]
        walls, parts = ~sample.moving, stored.of(scene, frame)
        trained = radius_graph(sample.pos, RADIUS, walls=walls)
        assert np.array_equal(stored.halo_mask_of(scene, frame), halo_mask(trained, parts, 2))
        plain = halo_mask(radius_graph(sample.pos, RADIUS), parts, 2)
        wall_halo |= bool((plain != stored.halo_mask_of(scene, frame)).any())
        for part in range(2):
            rank = RankData(data, part, 2, halo=True, assignments=stored).build([i])
            ids = rank_ids(stored, part, scene, frame)
            got = {(ids[r], ids[q]) for r, q in rank.graph.edge_index.T.tolist()}
            want = {(r, q) for r, q in trained.T.tolist() if parts[r] == part}
            assert got == want                                    # exactly the whole graph's edges at its receivers
    assert wall_halo                                              # the cut runs through the walls: rows saved
    work = stored.metrics()["work_imbalance"]                     # per sample, beside the node imbalance
    assert work.shape == stored.metrics()["imbalance"].shape and np.all(work >= 1.0) and np.all(work < 1.5)
    summary = zarr.open_group(str(path), mode="r").attrs["metrics"]["train"]
    assert summary["work_imbalance_max"] == pytest.approx(float(work.max()))


def rank_ids(stored, part: int, scene: int, frame: int) -> np.ndarray:
    """Global ids of a rank's local rows (owned, then halo) for one sample."""
    return part_nodes(stored.of(scene, frame), stored.halo_mask_of(scene, frame), part, 2).local_to_global


def test_partitions_built_before_the_wall_rule_are_stale(tmp_path, monkeypatch, capsys):
    """An artifact whose inputs lack the rule (built with wall -> wall edges) is refused with the command that
    rebuilds it, or rebuilt (stores without walls have no ``graph`` input: their artifacts stay valid)."""
    from dist_egnn.partitioners import artifacts

    store = wall_store(tmp_path / "data" / "walls.zarr")
    splits = {split: dataset(store, split) for split in SCENES}
    monkeypatch.setattr(artifacts, "_has_walls", lambda splits: False)      # as built before the rule
    path = prepare_partitions(splits, "random", 2, progress=False)
    monkeypatch.undo()
    assert "graph" not in zarr.open_group(str(path), mode="r").attrs["inputs"]
    _, _, stale = partition_status(splits, "random", 2)
    assert stale is not None and 'graph null -> "no wall-wall edges"' in stale
    with pytest.raises(StalePartitionError, match=r"graph null.*launch/prepare.py distributed.parts=2"):
        prepare_partitions(splits, "random", 2, rebuild=False, progress=False)
    prepare_partitions(splits, "random", 2, progress=False)
    assert "building it" in capsys.readouterr().out and partition_status(splits, "random", 2)[2] is None


def shifting_model(shift: float):
    """A stand-in model: every node moved by ``shift`` along x, virtual nodes at the graph's first node."""
    def model(node_features, pos, vel, edge_index, edge_attr, batch, num_graphs, **_):
        virtual = pos[:num_graphs].unsqueeze(-1).expand(-1, -1, 2) * 1.0
        return Prediction(pos + torch.tensor([shift, 0.0, 0.0], dtype=pos.dtype), virtual)
    return model


def loss_cfg(mmd_samples=None, weight=0.1):
    return OmegaConf.create(dict(loss=dict(mmd_weight=weight, mmd_sigma=1.0, mmd_kernel="gaussian",
                                           mmd_target="truth", mmd_samples=mmd_samples),
                                 model=dict(virtual_channels=2), trainer=dict(precision="fp32")))


def test_loss_leaves_walls_out_of_the_mse_and_the_mmd(store):
    batch = RankData(dataset(store)).build([0, 5])
    engine = SimpleNamespace(model=shifting_model(0.1))
    terms = forward_loss(engine, SingleProcess(), batch, loss_cfg(), torch.device("cpu"), torch.float64, 1)
    g = batch.graph
    fluid = g.moving.numpy()
    pred = g.pos.double().numpy() + [0.1, 0, 0]
    expected = np.square(pred[fluid] - g.target.double().numpy()[fluid]).mean()
    assert terms.mse.item() == pytest.approx(expected, rel=1e-9)                  # fluid rows, fluid count
    virtual = g.pos.double()[:2].unsqueeze(-1).expand(-1, -1, 2)                  # what the stand-in gives
    rows = torch.as_tensor(fluid)
    want = mmd_loss(virtual, g.target.double()[rows], g.batch[rows], 2, 1.0)      # the fluid's targets only
    assert terms.mmd.item() == pytest.approx(want.item(), rel=1e-9)
    # the sampled MMD (mmd_samples) draws among the fluid as well: a sample of every node equals all of it
    sampled = forward_loss(engine, SingleProcess(), batch, loss_cfg(mmd_samples=FLUID), torch.device("cpu"),
                           torch.float64, 1)
    assert sampled.mmd.item() == pytest.approx(want.item(), rel=1e-9)


def test_objective_without_a_mask_scores_every_node():
    pred, target = torch.zeros(4, 3), torch.ones(4, 3)
    moving = torch.tensor([True, True, False, False])
    target[2:] = 0.0
    kw = dict(virtual_pos=None, batch=torch.zeros(4, dtype=torch.long), num_graphs=1, mmd_weight=0.0, mmd_sigma=1.0)
    assert objective(pred, target, **kw).mse.item() == pytest.approx(0.5)
    assert objective(pred, target, moving=moving, **kw).mse.item() == pytest.approx(1.0)


def test_walls_are_held_and_left_out_of_evaluation(store):
    """Trainer.evaluate: walls at their input positions whatever the model says, MSE over fluid nodes only."""
    data = RankData(dataset(store, split="test"))
    trainer = SimpleNamespace(
        engine=SimpleNamespace(model=shifting_model(0.2), eval=lambda: None), data={"test": data},
        groups=SimpleNamespace(data_index=0, data_parallel=1), comm=SingleProcess(), device=torch.device("cpu"),
        dtype=torch.float64, collective_device=torch.device("cpu"), normalization=NONE,
        cfg=OmegaConf.create(dict(trainer=dict(eval_batch_size=3, precision="fp32"), dataset=dict(prefetch=0))))
    trainer.predict = partial(Trainer.predict, trainer)
    got = Trainer.evaluate(trainer, "test")
    squared = count = 0.0
    for s in data.dataset.read(range(len(data))):
        error = (s.pos + [0.2, 0, 0] - s.target)[s.moving]
        squared, count = squared + np.square(error.astype(np.float64)).sum(), count + error.size
    assert got == pytest.approx(squared / count, rel=1e-6)


# ------------------------------------------------------------------------------------ P = 2 exact == one process
COMMON = ["dataset=fluid_small", "dataset.name=walls", "dataset.radius=0.35", "dataset.delta_t=2",
          "dataset.mmd_samples=5", "model.hidden=16", "model.layers=2", "model.cutoff_rate=0.25",
          "dataset.frame_stop=2", "trainer.batch_size=2", "trainer.max_epochs=1", "trainer.progress=false",
          "trainer.dtype=float64", "trainer.num_threads=1"]       # one thread in the one-process run too
COMPARED = ("train_loss", "train_mse", "val_mse", "test_mse")


def launch(launcher: list[str], root: Path, run: str, *overrides: str):
    cmd = [*launcher, str(ROOT / "launch" / "train.py"), f"paths.data={root / 'data'}",
           f"hydra.run.dir={root / run}", *COMMON, *overrides]
    if not launcher:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=400, env=env)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("overlap", [False, True])
def test_two_ranks_in_exact_halo_mode_equal_one_process_with_walls(store, overlap):
    """Walls are halo nodes of both parts (the METIS cut runs through them); loss shares, MSE denominators
    (fluid nodes of the whole graph), the MMD's fluid sample, FastEGNN's centroid of the fluid (moving counts
    summed over the parts; with overlap, its all-reduce started early) and the global edge dropping (lattice
    walls: many exact ties) must all agree with one process, in float64."""
    root = store.parent.parent
    if not (root / "one" / "metrics.jsonl").exists():
        one = launch([], root, "one")
        assert one.returncode == 0, one.stderr[-3000:]
    run = f"two-overlap-{overlap}"
    two = launch([str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2"], root, run,
                 "distributed.parts=2", "distributed.halo=exact", "engine=ddp", f"distributed.overlap={overlap}")
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = records(root / run), records(root / "one")
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        for key in COMPARED:
            if key in w:
                assert abs(g[key] - w[key]) <= 1e-9 * abs(w[key]), f"{key}: {g[key]} != {w[key]}"
    assert got[0]["parts"] == 2 and np.isfinite(want[-1]["test_mse"])


def test_a_run_without_unwired_walls_trains_as_one_with_them(store, tmp_path):
    """dataset.unwired_walls=drop end to end (loader, edge dropping, MMD sample, trainer, evaluation): with the
    virtual nodes talking to the fluid alone, every loss and MSE equals the run keeping every wall, in float64,
    over fewer node rows and the same edges."""
    import dist_egnn

    runs = {}
    for mode in ("keep", "drop"):
        cfg = dist_egnn.compose_config(f"paths.data={store.parent}", *COMMON, "model.virtual_walls=false",
                                       f"dataset.unwired_walls={mode}")
        Trainer.from_config(cfg, tmp_path / mode).fit()
        runs[mode] = records(tmp_path / mode)
    assert len(runs["drop"]) == len(runs["keep"]) == 2 and "test_mse" in runs["drop"][-1]
    for got, want in zip(runs["drop"], runs["keep"]):
        for key in COMPARED:
            if key in want:
                assert abs(got[key] - want[key]) <= 1e-9 * abs(want[key]), f"{key}: {got[key]} != {want[key]}"
        assert got["edges_per_rank"] == want["edges_per_rank"] and got["nodes_per_rank"] < want["nodes_per_rank"]


def test_validation_rollout_records_the_share_outside_the_walls(store, tmp_path):
    """trainer.val_rollout_steps on a store with walls: every evaluation records the share of the fluid outside the
    walls' box at the rollout's last step, and it is the share launch/predict.py's rollout of best.pt gives."""
    import dist_egnn
    from dist_egnn.inference.rollout import rollout

    root = store.parent.parent
    cfg = dist_egnn.compose_config(f"paths.data={root / 'data'}", *COMMON, "trainer.max_epochs=2",
                                   "trainer.val_rollout_steps=2", "trainer.select_on=val_rollout_mse")
    Trainer.from_config(cfg, tmp_path / "run").fit()
    evaluations = records(tmp_path / "run")[:-1]
    assert len(evaluations) == 2
    assert all(r["val_rollout_steps"] == 2 and 0.0 <= r["val_rollout_outside"] <= 1.0 for r in evaluations)
    model = dist_egnn.load_model(tmp_path / "run")
    again = rollout(model, model.config, open_store(store), "val", 2, dtype=torch.float64)
    best = next(r for r in evaluations if r["epoch"] == model.checkpoint["epoch"])
    assert again.outside_share[-1] == pytest.approx(best["val_rollout_outside"], abs=1e-12)
    assert float(np.mean(again.mse)) == pytest.approx(best["val_rollout_mse"], rel=1e-6)
