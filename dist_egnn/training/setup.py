"""Set-up: everything a training run needs before its first step, handed to the Trainer ready to use.

:func:`prepare` runs in this order, on every rank of a launch:

1. **checks** of what types alone cannot express (``dist_egnn.config.check``), the world size against
   ``distributed.parts`` and the engine against the launch, before any work;
2. **runtime**: the device, the threads of this rank, the process groups (``dist_egnn.parallel.runtime``);
3. **data**: the dataset's store, made on first use by rank 0 while the other ranks wait, and its splits;
4. **partitions** (P > 1): the stored partition of every sample, built on first use the same way, and each
   split as this rank sees it (:class:`~dist_egnn.training.rank_data.RankData`);
5. **model and engine**: the model with the communicator injected, wrapped in its engine with Adam.

The result, :class:`Ready`, holds those objects; :class:`~dist_egnn.training.trainer.Trainer` only trains.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dist_egnn.config import check
from dist_egnn.datasets.prepare import check_store_matches, prepare_dataset
from dist_egnn.datasets.store import StoreError, StoreInfo, check_store_path, open_store, preparation_lock
from dist_egnn.engines import Engine, build_engine, resolve_engine
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.keys import SPLITS
from dist_egnn.models import EGNN, FastEGNN
from dist_egnn.parallel import Communicator, runtime
from dist_egnn.parallel.collectives import Injection
from dist_egnn.partitioners.artifacts import StalePartitionError, load_assignments, partition_status, prepare_partitions
from dist_egnn.training.device import configure_cuda, edge_chunk_rows, resolve_device
from dist_egnn.training.lock import RunLock, RunLockedError, check_run_dir
from dist_egnn.training.normalization import NONE, Normalization
from dist_egnn.training.rank_data import RankData
from dist_egnn.training.weights import injected_slowdown, resolve_part_weights

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# What a launcher (deepspeed, torchrun) sets and deepspeed.initialize needs; without them DeepSpeed tries MPI.
DEEPSPEED_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
MPI_LAUNCH_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")       # mpirun: DeepSpeed's own discovery


@dataclass
class Runtime:
    """Where and how this rank computes."""

    env: runtime.DistEnv
    groups: runtime.Groups
    engine_name: str                   # resolved: plain | ddp | fsdp | deepspeed
    device: torch.device
    dtype: torch.dtype
    collective_device: torch.device    # where the trainer's own small reductions run (CPU under gloo)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0


@dataclass
class Ready:
    """What :func:`prepare` hands the Trainer."""

    cfg: DictConfig
    run_dir: Path
    runtime: Runtime
    lock: RunLock                      # held by rank 0 for the run's life (one training per run directory)
    info: StoreInfo                    # the dataset's store
    data: dict[str, RankData]          # train / val / test as this rank sees them
    comm: Communicator                 # the model's communicator (SingleProcess or GraphParallel)
    engine: Engine                     # the model inside its engine, with its optimizer
    normalization: Normalization = NONE    # trainer.normalization: the units the model works in


def prepare(cfg: DictConfig, run_dir: str | Path, env: runtime.DistEnv | None = None) -> Ready:
    """Everything above, in order; raises ValueError (naming the key and the fix) on bad configuration."""
    check(cfg)
    rt = start_runtime(cfg, env or runtime.DistEnv.from_environ())
    run_dir = Path(run_dir)
    lock = lock_run_dir(run_dir, rt)
    try:                                   # a refused set-up leaves no lock file behind
        progress = cfg.trainer.progress and rt.is_main
        info, splits = open_data(cfg, rt, progress)
        normalization = resolve_normalization(cfg, rt, info, splits["train"].radius)
        data = rank_data(cfg, rt, splits, progress)
        torch.manual_seed(cfg.trainer.seed)
        model = build_model(cfg.model, rt.device, external_field=has_external_field(cfg.dataset)).to(rt.device,
                                                                                                     rt.dtype)
        if cfg.model.get("constant_velocity_start", False):
            start_at_constant_velocity(model, splits["train"], normalization, rt.is_main)
        comm = rt.groups.communicator(injection(cfg, rt.env.rank), overlap=bool(cfg.distributed.get("overlap", False)))
        model.set_comm(comm)
        t = cfg.trainer
        engine = build_engine(rt.engine_name, model,
                              lambda params: torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay),
                              cfg, rt.groups)
    except BaseException:
        lock.release()
        raise
    return Ready(cfg=cfg, run_dir=run_dir, runtime=rt, lock=lock, info=info, data=data, comm=comm, engine=engine,
                 normalization=normalization)


START_FIT_SAMPLES = 50          # training samples α of model.constant_velocity_start is fitted on


def start_at_constant_velocity(model: torch.nn.Module, train, normalization: Normalization, report: bool) -> float:
    """``model.constant_velocity_start``: fit α of x(t + Δt) ≈ x(t) + α v(t) on up to START_FIT_SAMPLES training
    samples (as the constant-velocity reference fits it, dist_egnn.measure.baselines) and start the model as that
    predictor. Every rank reads the same samples, so every rank starts from the same weights without a collective.
    α is converted to the model's units: v / s_v in, displacement × s_x out, so α · s_v / s_x under rms."""
    from dist_egnn.measure.baselines import fit_alpha

    alpha, fitted = fit_alpha(train, START_FIT_SAMPLES)
    in_model_units = alpha * normalization.velocity / normalization.length        # both 1 without normalisation
    model.start_at_constant_velocity(in_model_units)
    if report:
        print(f"model.constant_velocity_start: alpha={alpha:.6g} fitted on {fitted} training samples "
              f"({in_model_units:.6g} in the model's units); the untrained model predicts x + alpha v", flush=True)
    return in_model_units


# -- runtime --------------------------------------------------------------------------------------------
def start_runtime(cfg: DictConfig, env: runtime.DistEnv) -> Runtime:
    """Check the launch against the configuration, then pick the device and threads and start the groups."""
    t, d = cfg.trainer, cfg.distributed
    runtime.check_layout(env, d.parts)            # ranks per node and nodes from the launcher, fitting P
    env.export()                                  # RANK, LOCAL_RANK, ... for DeepSpeed under mpirun / srun
    engine_name = resolve_engine(cfg.engine.name, env.world_size)
    if engine_name == "deepspeed" and t.dtype == "float64":
        raise ConfigError("trainer.dtype=float64: DeepSpeed reduces float32/16 gradients only; use "
                         "trainer.dtype=float32, or engine=ddp under torchrun for float64")
    launch_vars = [v for v in DEEPSPEED_LAUNCH_VARS if v not in os.environ]
    if engine_name == "deepspeed" and launch_vars and not any(v in os.environ for v in MPI_LAUNCH_VARS):
        # DeepSpeed would look for an MPI launch and fail importing mpi4py: say what the user can do instead
        raise ConfigError(f"engine=deepspeed needs the deepspeed launcher: deepspeed --num_gpus P launch/train.py "
                          f"..., or engine=plain (this process was started without a launcher: "
                          f"{', '.join(launch_vars)} not set)")
    if engine_name in ("ddp", "fsdp") and not env.distributed:
        raise ConfigError(f"engine={engine_name} needs a multi-process launch (torchrun --nproc-per-node P "
                         f"launch/train.py ...); for one process use engine=plain or engine=auto")
    device = resolve_device(t.device, env.local_rank, env.local_world_size, d.backend)
    configure_cuda(device, t.get("tf32", True), t.get("deterministic", False))
    torch.set_num_threads(thread_share(env, t.num_threads))
    backend = d.backend if d.backend != "auto" else runtime.default_backend(device)
    groups = runtime.init_groups(env, d.parts, backend, d.timeout_s, d.prepare_timeout_s)
    return Runtime(env=env, groups=groups, engine_name=engine_name, device=device, dtype=DTYPES[t.dtype],
                   collective_device=device if backend == "nccl" else torch.device("cpu"))


def lock_run_dir(run_dir: Path, rt: Runtime) -> RunLock:
    """Rank 0 takes the run directory's lock (creating the directory) before anything is written there;
    if another training holds it, every rank stops with the holder named (agreed: no rank waits in vain)."""
    check_run_dir(run_dir)                 # a file where the run directory should be: one line, every rank
    lock = RunLock(run_dir, enabled=rt.is_main)
    refused = None
    try:
        lock.acquire()
    except RunLockedError as err:
        refused = err
    if runtime.agree([refused is not None], rt.collective_device)[0]:
        raise refused or RunLockedError(f"run directory {run_dir} is in use by another training (rank 0 found "
                                        f"its lock {run_dir / '.lock'}): choose another hydra.run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    return lock


def thread_share(env: runtime.DistEnv, requested: int | None) -> int:
    """Threads of this rank: ``trainer.num_threads`` when set, else ``OMP_NUM_THREADS`` (PyTorch's own knob,
    which torchrun sets to 1 for several ranks and tells the user to tune), else the machine's cores divided
    among the ranks on this node."""
    if requested:
        return requested
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        if not omp.isdigit() or int(omp) < 1:
            raise ConfigError(f"OMP_NUM_THREADS={omp!r} in the environment: must be a whole number >= 1; unset it "
                              f"(each rank then takes its share of the cores) or set trainer.num_threads=N")
        return int(omp)
    return max(1, (os.cpu_count() or 1) // env.local_world_size)


# -- data -----------------------------------------------------------------------------------------------
def open_dataset_store(dataset_cfg: DictConfig, progress: bool = True, prepare: DictConfig | None = None) -> StoreInfo:
    """Open (and on first use create) the dataset's store, validated and checked against the configuration:
    a store made with other generator parameters is refused (``datasets.prepare.check_store_matches``).
    ``prepare``: the run's ``prepare`` options (scheduler, workers, cluster) for creating it, as
    ``launch/prepare.py`` uses them; None: every local core."""
    path = Path(dataset_cfg.store)
    dataset = OmegaConf.to_container(dataset_cfg, resolve=True)
    check_store_path(path)                 # a dangling or looping link: refused before generating anything
    if not path.exists() and dataset_cfg.auto_prepare:
        with preparation_lock(path):       # one preparer: another process that found it missing waits here
            if not path.exists():          # ... and then finds it made
                print(f"dataset store {path} not found: preparing it now (set dataset.auto_prepare=false to "
                      f"disable)")
                options = {} if prepare is None else {key: prepare[key] for key in ("scheduler", "workers", "cluster")}
                prepare_dataset(dataset, path, progress=progress, **options)
    info = open_store(path)                # structure only: the comparison comes before the values' scan
    check_store_matches(dataset, info)
    return open_store(path, check_values=True) if dataset_cfg.check_values else info


def check_everyone_sees(path: Path, rt: Runtime, what: str) -> None:
    """After rank 0 prepared ``path`` and the others waited for it: every rank must see it. Agreed, so a rank on a
    node that does not share rank 0's filesystem stops every rank (never a second preparer, never a hang)."""
    if runtime.agree([not path.exists()], rt.collective_device)[0]:
        here = "does not see it either" if not path.exists() else "sees it"
        raise ConfigError(f"rank 0 prepared {what} {path}, but a rank does not see it (rank {rt.env.rank} on node "
                          f"{rt.env.node} {here}): paths.data must be a filesystem every node shares (one preparer "
                          f"per job), or prepare the data on every node first (python launch/prepare.py ... on each)")


def load_splits(cfg: DictConfig, info: StoreInfo):
    """The train/val/test ``TrajectoryDataset`` of the configured dataset."""
    from dist_egnn.datasets.loader import TrajectoryDataset, task_gravity, velocity_scale

    d = cfg.dataset
    missing = [n for n in d.node_features if n != "speed" and n not in info.node_scalars]
    if missing:
        raise ConfigError(f"dataset.node_features names {missing}, which store {info.path} does not hold "
                         f"(its node scalars: {info.node_scalars}); fix dataset.node_features")
    # configurations saved before velocity_unit existed used the store's unit
    scale = velocity_scale(d.get("velocity_unit", "store"), d.delta_t, info.attrs["dt"])
    gravity = task_gravity(d.get("gravity"), d.get("velocity_unit", "store"), d.delta_t, info.attrs["dt"])
    splits = {split: TrajectoryDataset(info, split, delta_t=d.delta_t, frame_start=d.frame_start,
                                       frame_stop=d.frame_stop, frame_stride=d.frame_stride,
                                       node_features=list(d.node_features), edge_features=list(d.edge_features),
                                       radius=d.radius, max_neighbors=d.max_neighbors,
                                       wall_neighbors=d.get("wall_neighbors", 0),
                                       wall_neighbors_reach=d.get("wall_neighbors_reach"),
                                       input_velocity=d.get("input_velocity", "stored"),
                                       unwired_walls=d.get("unwired_walls", "keep"),
                                       cutoff_rate=cfg.model.cutoff_rate, velocity_scale=scale, gravity=gravity)
              for split in SPLITS}
    degree = splits["train"].mean_degree()
    if degree < 1.0:                     # e.g. a radius in other length units than the store's
        warnings.warn(f"dataset.radius={splits['train'].radius} gives {degree:.2f} edges per node on the first "
                      f"training sample of {info.path} (under one: most nodes see no neighbour); check the radius "
                      f"against the store's length unit ({info.attrs['units'].get('length')}) and its own radius "
                      f"({info.attrs['radius']})", stacklevel=2)
    return splits


def open_data(cfg: DictConfig, rt: Runtime, progress: bool):
    """The store and its splits; in a multi-rank run, rank 0 prepares what is missing while others wait (on every
    node: one preparer per job, so ``paths.data`` must be a filesystem every node shares)."""
    d = cfg.dataset
    check_store_path(Path(d.store))        # on every rank: a broken link stops all of them, none waits for rank 0
    # Agreed before rank 0 starts writing: a rank that looked later would see a half-written store.
    if rt.env.distributed and runtime.agree([not Path(d.store).exists()], rt.collective_device)[0]:
        if rt.is_main:
            open_dataset_store(d, progress=progress, prepare=cfg.get("prepare"))
        runtime.barrier(cfg.distributed.prepare_timeout_s)
        check_everyone_sees(Path(d.store), rt, "the dataset store")
    info = open_dataset_store(d, progress=progress, prepare=cfg.get("prepare"))
    return info, load_splits(cfg, info)


def resolve_normalization(cfg: DictConfig, rt: Runtime, info: StoreInfo, radius: float | None) -> Normalization:
    """``trainer.normalization``: none, or rms or radius (``radius``: the training graphs' radius, None for a
    complete graph) from the store's statistics of this run's frame selection (``datasets/statistics.py``). A
    store without them (made before they existed, or another ``dataset.delta_t`` or frame range) gets them now:
    rank 0 computes and records them in the store's attributes while the other ranks wait, then hands them to
    every rank (one line says so)."""
    from dist_egnn.datasets.loader import velocity_scale
    from dist_egnn.datasets.statistics import ensure_statistics, statistics_key

    if cfg.trainer.get("normalization", "none") == "none":
        return NONE
    d = cfg.dataset
    text = ""
    if rt.is_main:
        try:
            record, note = ensure_statistics(info, d.delta_t, d.frame_start, d.frame_stop, d.frame_stride,
                                             input_velocity=d.get("input_velocity", "stored"))
            if note:
                print(note, flush=True)
            text = json.dumps(dict(record=record))
        except BadInput as err:            # said on every rank, not only rank 0 (the others would wait in vain)
            text = json.dumps(dict(error=str(err)))
    if rt.env.distributed:
        runtime.barrier(cfg.distributed.prepare_timeout_s)
    got = json.loads(runtime.broadcast_text(text, device=rt.collective_device))
    if "error" in got:
        raise StoreError(got["error"])
    key = statistics_key(d.delta_t, d.frame_start, d.frame_stop, d.frame_stride, d.get("input_velocity", "stored"))
    scale = velocity_scale(d.get("velocity_unit", "store"), d.delta_t, info.attrs["dt"])
    where = f"{info.path} (attribute statistics[{key!r}])"
    if cfg.trainer.normalization == "radius":
        normalization = Normalization.radius(got["record"], scale, radius, d.node_features, d.edge_features,
                                             where=where)
    else:
        normalization = Normalization.rms(got["record"], scale, d.node_features, d.edge_features, where=where)
    if rt.is_main:
        print(normalization.describe(), flush=True)
        warning = normalization.small_displacement(radius)
        if warning:
            warnings.warn(warning, stacklevel=2)
    return normalization


# -- partitions -----------------------------------------------------------------------------------------
def rank_data(cfg: DictConfig, rt: Runtime, splits, progress: bool) -> dict[str, RankData]:
    """Each split as this rank sees it: its part of every graph (the stored partition when P > 1)."""
    d = cfg.distributed
    noise = {name: training_noise(cfg, data) if name == "train" else 0.0 for name, data in splits.items()}
    shifted = cfg.trainer.get("noise_target", "clean") == "shifted"
    if d.parts == 1:
        wall_noise, reach = wall_training_noise(cfg, splits["train"])
        velocity = bool(cfg.trainer.get("wall_noise_velocity", True))
        return {name: RankData(data, report=rt.is_main, noise=noise[name], noise_shifts_target=shifted,
                               wall_noise=wall_noise if name == "train" else 0.0, wall_noise_reach=reach,
                               wall_noise_velocity=velocity)
                for name, data in splits.items()}
    sequential = not rt.env.distributed           # one process runs all P parts (drop-mode reference)
    weights = resolve_part_weights(cfg, rt)       # None: equal parts
    path, digest, stale = partition_status(splits, d.partition, d.parts, d.seed, weights)
    # Agreed before rank 0 starts building: every rank takes the same branch, no one waits in vain.
    if runtime.agree([stale is not None], rt.collective_device)[0]:
        stale = stale or "stale as another rank saw it"
        if not cfg.dataset.auto_prepare:
            raise StalePartitionError(f"{path}: {stale}; build it with `python launch/prepare.py "
                                      f"dataset={cfg.dataset.name} distributed.parts={d.parts} "
                                      f"distributed.partition={d.partition} distributed.seed={d.seed}"
                                      f"{weights_override(weights)}`")
        if rt.is_main:
            prepare_partitions(splits, d.partition, d.parts, d.seed, progress=progress,
                               scheduler=cfg.prepare.scheduler, workers=cfg.prepare.workers, weights=weights)
        runtime.barrier(d.prepare_timeout_s)
        check_everyone_sees(path, rt, "the partition")
    # Batches are built ahead in a background thread (datasets.prefetch): their collectives run on a group
    # of their own, so they never interleave with the model's on the graph group.
    group, device = rt.groups.data, torch.device("cpu")          # the data group is gloo
    gather = (lambda values: runtime.all_gather_arrays(values, group, device)) if group is not None else None
    wall_noise = float(cfg.trainer.get("wall_noise", 0.0) or 0.0)    # refused by RankData (config.check first)
    return {name: RankData(data, rt.groups.part, d.parts, d.halo == "exact",
                           load_assignments(path, name, expected_hash=digest), gather=gather, sequential=sequential,
                           report=rt.is_main, noise=noise[name], noise_shifts_target=shifted,
                           wall_noise=wall_noise if name == "train" else 0.0)
            for name, data in splits.items()}


NOISE_RADIUS_SHARE = 0.25     # trainer.input_noise must be under this share of the radius


def training_noise(cfg: DictConfig, train) -> float:
    """``trainer.input_noise``, refused unless well under the radius (:func:`check_noise_under_radius`)."""
    sigma = float(cfg.trainer.get("input_noise", 0.0) or 0.0)
    check_noise_under_radius("trainer.input_noise", sigma, train)
    return sigma


def wall_training_noise(cfg: DictConfig, train) -> tuple[float, float]:
    """(σ_w, reach) of ``trainer.wall_noise`` and ``trainer.wall_noise_reach`` (default: the radius), refused as
    ``trainer.input_noise`` is when σ_w is not well under the radius, and when the store has no walls."""
    sigma = float(cfg.trainer.get("wall_noise", 0.0) or 0.0)
    reach = cfg.trainer.get("wall_noise_reach")
    reach = train.radius if reach is None else reach
    if sigma == 0.0:
        return 0.0, 0.0
    if train.type_column is None or np.array_equal(train.scene_moving(), np.diff(train.meta.scene_ptr)):
        what = "no node scalar `type`" if train.type_column is None else "no node of type 1 in its training scenes"
        raise ConfigError(f"trainer.wall_noise={sigma:g}: {train.info.path} holds no wall particles ({what}), so it "
                          f"would change nothing; set trainer.wall_noise=0, or use a store with walls")
    if reach is None:
        raise ConfigError(f"trainer.wall_noise={sigma:g} on fully connected graphs of {train.info.path} (no "
                          f"dataset.radius): set trainer.wall_noise_reach, the distance to a wall that counts as near")
    check_noise_under_radius("trainer.wall_noise", sigma, train)
    return sigma, float(reach)


def check_noise_under_radius(key: str, sigma: float, train) -> None:
    """Training noise must be well under the radius (:data:`NOISE_RADIUS_SHARE` of it): the noisy inputs keep the
    clean frame's edges (dist_egnn.training.rank_data), which only holds while the noise moves a node a small part
    of its neighbourhood."""
    if sigma > 0.0 and train.radius is not None and sigma >= NOISE_RADIUS_SHARE * train.radius:
        raise ConfigError(f"{key}={sigma:g} is not under {NOISE_RADIUS_SHARE:g} x the radius ({train.radius:g}, "
                          f"{train.info.path}): noise that size moves particles across the graph's neighbourhoods; "
                          f"use under {NOISE_RADIUS_SHARE * train.radius:.3g}, a few per cent of the radius is usual "
                          f"(e.g. {0.02 * train.radius:.2g}), or 0 for none")


def weights_override(weights: list[float] | None) -> str:
    """`` distributed.part_weights=[...]`` for a command line, or ``""`` for equal parts."""
    return "" if weights is None else " distributed.part_weights=[" + ",".join(f"{w:g}" for w in weights) + "]"


def injection(cfg: DictConfig, rank: int) -> Injection:
    """This rank's injected delays (``distributed.inject_*``, tests and benchmarks; none by default)."""
    slowdown, delay_s = injected_slowdown(cfg, rank)
    return Injection(latency_s=float(cfg.distributed.get("inject_latency_ms", 0.0)) / 1e3, slowdown=slowdown,
                     delay_s=delay_s)


# -- model ----------------------------------------------------------------------------------------------
def has_external_field(dataset_cfg: DictConfig | Any) -> bool:
    """Whether the dataset gives every graph an external field (``dataset.gravity`` set; a ConfigError naming the
    key when it is not 3 finite numbers): the model is then built with phi_g (``external_field``)."""
    from dist_egnn.datasets.loader import check_gravity

    return check_gravity(dataset_cfg.get("gravity")) is not None


def build_model(model_cfg: DictConfig | Any, device: torch.device | str = "cpu",
                external_field: bool = False) -> torch.nn.Module:
    """EGNN or FastEGNN from the ``model`` config group, its edge chunks sized for ``device``; ``external_field``
    (from :func:`has_external_field` of the dataset) adds phi_g, the gravity summand of term (4)."""
    device = torch.device(device)
    common = dict(node_features=model_cfg.node_features, edge_features=model_cfg.edge_features,
                  node_attrs=model_cfg.node_attrs, hidden=model_cfg.hidden, layers=model_cfg.layers,
                  edge_chunk_size=edge_chunk_rows(model_cfg.get("edge_chunk_size"), device, model_cfg.hidden),
                  external_field=bool(external_field), normalize=bool(model_cfg.get("normalize", False)))
    if model_cfg.name == "egnn":
        model = EGNN(**common)
    elif model_cfg.name == "fastegnn":
        model = FastEGNN(virtual_channels=model_cfg.virtual_channels,
                         virtual_walls=bool(model_cfg.get("virtual_walls", True)), **common)
    else:
        raise ConfigError(f"model.name={model_cfg.name!r}: choose egnn or fastegnn")
    if model_cfg.get("compile", False):
        if device.type != "cuda":
            # Measured 2026-12-04, torch 2.13 CPU: inductor fails to generate code for the model's scatter
            # (index_add_) ("Error in codegen for ComputedBuffer ... scatter_mode='atomic_add'").
            raise ConfigError("model.compile=true is supported on CUDA only (torch.compile of this model fails on "
                              "the CPU with torch's inductor); leave model.compile=false on the CPU")
        model.compile(dynamic=True)          # nn.Module.compile: the state dict keeps its plain names
    return model
