"""partition(): properties of every strategy, its metrics, bad input, and the stored artifacts."""
import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from dist_egnn.datasets.graphs import radius_graph
from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.store import (
    atomic_store,
    create_split,
    open_store,
    preparation_lock,
    write_root_attrs,
    write_scenes,
)
from dist_egnn.partitioners import METHODS, partition, partition_metrics
from dist_egnn.partitioners.artifacts import (
    StalePartitionError,
    artifact_path,
    load_assignments,
    prepare_partitions,
    sample_seed,
)
from dist_egnn.partitioners.strategies import max_part_size, rebalance, undirected_adjacency

from runs import prepare_cli

ROOT = Path(__file__).resolve().parents[2]
CLOUD = np.random.default_rng(0).uniform(size=(1500, 3))
RADIUS = 0.14                                         # ~15 neighbours per node


# ------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("method", METHODS)
def test_assignment_is_a_balanced_cover_for_every_p_and_seed(method):
    edge_index = radius_graph(CLOUD, RADIUS)
    for parts in (1, 2, 3, 5, 8):
        for seed in (0, 1):
            result = partition(CLOUD, parts, method, radius=RADIUS, seed=seed)
            a = result.assignment
            assert a.shape == (len(CLOUD),) and np.issubdtype(a.dtype, np.integer)
            assert a.min() == 0 and a.max() == parts - 1
            sizes = np.bincount(a, minlength=parts)
            assert sizes.min() > 0                                       # no empty part
            bound = max_part_size(len(CLOUD), parts) if method == "metis" else -(-len(CLOUD) // parts)
            assert sizes.max() <= bound
            assert (result.num_parts, result.method, result.seed) == (parts, method, seed)
            assert np.array_equal(result.edge_index, edge_index)
            again = partition(CLOUD, parts, method, edge_index=edge_index, seed=seed)
            assert np.array_equal(again.assignment, a)                   # deterministic, graph reused


def test_seeds_change_random_and_metis_but_not_spatial():
    for method, changes in (("random", True), ("metis", True), ("spatial", False)):
        a, b = (partition(CLOUD, 4, method, radius=RADIUS, seed=s).assignment for s in (0, 1))
        assert (not np.array_equal(a, b)) == changes, method


def test_cut_fractions_order_metis_spatial_random():
    cut = {m: partition(CLOUD, 8, m, radius=RADIUS).metrics.cut_fraction for m in METHODS}
    assert abs(cut["random"] - (1 - 1 / 8)) < 0.02                      # random ≈ 1 − 1/P
    assert cut["metis"] < 0.35 and cut["spatial"] < 0.35 < cut["random"]


def test_spatial_p2_splits_along_the_widest_axis():
    pos = CLOUD * np.array([1.0, 3.0, 1.0])                              # y is the widest axis
    a = partition(pos, 2, "spatial", radius=RADIUS).assignment
    assert pos[a == 0, 1].max() <= pos[a == 1, 1].min()


def test_disconnected_clusters_go_to_their_own_parts():
    pos = np.concatenate([CLOUD[:300] * 0.5, CLOUD[300:600] * 0.5 + 10.0])
    result = partition(pos, 2, "metis", radius=0.1)
    assert result.metrics.cut_edges == 0 and np.bincount(result.assignment).tolist() == [300, 300]


def test_rebalance_enforces_the_bound_on_a_lopsided_assignment():
    edge_index = radius_graph(CLOUD, RADIUS)
    lopsided = np.zeros(len(CLOUD), dtype=np.int64)
    lopsided[:3] = [1, 2, 3]
    cap = max_part_size(len(CLOUD), 4)
    fixed = rebalance(undirected_adjacency(edge_index, len(CLOUD)), lopsided.copy(), 4, cap)
    assert np.bincount(fixed, minlength=4).max() <= cap and np.all(fixed[:3] == [1, 2, 3])


def test_metis_on_a_complete_graph_respects_the_balance_bound():
    pos = np.random.default_rng(2).normal(size=(100, 3))                 # N-body: complete graph
    for parts in (2, 4, 8):
        result = partition(pos, parts, "metis")
        assert result.metrics.num_edges == 100 * 99
        assert np.bincount(result.assignment).max() <= max_part_size(100, parts)


def test_metrics_match_their_definitions_by_brute_force():
    pos = CLOUD[:200]
    edge_index = radius_graph(pos, 0.25, max_neighbors=6)               # one-directional edges too
    a = partition(pos, 3, "random", edge_index=edge_index, seed=3).assignment
    m = partition_metrics(edge_index, a, 3)
    cut = [(r, s) for r, s in edge_index.T if a[r] != a[s]]
    assert m.cut_edges == len(cut) and m.cut_fraction == len(cut) / edge_index.shape[1]
    assert m.boundary_nodes == len({n for edge in cut for n in edge})
    halos = [len({s for r, s in cut if a[r] == p}) for p in range(3)]
    assert m.halo_sizes.tolist() == halos
    assert m.max_halo_fraction == max(h / np.sum(a == p) for p, h in enumerate(halos))
    assert m.imbalance == np.bincount(a).max() / (200 / 3)
    assert partition_metrics(np.zeros((2, 0), np.int64), a, 3).cut_fraction == 0.0


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pos, parts, kwargs, message", [
    (CLOUD[:10], 0, {}, r"num_parts=0: need an integer >= 1"),
    (CLOUD[:10], 11, {}, r"more than the 10 nodes.*at most 10 parts"),
    (CLOUD[:10], 2.0, {}, r"need an integer"),
    (CLOUD[:10], 2, {"method": "kmeans"}, r"unknown partition method 'kmeans'"),
    (CLOUD[:10, :2], 2, {}, r"\(N, 3\) array, got shape \(10, 2\)"),
    (np.zeros((0, 3)), 1, {}, r"empty \(0 nodes\)"),
    (np.where(np.arange(10)[:, None] == 4, np.nan, CLOUD[:10]), 2, {}, r"NaN or Inf at 1 of 10 nodes \(first: node 4"),
    (np.concatenate([CLOUD[:5], CLOUD[2:3]]), 2, {}, r"nodes 2 and 5 are both at .*allow_duplicates=True"),
    (CLOUD[:10], 2, {"radius": 0.0}, r"radius=0.0: need a positive cutoff"),
    (CLOUD[:10], 2, {"seed": -1}, r"seed=-1: need a non-negative integer"),
    (CLOUD[:10], 2, {"edge_index": np.array([[0, 10], [1, 0]])}, r"outside 0..9"),
    (CLOUD[:10], 2, {"edge_index": np.zeros((3, 2), int)}, r"\(2, E\) integer array"),
    (CLOUD[:10], 2, {"radius": 1e-6}, r"METIS cannot partition a graph without edges.*method='spatial'"),
    (np.random.default_rng(0).normal(size=(5000, 3)), 2, {}, r"complete graph.*give a radius"),
])
def test_bad_input_is_refused_with_a_clear_message(pos, parts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        partition(pos, parts, **kwargs)


def test_metis_empty_part_is_an_error_naming_the_way_out():
    path = np.array([list(range(9)) + list(range(1, 10)), list(range(1, 10)) + list(range(9))])
    with pytest.raises(ValueError, match=r"METIS returned \d+ empty parts of 9.*method='spatial' or 'random'"):
        partition(CLOUD[:10], 9, "metis", edge_index=path)
    assert np.bincount(partition(CLOUD[:10], 9, "spatial", edge_index=path).assignment).min() == 1


def test_duplicates_are_accepted_when_asked_for():
    pos = np.concatenate([CLOUD[:50], CLOUD[:50]])
    for method in METHODS:
        assert np.bincount(partition(pos, 4, method, radius=0.3, allow_duplicates=True).assignment).min() > 0


# -------------------------------------------------------------------------------------------- artifacts
SCENES = {"train": [40, 60, 50], "val": [30, 45], "test": [35]}       # scenes of different sizes
FRAMES = 5


def write_store(path, seed=0):
    rng = np.random.default_rng(seed)
    with atomic_store(path, overwrite=True) as root:
        write_root_attrs(root, dataset="toy", source="test", dt=0.1, units={"length": "m", "time": "s"},
                         radius=0.35, node_scalars=["charge"], generator={"seed": 0})
        for split, sizes in SCENES.items():
            group = create_split(root, split, sizes, FRAMES, 1, chunk_nodes=64)
            for scene, n in enumerate(sizes):
                pos = np.cumsum(rng.normal(scale=0.05, size=(1, FRAMES, n, 3)), axis=1) + rng.uniform(size=(1, 1, n, 3))
                write_scenes(group, scene, pos.astype(np.float32), np.zeros_like(pos, np.float32), np.ones((1, n, 1)))
    return path


def datasets_of(store, **kwargs):
    info = open_store(store)
    options = dict(delta_t=1, frame_start=1, frame_stride=2, node_features=[], edge_features=[], **kwargs)
    return {split: TrajectoryDataset(info, split, **options) for split in SCENES}


@pytest.fixture()
def store(tmp_path):
    return write_store(tmp_path / "toy.zarr")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A store and its metis P=3 seed-7 artifact, shared by the tests that only read them."""
    store = write_store(tmp_path_factory.mktemp("built") / "toy.zarr")
    return store, prepare_partitions(datasets_of(store), "metis", 3, seed=7, progress=False)


def test_artifact_holds_every_sample_as_partition_computes_it(built):
    store, path = built
    splits = datasets_of(store)
    assert path == store.parent / "toy.partitions" / "metis-p3-s7.zarr" == artifact_path(store, "metis", 3, 7)
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["num_parts"] == 3 and root.attrs["radius"] == 0.35
    assert "cut_fraction_mean" in root.attrs["metrics"]["train"]
    for split, data in splits.items():
        stored = load_assignments(path, split)
        assert len(stored) == len(data) and stored.frames.tolist() == [1, 3]
        metrics = stored.metrics()
        for i in range(len(data)):
            scene, frame = data.locate(i)
            assert stored.locate(i) == (scene, frame)
            nodes = data.meta.scene_nodes(scene)
            pos = np.asarray(zarr.open_group(str(store))[split]["pos"][frame, nodes])
            expected = partition(pos, 3, "metis", radius=0.35, seed=sample_seed(7, split, scene, frame))
            assert np.array_equal(stored[i], expected.assignment)
            row = frame // 2
            assert metrics["cut_fraction"][row, scene] == np.float32(expected.metrics.cut_fraction)
            assert metrics["halo_size"][row, scene].tolist() == expected.metrics.halo_sizes.tolist()


def test_artifact_is_reused_rebuilt_when_stale_or_refused(store, capsys):
    prepare_partitions(datasets_of(store), "spatial", 2, progress=False)
    path = artifact_path(store, "spatial", 2, 0)
    stamp = (path / "zarr.json").stat().st_mtime_ns
    prepare_partitions(datasets_of(store), "spatial", 2, progress=False)
    assert "up to date, reused" in capsys.readouterr().out and (path / "zarr.json").stat().st_mtime_ns == stamp

    with pytest.raises(StalePartitionError, match=r"radius 0.35 -> 0.3.*launch/prepare.py"):
        prepare_partitions(datasets_of(store, radius=0.3), "spatial", 2, rebuild=False, progress=False)
    prepare_partitions(datasets_of(store, radius=0.3), "spatial", 2, progress=False)
    assert "stale, built from other inputs (radius 0.35 -> 0.3); building it" in capsys.readouterr().out

    write_store(store, seed=1)                                          # same attributes, other data
    prepare_partitions(datasets_of(store, radius=0.3), "spatial", 2, progress=False)
    assert "store_splits.train" in capsys.readouterr().out


def test_an_artifact_rebuilt_under_a_reader_is_refused_not_read(store):
    """A run reads its assignments lazily, a sample at a time; a second run with another radius on the same store
    and P rebuilds the artifact at the same path. The first run's next read stops instead of taking the other
    graph's parts (drop mode would silently drop other edges)."""
    path = prepare_partitions(datasets_of(store), "random", 2, progress=False)
    reader = load_assignments(path, "train")
    first = reader[0]
    prepare_partitions(datasets_of(store, radius=0.3), "random", 2, seed=0, progress=False)
    with pytest.raises(StalePartitionError, match=r"was replaced while this run read it.*paths.data"):
        reader[0]
    assert np.array_equal(load_assignments(path, "train")[0].shape, first.shape)


def test_two_builders_of_one_stale_artifact_build_it_once(store, capsys):
    # two runs of a study (jobs=2) with the same partitioning that both found it missing: the second waits for the
    # first's build and reuses it. The test holds the lock until both wait, so they surely overlap.
    path = artifact_path(store, "spatial", 2, 0)
    seen = ""
    with preparation_lock(path):
        workers = [threading.Thread(target=prepare_partitions, args=(datasets_of(store), "spatial", 2),
                                    kwargs=dict(progress=False, scheduler="sync")) for _ in range(2)]
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while seen.count("is preparing it; waiting") < 2:
            assert time.monotonic() < deadline, seen
            time.sleep(0.05)
            seen += capsys.readouterr().err
    for worker in workers:
        worker.join(timeout=60)
    out = capsys.readouterr().out
    assert out.count("building it") == 1 and out.count("built by another process meanwhile; reused") == 1, out
    assert [p.name for p in path.parent.iterdir()] == [path.name]       # no lock file or temporary left


def test_failed_build_keeps_the_previous_artifact(store):
    prepare_partitions(datasets_of(store), "random", 2, progress=False)
    path = artifact_path(store, "random", 2, 0)
    before = json.loads((path / "zarr.json").read_text())
    zarr.open_group(str(store))["val"]["pos"][3, 40, 0] = np.nan          # val scene 1 at frame 3
    with pytest.raises(ValueError, match=r"val: scene 1 at frame 3: positions hold NaN"):
        prepare_partitions(datasets_of(store), "random", 2, progress=False)
    assert json.loads((path / "zarr.json").read_text()) == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]       # no temporary left behind


def test_process_scheduler_writes_the_same_artifact(store):
    a = prepare_partitions(datasets_of(store), "metis", 2, progress=False, scheduler="threads")
    copy = a.with_name("threads.zarr")
    shutil.move(a, copy)
    b = prepare_partitions(datasets_of(store), "metis", 2, progress=False, scheduler="processes", workers=2)
    for split in SCENES:
        first, second = (zarr.open_group(str(p))[split] for p in (copy, b))
        assert np.array_equal(first["assignment"][...], second["assignment"][...])


def test_reading_errors_say_how_to_fix_them(built):
    store, path = built
    with pytest.raises(StalePartitionError, match="no stored partition.*launch/prepare.py"):
        load_assignments(artifact_path(store, "metis", 2, 0), "train")
    with pytest.raises(StalePartitionError, match="built from other inputs"):
        load_assignments(path, "train", expected_hash="0" * 64)
    with pytest.raises(StalePartitionError, match=r"no stored sample \(scene 0, frame 2\)"):
        load_assignments(path, "train").of(0, 2)
    with pytest.raises(ValueError, match=r"smallest scene has 30 nodes"):
        prepare_partitions(datasets_of(store), "random", 31, progress=False)


def test_prepare_command_builds_the_partitions(store, capsys):
    """`python launch/prepare.py ... distributed.parts=2` (in process, through Hydra's compose)."""
    from hydra import compose, initialize_config_dir

    cli = prepare_cli()
    shutil.move(store, store.with_name("nbody_small.zarr"))
    # dataset.source=test: the toy store's own source (a store made by another generator is refused, issue 18)
    overrides = [f"paths.data={store.parent}", "dataset.source=test", "dataset.frame_start=0", "dataset.delta_t=1",
                 "trainer.progress=false", "distributed.parts=2", "distributed.partition=spatial"]
    with initialize_config_dir(config_dir=str(ROOT / "launch" / "conf"), version_base="1.3"):
        cli.prepare(compose(config_name="prepare", overrides=overrides))
        assert "building it" in capsys.readouterr().out
        cli.prepare(compose(config_name="prepare", overrides=overrides))
        assert "up to date, reused" in capsys.readouterr().out
        cli.prepare(compose(config_name="prepare", overrides=overrides[:-2]))   # parts=1: nothing to partition
    assert (store.parent / "nbody_small.partitions" / "spatial-p2-s0.zarr").exists()
    assert len(list((store.parent / "nbody_small.partitions").iterdir())) == 1
