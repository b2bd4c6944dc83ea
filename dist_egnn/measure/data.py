"""Measurements of the data path: ``python -m dist_egnn.measure.data [--parts ...] [--out results.json]``.

What it measures (the numbers are in datasets/README.md):

memory   Loader peak memory for a store of 100 vs 10,000 samples of one 113K-node trajectory (frame t ->
         t + 20, radius 0.075), each run in a fresh subprocess that opens the store, builds the dataset and
         reads ``--samples`` samples (radius graph and features included) in the seeded training order,
         through the prefetch thread. Reported: peak RSS (``ru_maxrss``) and its growth over the RSS before the
         first read. The 10,000-sample store has its full length on disk (10,020 frames, every chunk present)
         but only the frames the run reads hold synthetic particle data; the others are zeros, which compress
         to a few bytes a chunk (writing 27 GB of floats here would prove nothing more: the loader cannot
         tell, and it never reads them).
read     Time to read one 113K-node sample: the zarr/dask read of its slices, and the radius graph + features.
step     Time of one FastEGNN training step (H 64, 4 layers, C 3, forward + backward + Adam) on one such
         sample on this machine's CPU, with edge chunking (``model.edge_chunk_size``) to bound memory; and on
         a 1/8 part of it (14K nodes, what one of 8 DistEGNN ranks holds).
sph      SPlisHSPlasH time per simulated frame (50 fps) at ~10K and ~113K particles in the 5 x 10 x 5 box,
         after the walls' volume map is built (reported apart), with every core.
sizes    Bytes on disk per stored frame (positions + velocities) of the 113K-node store, and of the stores
         under ``--data`` when they exist (``du``).
walls    (only when asked: ``--parts walls --stores A.zarr,B.zarr``) per SPH store: nodes and edges per training
         graph by kind (wall <- wall, fluid <- wall, wall <- fluid) at ``dataset.frame_stride=20``, Δt = 20,
         radius 0.075, CPU seconds to read and build a graph, and CPU seconds of a FastEGNN step (H 64, 4 layers,
         C 3, one graph, forward + backward + Adam, 1 thread, mean of 8 after a warm-up): the wall cost table.

Synthetic particles: a jittered lattice of spacing 0.05 (the SPH particle spacing), so a radius of 0.075
gives a fluid-like ~18 neighbours per node.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NODES = 113_000
DELTA_T = 20
RADIUS = 0.075
SPACING = 0.05
PARTS = ("memory", "read", "step", "sph", "sizes")      # the default; "walls" runs only when asked
PREFETCH = 2                 # batches read ahead in the memory runs (the trainer's default)


# ------------------------------------------------------------------------------------------ synthetic data
def lattice(nodes: int) -> np.ndarray:
    """A jittered cubic lattice of ``nodes`` points, spacing 0.05 (float32)."""
    side = int(np.ceil(nodes ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)[:nodes]
    jitter = np.random.default_rng(0).uniform(-0.1, 0.1, size=grid.shape)
    return ((grid + jitter) * SPACING).astype(np.float32)


def frame(base: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities of synthetic frame t (each frame computable on its own)."""
    rng = np.random.default_rng([1, t])
    vel = rng.normal(0.0, 0.1, size=base.shape).astype(np.float32)
    pos = base + np.float32(0.002 * t) + rng.normal(0.0, 0.002, size=base.shape).astype(np.float32)
    return pos, vel


def sample_frames(samples: int, reads: int, seed: int = 0) -> set[int]:
    """The frames (t and t + Δt) that the first ``reads`` samples of epoch 0's order touch, plus those the
    prefetch thread reads ahead (a zero frame would make a degenerate complete graph)."""
    order = np.random.default_rng([seed, 0]).permutation(samples)[:reads + PREFETCH + 1]
    return {int(t) for i in order for t in (i, i + DELTA_T)}


def make_store(path: Path, samples: int, nodes: int, real_frames: set[int] | None) -> Path:
    """A one-scene store of ``samples + Δt`` frames; frames outside ``real_frames`` are zeros (None: none)."""
    from dist_egnn.datasets.store import atomic_store, create_split, write_root_attrs

    frames = samples + DELTA_T
    base = lattice(nodes)
    with atomic_store(path, overwrite=True) as root:
        write_root_attrs(root, dataset=path.stem, source="synthetic", dt=0.02, units={"length": "m", "time": "s"},
                         radius=RADIUS, node_scalars=["type"], generator=dict(measure=True, samples=samples))
        for split in ("train", "val", "test"):
            group = create_split(root, split, [nodes], frames if split == "train" else DELTA_T + 1, 1)
            group["node_scalars"][:] = 0.0
            count = group["pos"].shape[0]
            block = 50
            zeros = np.zeros((block, nodes, 3), np.float32)
            for first in range(0, count, block):
                last = min(first + block, count)
                pos, vel = zeros[: last - first].copy(), zeros[: last - first].copy()
                for t in range(first, last):
                    if real_frames is None or (split == "train" and t in real_frames) or split != "train":
                        pos[t - first], vel[t - first] = frame(base, t)
                group["pos"][first:last] = pos
                group["vel"][first:last] = vel
    return path


# ---------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_child(store: str, reads: int) -> dict:
    """In a fresh process: open, build the dataset, read ``reads`` samples through prefetch; report memory."""
    from dist_egnn.datasets.loader import TrajectoryDataset
    from dist_egnn.datasets.prefetch import prefetch
    from dist_egnn.datasets.store import open_store

    info = open_store(store)
    data = TrajectoryDataset(info, "train", delta_t=DELTA_T, node_features=["speed", "type"],
                             edge_features=["distance", "distance"])
    before = _rss_bytes()
    edges = 0
    started = time.perf_counter()
    for k, batch in enumerate(prefetch(data.batches(1, shuffle=True, seed=0, epoch=0), depth=PREFETCH)):
        edges += batch.edge_index.shape[1]
        if k + 1 == reads:
            break
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(samples=len(data), reads=reads, rss_before_read_mb=before / 2**20, peak_rss_mb=peak / 2**20,
                growth_mb=(peak - before) / 2**20, mean_edges=edges / reads, seconds_per_sample=elapsed / reads)


def measure_memory(tmp: Path, nodes: int, reads: int, lengths=(100, 10_000)) -> dict:
    out = {}
    for samples in lengths:
        path = tmp / f"mem-{samples}.zarr"
        started = time.perf_counter()
        make_store(path, samples, nodes, sample_frames(samples, reads))
        made = time.perf_counter() - started
        proc = subprocess.run([sys.executable, "-m", "dist_egnn.measure.data", "_memory", str(path), str(reads)],
                              capture_output=True, text=True, cwd=_root(), env=_env())
        if proc.returncode != 0:
            raise RuntimeError(f"memory run for {samples} samples failed:\n{proc.stderr[-3000:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(store_write_s=made, store_mb=_du(path) / 2**20)
        out[samples] = result
        shutil.rmtree(path, ignore_errors=True)
    small, large = out[lengths[0]]["peak_rss_mb"], out[lengths[1]]["peak_rss_mb"]
    out["peak_ratio"] = large / small
    return out


# ----------------------------------------------------------------------------------------- read + step
def measure_read(tmp: Path, nodes: int, reads: int = 5) -> dict:
    import dask

    from dist_egnn.datasets.loader import TrajectoryDataset
    from dist_egnn.datasets.store import open_store

    path = make_store(tmp / "read.zarr", reads + 1, nodes, None)
    data = TrajectoryDataset(open_store(path), "train", delta_t=DELTA_T, node_features=["speed", "type"],
                             edge_features=["distance", "distance"])
    raw, total = [], []
    for i in range(reads):
        scene, t = data.locate(i)
        nodes_slice = data.meta.scene_nodes(scene)
        started = time.perf_counter()
        arrays = dask.compute(data._pos[t, nodes_slice], data._vel[t, nodes_slice],
                              data._pos[t + DELTA_T, nodes_slice], data._scalars[nodes_slice], scheduler="threads")
        raw.append(time.perf_counter() - started)
        started = time.perf_counter()
        sample = data.make_sample(scene, t, *arrays)
        total.append(raw[-1] + time.perf_counter() - started)
    per_frame = _du(path / "train" / "pos") / (reads + 1 + DELTA_T)
    return dict(nodes=nodes, edges=int(sample.edge_index.shape[1]), read_slices_s=float(np.median(raw)),
                read_and_graph_s=float(np.median(total)), pos_bytes_per_frame=per_frame, store=str(path))


def measure_step(store: str, steps: int = 3) -> dict:
    import torch

    from dist_egnn.datasets.loader import TrajectoryDataset, collate
    from dist_egnn.datasets.store import open_store
    from dist_egnn.losses import objective
    from dist_egnn.models import FastEGNN

    torch.set_num_threads(os.cpu_count() or 1)
    data = TrajectoryDataset(open_store(store), "train", delta_t=DELTA_T, node_features=["speed", "type"],
                             edge_features=["distance", "distance"])
    sample = data.read([0])[0]
    out = {}
    for label, keep in (("full", len(sample.pos)), ("part_of_8", len(sample.pos) // 8)):
        part = _subgraph(sample, keep)
        batch = collate([part])
        torch.manual_seed(0)
        model = FastEGNN(node_features=2, edge_features=2, edge_chunk_size=65_536)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            pred = model(**batch.model_inputs())
            loss = objective(pred.pos, batch.target, pred.virtual_pos, batch.batch, batch.num_graphs,
                             mmd_weight=0.01, mmd_sigma=3.0).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times.append(time.perf_counter() - started)
        out[label] = dict(nodes=int(len(part.pos)), edges=int(part.edge_index.shape[1]), step_s=float(min(times)),
                          threads=torch.get_num_threads())
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _subgraph(sample, keep: int):
    """The first ``keep`` nodes (a compact block of the lattice) and the edges among them."""
    from dataclasses import replace

    if keep >= len(sample.pos):
        return sample
    mask = (sample.edge_index < keep).all(axis=0)
    return replace(sample, pos=sample.pos[:keep], vel=sample.vel[:keep], target=sample.target[:keep],
                   node_features=sample.node_features[:keep], edge_index=sample.edge_index[:, mask],
                   edge_attr=sample.edge_attr[mask])


# ------------------------------------------------------------------------------------------------- sph
def measure_sph(work: Path, sizes=(10_000, 113_000), frames: int = 5, threads: int | None = None) -> dict:
    from dist_egnn.datasets.parallel import available_cores
    from dist_egnn.datasets.sph import SPHConfig, run_scene_task, scene_recipe, scene_task, simulator_available

    ok, reason = simulator_available()
    if not ok:
        return dict(skipped=reason)
    cores = threads or available_cores()
    out = {}
    # one frame first: builds the 5 x 10 x 5 box's volume map, cached in work/scenes/Cache for the rest
    cfg = SPHConfig(num_particles=sizes[0], duration=1 / 50, retries=0)
    cached = any((work / "scenes" / "Cache").glob("*.cdm"))
    task = run_scene_task(scene_task(cfg, scene_recipe(cfg, "train", 0), work, "warmup", cores))
    if not task["ok"]:
        raise RuntimeError(f"SPH warm-up failed: {task['error']}\n{task['tail']}")
    if not cached:
        out["first_scene_with_wall_map_s"] = json.loads((work / "warmup" / "scene.json").read_text())["simulation_s"]
    for n in sizes:
        cfg = SPHConfig(num_particles=n, duration=frames / 50, retries=0)
        recipe = scene_recipe(cfg, "train", 0)
        shutil.rmtree(work / f"n{n}-f{frames}", ignore_errors=True)
        result = run_scene_task(scene_task(cfg, recipe, work, f"n{n}-f{frames}", cores))
        if not result["ok"]:
            raise RuntimeError(f"SPH {n} failed: {result['error']}\n{result['tail']}")
        meta = json.loads((work / f"n{n}-f{frames}" / "scene.json").read_text())
        out[n] = dict(particles=meta["num_particles"], frames=frames, steps=meta["steps"], threads=cores,
                      seconds_per_frame=meta["seconds_per_frame"],            # frames 1 .. T-1: stepping only
                      run_with_wall_map_load_s=meta["simulation_s"])
    return out


# ------------------------------------------------------------------------------------------------ misc
def measure_walls(store: str, steps: int = 8) -> dict:
    """Edges per graph by kind and the FastEGNN step on the training samples of an SPH store (module docstring)."""
    import torch

    from dist_egnn.datasets.loader import TrajectoryDataset, collate
    from dist_egnn.datasets.store import open_store
    from dist_egnn.models import FastEGNN

    torch.set_num_threads(1)
    info = open_store(store)
    data = TrajectoryDataset(info, "train", delta_t=DELTA_T, frame_stride=20, node_features=["speed", "type"],
                             edge_features=["distance", "distance"], radius=RADIUS,
                             velocity_scale=DELTA_T * float(info.attrs["dt"]))
    cpu = time.process_time()
    samples = data.read(list(range(len(data))))
    build = (time.process_time() - cpu) / len(samples)
    kinds = {"wall <- wall": (True, True), "fluid <- wall": (False, True), "wall <- fluid": (True, False)}
    counts = {name: [] for name in ("nodes", "edges", *kinds)}
    for s in samples:
        wall = np.zeros(len(s.pos), bool) if s.moving is None else ~s.moving
        recv, send = s.edge_index
        counts["nodes"].append(len(s.pos))
        counts["edges"].append(s.edge_index.shape[1])
        for name, (r, q) in kinds.items():
            counts[name].append(int(((wall[recv] == r) & (wall[send] == q)).sum()))
    torch.manual_seed(0)
    model = FastEGNN(node_features=2, edge_features=2, hidden=64, layers=4, virtual_channels=3)
    optimizer = torch.optim.Adam(model.parameters(), 1e-4)
    times = []
    for k, s in enumerate(samples[:steps + 1]):
        graph = collate([s])
        cpu = time.process_time()
        pred = model(**graph.model_inputs())
        error = pred.pos - graph.target
        loss = (error if graph.moving is None else error[graph.moving]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if k:                                            # the first step is the warm-up
            times.append(time.process_time() - cpu)
    return dict(store=store, samples=len(samples), build_cpu_s=build, step_cpu_s=float(np.mean(times)),
                step_cpu_min_s=float(np.min(times)), **{k: float(np.mean(v)) for k, v in counts.items()})


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([_root(), *filter(None, [os.environ.get("PYTHONPATH")])]))


def measure_sizes(data: Path, read: dict | None) -> dict:
    out = {}
    if read:
        out["synthetic_113k_pos_bytes_per_frame"] = read["pos_bytes_per_frame"]
        out["synthetic_113k_pos_vel_mb_per_200_frame_scene"] = 2 * read["pos_bytes_per_frame"] * 200 / 2**20
        out["raw_float32_pos_vel_mb_per_200_frame_scene"] = 2 * NODES * 3 * 4 * 200 / 2**20
    if data.exists():
        for store in sorted(data.glob("*.zarr")):
            out[store.name] = _du(store) / 2**20
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:
        print(json.dumps(memory_child(argv[1], int(argv[2]))))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}, or walls")
    parser.add_argument("--stores", default="", help="comma-separated SPH stores for --parts walls")
    parser.add_argument("--nodes", type=int, default=NODES, help="nodes of the synthetic trajectory")
    parser.add_argument("--samples", type=int, default=6, help="samples read per memory run")
    parser.add_argument("--lengths", default="100,10000", help="dataset lengths (samples) compared for memory")
    parser.add_argument("--data", default="data", help="folder of stores whose sizes to report")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--sph-frames", type=int, default=5, help="frames per SPH timing run")
    parser.add_argument("--sph-threads", type=int, default=None, help="OpenMP threads per SPH run (default: all)")
    parser.add_argument("--sph-work", default=None, help="keep SPH scenes and the wall-map cache in this folder "
                                                          "(a second run skips the map); default: a temporary one")
    args = parser.parse_args(argv)
    parts = args.parts.split(",")
    results: dict = {"machine": dict(cores=os.cpu_count(), python=sys.version.split()[0])}
    with tempfile.TemporaryDirectory(prefix="measure-", dir=os.environ.get("MEASURE_TMP")) as tmp_name:
        tmp = Path(tmp_name)
        if "memory" in parts:
            lengths = tuple(int(x) for x in args.lengths.split(","))
            results["memory"] = measure_memory(tmp, args.nodes, args.samples, lengths)
            print(json.dumps({"memory": results["memory"]}, indent=1), flush=True)
        read = None
        if "read" in parts or "step" in parts or "sizes" in parts:
            read = measure_read(tmp, args.nodes)
            results["read"] = {k: v for k, v in read.items() if k != "store"}
            print(json.dumps({"read": results["read"]}, indent=1), flush=True)
        if "step" in parts:
            results["step"] = measure_step(read["store"])
            print(json.dumps({"step": results["step"]}, indent=1), flush=True)
        if "sph" in parts:
            work = Path(args.sph_work) if args.sph_work else tmp / "sph"
            results["sph"] = measure_sph(work, frames=args.sph_frames, threads=args.sph_threads)
            print(json.dumps({"sph": results["sph"]}, indent=1), flush=True)
        if "sizes" in parts:
            results["sizes"] = measure_sizes(Path(args.data), read)
            print(json.dumps({"sizes": results["sizes"]}, indent=1), flush=True)
        if "walls" in parts:
            results["walls"] = [measure_walls(store) for store in args.stores.split(",") if store]
            print(json.dumps({"walls": results["walls"]}, indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
