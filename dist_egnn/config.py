"""The typed configuration: nested dataclasses registered with Hydra's ConfigStore.

The YAML groups in ``launch/conf/{dataset,model,trainer}`` fill these; because every node is typed and in
struct mode, an unknown key or a value of the wrong type stops the run before anything starts, naming the
key. Values used by several groups live in one place and are interpolated: feature widths come from the
dataset's feature recipes (``${len:...}``), the MMD σ and λ from the dataset (docs/maths.md §3 lists them per
dataset).

Each generator's settings (``dataset.nbody``, ``.synthetic``, ``.sph``, ``.md``, ``.gns``) are defined once, by
the generator's own dataclass in ``datasets/`` (``dist_egnn.datasets``), which the schema uses as the section's
type. The schemas of the accuracy study (``launch/study.py``) and the scaling study (``launch/scaling.py``) live
here too, so that :func:`register` is the one place that stores configuration with Hydra.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from dist_egnn.datasets.gns import GNSConfig
from dist_egnn.datasets.loader import check_gravity
from dist_egnn.datasets.md import MDConfig
from dist_egnn.datasets.nbody import NBodyConfig
from dist_egnn.datasets.sph import SPHConfig
from dist_egnn.datasets.synthetic import SyntheticConfig
from dist_egnn.errors import ConfigError


@dataclass
class PathsConfig:
    data: str = "data"          # every dataset store lives at <data>/<dataset.name>.zarr
    runs: str = "runs"          # run directories are created under here


@dataclass
class DatasetConfig:
    name: str = MISSING                       # store name: <paths.data>/<name>.zarr
    source: str = MISSING                     # how `prepare` makes the store: nbody, sph, md, gns
    store: str = "${paths.data}/${dataset.name}.zarr"
    auto_prepare: bool = True                 # create the store on first use if it is missing
    check_values: bool = True                 # scan the whole store for NaN/Inf before training
    delta_t: int = 10                         # frames between input and target
    frame_start: int = 0
    frame_stop: Optional[int] = None          # None: every frame with a target
    frame_stride: int = 1
    # stored: the store's velocity at the input frame | displacement: (x(t) - x(t - delta_t)) / (delta_t · dt), what a
    # rollout feeds back (input frames before delta_t left out; datasets/loader.py)
    input_velocity: str = "stored"
    velocity_unit: str = "store"              # store: as stored | horizon: v · delta_t · dt
                                              # (displacement per task step)
    # External field of every graph (docs/maths.md §8): [gx, gy, gz] in the store's length / time² (the SPH fluids:
    # [0, -9.81, 0], what datasets/sph.py simulates), scaled into the task's units as the velocities are
    # (datasets/loader.py task_gravity); null: none (N-body, proteins). Set: the model gets phi_g (model weights
    # differ from a run without it). Any: a list of 3 finite numbers or null, checked by check() (ConfigError).
    gravity: Any = None
    node_features: list[str] = field(default_factory=lambda: ["speed"])
    edge_features: list[str] = field(default_factory=lambda: ["distance", "distance"])
    radius: Optional[float] = None            # None: the store's own radius (None there: complete graph)
    max_neighbors: Optional[int] = None
    # Every moving node also receives from its k nearest walls, however far (datasets/graphs.py: over a task step a
    # particle may cross many radii toward a wall the radius graph does not show it); 0: radius graph only.
    wall_neighbors: int = 0
    # Those walls only within this distance (the store's length unit; null: however far): a particle flung out of
    # the box in a rollout is otherwise wired to walls farther than any training graph held (datasets/graphs.py).
    wall_neighbors_reach: Optional[float] = None
    # keep: every wall of the scene is a node of every graph | drop: each graph holds only the walls its edges touch
    # (datasets/graphs.py, unwired walls): fewer node rows; exact with model.virtual_walls=false; distributed.parts=1
    unwired_walls: str = "keep"
    mmd_sigma: float = 1.5
    mmd_weight: float = 0.03
    mmd_samples: Optional[int] = None         # real nodes per graph per virtual node for MMD; None: all
    prefetch: int = 2                         # batches read ahead in a background thread (0: none)
    # The section named by `source` holds the generator's parameters (datasets/prepare.py); each type is the
    # generator's own dataclass, the one definition of its keys and defaults.
    nbody: Optional[NBodyConfig] = None               # datasets/nbody.py
    synthetic: Optional[SyntheticConfig] = None      # datasets/synthetic.py
    sph: Optional[SPHConfig] = None                   # datasets/sph.py
    md: Optional[MDConfig] = None                     # datasets/md.py
    gns: Optional[GNSConfig] = None                   # datasets/gns.py


@dataclass
class ModelConfig:
    name: str = "fastegnn"                    # egnn | fastegnn
    hidden: int = 64
    layers: int = 4
    virtual_channels: int = 3                 # C (FastEGNN only)
    virtual_walls: bool = True                # FastEGNN: walls (node scalar type 1) exchange messages with the
                                              # virtual nodes; false: only the moving nodes do (fastegnn.py, walls)
    node_features: int = II("len:${dataset.node_features}")
    edge_features: int = II("len:${dataset.edge_features}")
    node_attrs: int = 0
    cutoff_rate: float = 0.0                  # edge dropping r (docs/maths.md §2), applied when graphs are built
    normalize: bool = False                   # term (4)'s real-real sum reads (x_i - x_j) / (|x_i - x_j| + 1e-8),
                                              # the norm detached: the authors' N-body choice (docs/maths.md §8)
    constant_velocity_start: bool = False     # start as x + αv (α fitted on training samples): phi_v's last
                                              # layer weight 0, bias α/L (EquivariantModel.start_at_constant_velocity)
    edge_chunk_size: Any = "auto"             # edges per recomputed chunk: auto (CPU 16384, CUDA from free memory) | N
    compile: bool = False                     # torch.compile the model's dense per-node work (see README: measured)


@dataclass
class LossConfig:
    mmd_weight: float = II("dataset.mmd_weight")
    mmd_sigma: float = II("dataset.mmd_sigma")
    mmd_samples: Optional[int] = II("dataset.mmd_samples")
    mmd_kernel: str = "gaussian"              # gaussian | unsquared
    mmd_target: str = "truth"                 # truth | prediction


@dataclass
class TrainerConfig:
    max_epochs: int = 8
    batch_size: int = 10
    eval_batch_size: int = 50
    lr: float = 5e-4
    weight_decay: float = 1e-12
    patience: int = 10                        # evaluations without a better val MSE before stopping
    eval_every: int = 1                       # epochs between evaluations
    seed: int = 0
    device: str = "auto"                      # auto (CUDA when a GPU is visible, else CPU) | cpu | cuda
    dtype: str = "float32"                    # float32 | float64: parameters, optimizer state, inputs
    precision: str = "fp32"                   # fp32 | bf16: bf16 runs the MLP products in bfloat16 (autocast)
    tf32: bool = True                         # CUDA: float32 matrix products on tensor cores (TF32)
    deterministic: bool = False               # deterministic kernels (CUDA index_add_ without atomics); slower
    num_threads: Optional[int] = None         # None: all cores of this process's share
    progress: bool = True
    steps_per_epoch: Optional[int] = None     # at most this many training steps per epoch (None: the whole split)
    checkpoint_every_steps: int = 0           # also a resume point every this many steps; 0: only at evaluations
    keep_last: int = 3                        # engine checkpoints kept (newest); the best evaluation's is kept too
    nonfinite: str = "stop"                   # NaN/Inf loss or gradients: stop (diagnostic checkpoint) | skip the step
    # Learning-rate schedule (dist_egnn/training/schedule.py), stepped after every optimizer step; plateau after
    # every evaluation, on val_mse. Its state travels in the checkpoints (a resumed run equals an uninterrupted one).
    scheduler: str = "none"                   # none (constant lr) | cosine | exponential | plateau
    warmup_steps: int = 0                     # optimizer steps of linear warmup to trainer.lr first (0: none)
    min_lr: float = 0.0                       # floor of every schedule (cosine ends there)
    gamma: float = 0.999                      # exponential: lr factor per optimizer step after warmup
    plateau_patience: int = 5                 # plateau: evaluations without a better val_mse before the lr drops
    plateau_factor: float = 0.5               # plateau: factor on the lr when it drops
    ema_decay: Optional[float] = None         # exponential moving average of the weights, in [0, 1) (e.g. 0.99);
                                              # None or 0: off. Evaluations and best.pt use the averaged weights
    accumulate: int = 1                       # micro-batches of trainer.batch_size per optimizer step (gradient
                                              # accumulation); steps_per_epoch and checkpoint_every_steps count
                                              # optimizer steps
    tensorboard: bool = True                  # TensorBoard event files in <run dir>/tensorboard (rank 0)
    # none | rms: the model works in units where the training split's displacement has RMS 1 (inputs scaled by the
    # store's statistics, datasets/statistics.py; docs/maths.md §1) | radius: lengths in units of dataset.radius,
    # velocities over their RMS (the same neighbourhoods at any frame rate). Reported MSEs stay in the store's units.
    normalization: str = "none"
    # σ of GNS-style training noise, in the store's length unit (0: none): each training input's moving positions
    # get N(0, σ²), their velocities the matching finite-difference error, so the model learns to correct what a
    # rollout feeds back (dist_egnn/training/rank_data.py). Must stay under radius / 4.
    input_noise: float = 0.0
    # What the noisy input is asked to predict. clean: the true next position, so the model also undoes the
    # position error (it pushes a particle that noise put into a wall back out). shifted: the true next position
    # plus the input's position error, as GNS and LagrangeBench do, so only the velocity error is corrected.
    noise_target: str = "clean"
    # σ_w of the training noise on the moving nodes within wall_noise_reach (None: dataset.radius) of a wall
    # particle, in place of input_noise (0: input_noise everywhere; whole graphs only). The SPH fluid never enters
    # its walls, so without it a model never sees a particle in the wall face (dist_egnn/training/rank_data.py).
    wall_noise: float = 0.0
    wall_noise_reach: Optional[float] = None
    # false: σ_w moves the near nodes' positions only (the input a task step earlier moves with them, so their
    # velocities keep input_noise's error); true: their velocities take σ_w's finite-difference error too.
    wall_noise_velocity: bool = True
    # Pushforward (dist_egnn/training/pushforward.py): from epoch pushforward_start_epoch on, a training batch is,
    # with probability pushforward_prob, started 1..pushforward_unrolls task steps earlier and rolled forward
    # by the model itself (no gradient), so the loss sees the inputs a rollout feeds back. 0 unrolls: off.
    pushforward_unrolls: int = 0
    pushforward_prob: float = 0.5
    pushforward_start_epoch: int = 1
    # Validation rollouts (dist_egnn/training/validation.py): every evaluation also rolls the model out this many
    # task steps on the validation split (0: none) from input frame val_rollout_start (None: training's first) of
    # its first val_rollout_scenes scenes (None: all), and records val_rollout_mse (mean of the per-step MSE; inf
    # when it diverged), val_rollout_baseline_mse (constant velocity), val_rollout_steps, val_rollout_outside.
    val_rollout_steps: int = 0
    val_rollout_start: Optional[int] = None
    val_rollout_scenes: Optional[int] = None
    # The validation number that picks best.pt, counts early stopping's patience and drives the plateau schedule:
    # val_mse (one step) | val_rollout_mse (needs trainer.val_rollout_steps >= 1).
    select_on: str = "val_mse"


@dataclass
class DistributedConfig:
    """How each graph is split over ranks (docs/maths.md §4-5). World size = parts × graph groups (data parallel)."""

    parts: int = 1                            # P: parts per graph, one rank each
    partition: str = "metis"                  # metis | spatial | random
    halo: str = "none"                        # none: drop cut edges (paper) | exact: 1-hop halo, equals 1 device
    seed: int = 0                             # partitioner seed
    backend: str = "auto"                     # auto (gloo on CPU, nccl on CUDA) | gloo | nccl
    timeout_s: float = 300.0                  # a collective waiting longer fails (a dead rank stops the rest)
    prepare_timeout_s: float = 7200.0         # how long ranks wait while rank 0 prepares a missing store/partition
    # Share of every graph's nodes each part gets (partitioners/strategies.py honours it for every method; part p
    # runs on rank p of each graph group): uniform (1/P each) | measured (each rank times the model on a probe graph
    # at set-up; shares proportional to speed, rounded to 1 %) | [w_0, ..., w_{P-1}]: P positive shares summing to 1.
    # Non-uniform shares are stored as another partition (the artifact's name carries them).
    part_weights: Any = "uniform"
    # Start the halo exchange (exact mode) and FastEGNN's all-reduces early and compute what needs no remote rows,
    # the interior edges and the virtual terms, before waiting: same maths (equal to one device like false), no
    # more CPU time, most of a network's latency hidden (docs/results/latency.md). false: wait where issued.
    overlap: bool = True
    # Injected delays, for tests and benchmarks only (dist_egnn/parallel/collectives.py, Injection); 0 / 1: none.
    inject_latency_ms: float = 0.0            # every model collective (all-reduce, halo exchange; forward and
                                              # backward) completes this long after it is issued, on every rank
    inject_slowdown: float = 1.0              # the ranks in inject_ranks compute this many times slower (a straggler)
    inject_delay_ms: float = 0.0              # the ranks in inject_ranks also sleep this long per forward pass
    inject_ranks: list[int] = field(default_factory=lambda: [0])   # global ranks slowed by the two keys above


@dataclass
class EngineConfig:
    """Who combines gradients and writes checkpoints (dist_egnn/engines)."""

    name: str = "auto"                        # auto | plain | ddp | fsdp | deepspeed
    zero_stage: int = 0                       # DeepSpeed ZeRO stage (0 keeps checkpoints resumable at any P)
    gradient_clipping: float = 0.0            # clip the global gradient norm to this before every optimizer step,
                                              # under every engine (DeepSpeed: its own option); 0: off


@dataclass
class PrepareConfig:
    """Options of ``launch/prepare.py``."""

    overwrite: bool = False                   # rebuild a store that already exists
    scheduler: str = "auto"                   # dask scheduler generating and partitioning: auto|processes|threads|sync
    workers: Optional[int] = None             # dask workers for generating and partitioning; None: every core
    cluster: Optional[str] = None             # dask.distributed scheduler address for generation, or "local"


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    resume: Optional[str] = None              # auto: continue from the run directory's latest checkpoint


# ------------------------------------------------------------------------- launch/study.py (dist_egnn.measure.study)
@dataclass
class StudyRun:
    label: str = MISSING                            # names the run in the results
    overrides: list[str] = field(default_factory=list)   # launch/train.py overrides of this run
    ranks: int = 1                                  # processes; more than one uses the deepspeed launcher


@dataclass
class SceneRollouts:
    data: Optional[str] = None                      # store: a name under paths.data (<name>.zarr) or a path
                                                    # ending in .zarr; None: each run's own store
    splits: list[str] = field(default_factory=lambda: ["test"])   # every scene of these splits, one at a time


@dataclass
class StudySpec:
    name: str = MISSING
    description: str = ""
    dataset: str = MISSING                          # a launch/conf/dataset option
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    common: list[str] = field(default_factory=list)  # overrides shared by every run
    budgets: dict[str, list[str]] = field(default_factory=dict)  # named training budgets (overrides)
    budget: str = "default"
    baseline: Optional[str] = None                  # label every other run is compared with
    runs: list[StudyRun] = field(default_factory=list)
    rollout_steps: Optional[int] = None             # K: every run is also rolled out K task steps on the test
                                                    # split (launch/predict.py), per-step MSE tabulated
    rollout_start: Optional[int] = None             # the rollouts' input frame (predict.py start=); None: each
                                                    # run's first input frame (dataset.frame_start)
    scene_rollouts: Optional[SceneRollouts] = None  # also roll every run out scene by scene (rollout_steps K,
                                                    # from rollout_start) and count per label and split the
                                                    # rollouts that stay whole: a split-wide rollout stops at its
                                                    # first divergence


@dataclass
class StudyRoot:
    study: StudySpec = field(default_factory=StudySpec)
    paths: PathsConfig = field(default_factory=PathsConfig)
    results_dir: str = "docs/results"
    progress: bool = True
    train: bool = True          # false: only tabulate the runs already finished (skip the others)
    jobs: int = 1               # runs trained at once; each gets cores // jobs threads unless its overrides say
    keep_going: bool = False    # true: a failed run is listed in the results and the others go on (false: stop)


# ------------------------------------------------------------ launch/scaling.py (dist_egnn.measure.scaling_study)
@dataclass
class ScalingConfig:
    data: str = "synthetic113k"                    # a launch/conf/dataset option
    partition: str = "metis"
    parts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    halo: list[str] = field(default_factory=lambda: ["exact", "none"])
    # None below: chosen by graph size (a graph of large_nodes or more is "large"; dist_egnn/measure/scaling_study.py)
    steps: Optional[int] = None                     # timed steps per measurement; None: 4, large 1
    warmup: Optional[int] = None                    # untimed steps before them; None: 1, large 0
    project_parts: Optional[str] = None             # all | largest: parts timed alone; None: all, large largest
    real_halo: Optional[list[str]] = None           # halo modes of the real runs; None: halo, large [exact]
    large_nodes: int = 500_000
    real_max_ranks: int = 2                         # real runs up to this many ranks (this machine's cores; 0: none)
    # Partitioning and loading cost at this size, and a projection to target_nodes over target_ranks (exact halo)
    # over an inter-node link of this latency and bandwidth (and over this machine's measured loopback link)
    costs: bool = True
    target_nodes: int = 10_000_000
    target_ranks: int = 64
    node_link_latency_s: float = 5e-5               # 50 us: MPI/gloo over a datacentre Ethernet
    node_link_bandwidth: float = 1.25e9             # bytes/s: 10 Gb/s
    link_repeats: int = 20                          # repetitions of each collective when measuring α and β
    overrides: list[str] = field(default_factory=list)   # extra launch/train.py overrides (model, paths, ...)
    results_dir: str = "docs/results"
    work_dir: str = "runs/scaling"                  # the real runs' run directories
    name: str = "scaling-${data}"
    overwrite: bool = False                   # replace <name>.csv even if it holds P or halo modes not measured now
    progress: bool = True


# ---------------------------------------------------------- launch/predict.py (dist_egnn.inference.predict)
@dataclass
class PredictConfig:
    """Options of ``launch/predict.py``: roll a trained run's model out (dist_egnn.inference)."""

    run: Optional[str] = None                 # run directory (config.yaml + checkpoints/best.pt); required
    steps: int = 10                           # K task steps (of the run's dataset.delta_t frames) to roll out
    data: Optional[str] = None                # another store; None: the run's dataset.store
    split: str = "test"                       # train | val | test
    start: Optional[int] = None               # input frame t0; None: the run's dataset.frame_start
    scenes: Optional[int] = None              # the split's first this many scenes; None: all
    scene_ids: Optional[list[int]] = None     # these scenes of the split by index instead, e.g. [2, 11] (one scene
                                              # at a time tells which ones diverge: a rollout stops at the first)
    batch_size: Optional[int] = None          # scenes per forward; None: the run's trainer.eval_batch_size
    format: str = "zarr"                      # zarr | vtk (vtk: also one .vtu per scene and frame, for ParaView)
    parts: Optional[int] = None               # P parts, re-partitioned every step; None: the run's distributed.parts
    halo: Optional[str] = None                # exact | none; None: the run's distributed.halo
    partition: Optional[str] = None           # metis | spatial | random; None: the run's distributed.partition
    seed: Optional[int] = None                # partitioner seed; None: the run's distributed.seed
    max_neighbors: Optional[int] = None       # cap of senders per receiver in the rollout's radius graphs (bounds
                                              # memory when predictions pile up); None: the run's dataset.max_neighbors
    wall_neighbors_reach: Optional[float] = None  # the rollout's nearest-wall edges only within this distance (a
                                              # particle flung out of the box hears no wall farther than training
                                              # showed); None: the run's dataset.wall_neighbors_reach
    contain: bool = False                     # hold the predicted fluid inside its container every step (SPH
                                              # stores' box; a constraint over the model, off: the model alone)
    device: str = "auto"                      # auto | cpu | cuda
    dtype: Optional[str] = None               # float32 | float64; None: the run's trainer.dtype
    num_threads: Optional[int] = None         # CPU threads; None: torch's default
    out: Optional[str] = None                 # output folder; None: <run>/predict (replaced when complete)
    progress: bool = True


# The schemas register() stores with Hydra, by name (what launch/conf/{config,study,scaling,predict}.yaml list in
# defaults).
SCHEMAS = {"base_config": Config, "study_schema": StudyRoot, "scaling_schema": ScalingConfig,
           "predict_schema": PredictConfig}

MODEL_NAMES = ("egnn", "fastegnn")
HALO_MODES = ("none", "exact")
PARTITION_METHODS = ("metis", "spatial", "random")
ENGINE_NAMES = ("auto", "plain", "ddp", "fsdp", "deepspeed")


def register() -> None:
    """Register the schemas with Hydra (:data:`SCHEMAS`: ``base_config``, ``study_schema``, ``scaling_schema``,
    ``predict_schema``) and the ``len`` and ``run_stamp`` resolvers; idempotent. Nothing else stores
    configuration: every entry point calls this before composing."""
    if not OmegaConf.has_resolver("len"):
        OmegaConf.register_new_resolver("len", lambda values: len(values))
    if not OmegaConf.has_resolver("run_stamp"):
        # The run directory's time stamp: rank 0's, shared by every rank of a multi-process launch
        # (launch/train.py sets DIST_EGNN_RUN_STAMP), so all ranks write into one directory.
        OmegaConf.register_new_resolver(
            "run_stamp", lambda: os.environ.get("DIST_EGNN_RUN_STAMP") or time.strftime("%Y-%m-%d_%H-%M-%S"),
            use_cache=True)
    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(name=name, node=node)


# Ranges of numeric keys: (lowest allowed, whether the lowest itself is allowed, what the key means).
# None is accepted wherever the schema allows it (Optional); the check names the key and the range.
RANGES = {
    "model.hidden": (1, True), "model.layers": (1, True), "model.virtual_channels": (1, True),
    "model.node_attrs": (0, True),
    "dataset.delta_t": (1, True), "dataset.frame_start": (0, True), "dataset.frame_stop": (1, True),
    "dataset.frame_stride": (1, True), "dataset.radius": (0, False), "dataset.max_neighbors": (1, True),
    "dataset.wall_neighbors": (0, True), "dataset.wall_neighbors_reach": (0, False),
    "dataset.prefetch": (0, True),
    "dataset.mmd_weight": (0, True), "dataset.mmd_sigma": (0, False), "dataset.mmd_samples": (1, True),
    "loss.mmd_weight": (0, True), "loss.mmd_sigma": (0, False), "loss.mmd_samples": (1, True),
    "trainer.max_epochs": (1, True), "trainer.batch_size": (1, True), "trainer.eval_batch_size": (1, True),
    "trainer.lr": (0, False), "trainer.weight_decay": (0, True), "trainer.patience": (1, True),
    "trainer.eval_every": (1, True), "trainer.seed": (0, True), "trainer.num_threads": (1, True),
    "trainer.steps_per_epoch": (1, True), "trainer.checkpoint_every_steps": (0, True), "trainer.keep_last": (1, True),
    "trainer.warmup_steps": (0, True), "trainer.min_lr": (0, True), "trainer.gamma": (0, False),
    "trainer.plateau_patience": (0, True), "trainer.plateau_factor": (0, False), "trainer.ema_decay": (0, True),
    "trainer.accumulate": (1, True), "trainer.input_noise": (0, True),
    "trainer.wall_noise": (0, True), "trainer.wall_noise_reach": (0, False),
    "trainer.pushforward_unrolls": (0, True), "trainer.pushforward_prob": (0, True),
    "trainer.pushforward_start_epoch": (1, True), "trainer.val_rollout_steps": (0, True),
    "trainer.val_rollout_start": (0, True), "trainer.val_rollout_scenes": (1, True),
    "distributed.parts": (1, True), "distributed.seed": (0, True), "distributed.timeout_s": (0, False),
    "distributed.prepare_timeout_s": (0, False), "distributed.inject_latency_ms": (0, True),
    "distributed.inject_slowdown": (1, True), "distributed.inject_delay_ms": (0, True),
    "engine.zero_stage": (0, True), "engine.gradient_clipping": (0, True),
    "prepare.workers": (1, True),
}
CHOICES = {
    "model.name": MODEL_NAMES, "loss.mmd_kernel": ("gaussian", "unsquared"), "loss.mmd_target": ("truth", "prediction"),
    "trainer.dtype": ("float32", "float64"), "trainer.precision": ("fp32", "bf16"),
    "trainer.device": ("auto", "cpu", "cuda"), "trainer.nonfinite": ("stop", "skip"),
    "trainer.scheduler": ("none", "cosine", "exponential", "plateau"),
    "trainer.normalization": ("none", "rms", "radius"), "trainer.noise_target": ("clean", "shifted"),
    "trainer.select_on": ("val_mse", "val_rollout_mse"),
    "dataset.input_velocity": ("stored", "displacement"), "dataset.unwired_walls": ("keep", "drop"),
    "distributed.halo": HALO_MODES, "distributed.partition": PARTITION_METHODS,
    "distributed.backend": ("auto", "gloo", "nccl"), "engine.name": ENGINE_NAMES,
}


def _value(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            return None
    return node


def range_problems(cfg) -> list[str]:
    """A sentence for every numeric key outside its range (:data:`RANGES`)."""
    problems = []
    for key, (low, inclusive) in RANGES.items():
        value = _value(cfg, key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.startswith("loss.") and value == _value(cfg, "dataset." + key[5:]):
            continue                                  # interpolated from dataset.*: reported there
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            problems.append(f"{key}={value}: must be {bound}")
    if cfg.model.get("edge_chunk_size") not in (None, "auto"):
        size = cfg.model.edge_chunk_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            problems.append(f"model.edge_chunk_size={size!r}: must be auto or a whole number of edges >= 1")
    return problems


def check(cfg: DictConfig | Config) -> None:
    """Checks that types alone cannot express; raises ConfigError naming every bad key and the fix."""
    problems = range_problems(cfg)
    for key, choices in CHOICES.items():
        value = _value(cfg, key)
        if value is not None and str(value).split(":")[0] not in choices:
            problems.append(f"{key}={value!r}: choose one of {choices}")
    # Upper bounds (RANGES holds the lower ones); .get: configurations saved before these keys existed.
    for key, bound in (("ema_decay", "[0, 1) (e.g. 0.99; None or 0: off)"), ("gamma", "(0, 1]"),
                       ("plateau_factor", "(0, 1)")):
        value = cfg.trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                value >= 1.0 if key != "gamma" else value > 1.0):
            problems.append(f"trainer.{key}={value}: must be in {bound}")
    if cfg.trainer.get("pushforward_prob", 0.0) > 1.0:
        problems.append(f"trainer.pushforward_prob={cfg.trainer.pushforward_prob}: a probability, must be in [0, 1]")
    if cfg.trainer.get("pushforward_unrolls", 0) and cfg.distributed.parts > 1:
        problems.append(f"trainer.pushforward_unrolls={cfg.trainer.pushforward_unrolls} with distributed.parts="
                        f"{cfg.distributed.parts}: pushforward builds each graph from the model's own predictions, "
                        f"which the stored partitions and halos (made from the stored frames) do not cover; train "
                        f"it on whole graphs (distributed.parts=1, data parallel over ranks is fine), or set "
                        f"trainer.pushforward_unrolls=0")
    if cfg.trainer.get("wall_noise", 0.0) and cfg.distributed.parts > 1:
        problems.append(f"trainer.wall_noise={cfg.trainer.wall_noise} with distributed.parts={cfg.distributed.parts}: "
                        f"which nodes are near a wall is decided on the whole graph, which a rank's part and halo "
                        f"do not hold; train on whole graphs (distributed.parts=1, data parallel over ranks is fine), "
                        f"or set trainer.wall_noise=0")
    rollout_steps = cfg.trainer.get("val_rollout_steps", 0) or 0
    if cfg.trainer.get("select_on", "val_mse") == "val_rollout_mse" and rollout_steps < 1:
        problems.append(f"trainer.select_on=val_rollout_mse with trainer.val_rollout_steps={rollout_steps}: selecting "
                        f"on a validation rollout needs one; set trainer.val_rollout_steps=K (K >= 1 task steps), or "
                        f"trainer.select_on=val_mse")
    if rollout_steps and cfg.distributed.parts > 1:
        problems.append(f"trainer.val_rollout_steps={rollout_steps} with distributed.parts={cfg.distributed.parts}: "
                        f"a validation rollout builds whole graphs from the model's own predictions, which the "
                        f"stored partitions do not cover; train on whole graphs (distributed.parts=1, data parallel "
                        f"over ranks is fine), or set trainer.val_rollout_steps=0 and roll out afterwards with "
                        f"launch/predict.py run=RUN split=val parts={cfg.distributed.parts}")
    if cfg.trainer.get("scheduler", "none") != "none" and cfg.trainer.get("min_lr", 0.0) > cfg.trainer.lr:
        problems.append(f"trainer.min_lr={cfg.trainer.min_lr} is above trainer.lr={cfg.trainer.lr}: the schedule "
                        f"decays from trainer.lr down to trainer.min_lr; lower trainer.min_lr")
    if cfg.dataset.get("wall_neighbors_reach") is not None and not cfg.dataset.get("wall_neighbors", 0):
        problems.append(f"dataset.wall_neighbors_reach={cfg.dataset.wall_neighbors_reach} with "
                        f"dataset.wall_neighbors=0: the reach bounds the nearest-wall edges, and there are none; set "
                        f"dataset.wall_neighbors=k (k >= 1), or dataset.wall_neighbors_reach=null")
    if cfg.trainer.get("wall_noise_reach") is not None and not cfg.trainer.get("wall_noise", 0.0):
        problems.append(f"trainer.wall_noise_reach={cfg.trainer.wall_noise_reach} with trainer.wall_noise=0: the reach "
                        f"says where σ_w applies, and there is none; set trainer.wall_noise (e.g. 0.015), or "
                        f"trainer.wall_noise_reach=null")
    if cfg.dataset.get("unwired_walls", "keep") == "drop":
        if cfg.distributed.parts > 1:
            problems.append(f"dataset.unwired_walls=drop with distributed.parts={cfg.distributed.parts}: the stored "
                            f"partitions and halos hold every wall of a scene; train on whole graphs "
                            f"(distributed.parts=1, data parallel over ranks is fine), or set "
                            f"dataset.unwired_walls=keep")
        if cfg.trainer.get("pushforward_unrolls", 0):
            problems.append(f"dataset.unwired_walls=drop with trainer.pushforward_unrolls="
                            f"{cfg.trainer.pushforward_unrolls}: pushforward rolls whole scenes forward; set "
                            f"dataset.unwired_walls=keep or trainer.pushforward_unrolls=0")
    zero_stage = (cfg.get("engine") or {}).get("zero_stage", 0)
    if zero_stage and cfg.engine.get("name", "auto") in ("plain", "ddp", "fsdp"):
        problems.append(zero_stage_problem(zero_stage, cfg.engine.name))
    if not 0.0 <= cfg.model.cutoff_rate <= 1.0:
        problems.append(f"model.cutoff_rate={cfg.model.cutoff_rate}: must be in [0, 1]")
    if cfg.trainer.get("precision") == "bf16" and cfg.trainer.dtype == "float64":
        problems.append("trainer.precision=bf16 with trainer.dtype=float64: bf16 mixed precision keeps float32 "
                        "parameters; use trainer.dtype=float32, or trainer.precision=fp32 for float64")
    if cfg.get("resume") not in (None, "auto"):
        problems.append(f"resume={cfg.get('resume')!r}: only resume=auto is supported (or leave resume unset)")
    if cfg.model.node_features != len(cfg.dataset.node_features):
        problems.append(f"model.node_features={cfg.model.node_features} but dataset.node_features lists "
                        f"{len(cfg.dataset.node_features)} features {list(cfg.dataset.node_features)}: "
                        f"remove the model.node_features override or change the recipe")
    if cfg.model.edge_features != len(cfg.dataset.edge_features):
        problems.append(f"model.edge_features={cfg.model.edge_features} but dataset.edge_features lists "
                        f"{len(cfg.dataset.edge_features)} features {list(cfg.dataset.edge_features)}: "
                        f"remove the model.edge_features override or change the recipe")
    try:
        check_gravity(cfg.dataset.get("gravity"))
    except ConfigError as err:
        problems.append(str(err))
    weights = part_weights_problem(cfg.distributed.get("part_weights", "uniform"), cfg.distributed.parts)
    if weights:
        problems.append(weights)
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def zero_stage_problem(stage: int, engine: str) -> str:
    """The sentence for a DeepSpeed ZeRO stage asked of another engine (it would change nothing)."""
    return (f"engine.zero_stage={stage} is DeepSpeed's ZeRO stage, but the run's engine is {engine}, which would "
            f"ignore it; launch with deepspeed (engine=deepspeed or auto under the deepspeed launcher), or leave "
            f"engine.zero_stage=0")


WEIGHT_SUM_TOLERANCE = 1e-3   # distributed.part_weights must sum to 1 within this


def part_weights_problem(value: Any, parts: int) -> str | None:
    """What is wrong with ``distributed.part_weights`` for P = ``parts`` (None: nothing): uniform, measured, or P
    positive shares of every graph's nodes summing to 1 (within :data:`WEIGHT_SUM_TOLERANCE`)."""
    if isinstance(value, str):
        if value in ("uniform", "measured"):
            return None
        return f"distributed.part_weights={value!r}: choose uniform, measured or a list of {parts} shares summing to 1"
    try:
        shares = [float(v) for v in value]
    except (TypeError, ValueError):
        return (f"distributed.part_weights={value!r}: choose uniform, measured or a list of {parts} numbers (shares "
                f"of the nodes) summing to 1")
    if len(shares) != parts:
        return (f"distributed.part_weights has {len(shares)} shares but distributed.parts={parts}: give one share per "
                f"part, summing to 1")
    if not all(v > 0 for v in shares):
        return f"distributed.part_weights={shares}: every share must be positive (each part needs nodes)"
    if abs(sum(shares) - 1.0) > WEIGHT_SUM_TOLERANCE:
        return (f"distributed.part_weights={shares} sums to {sum(shares):.4g}, not 1: the shares are fractions of "
                f"every graph's nodes (e.g. [0.33, 0.67] for a rank 0 at half the speed of rank 1)")
    return None


# launch/conf: the YAML groups over this schema, beside the package in a source checkout (pip install -e .)
CONF_DIR = Path(__file__).resolve().parents[1] / "launch" / "conf"


def compose_config(*overrides: str, config_name: str = "config") -> DictConfig:
    """The configuration ``python launch/train.py <overrides>`` would run, without Hydra's command line.

    Composes ``launch/conf/<config_name>.yaml`` over the typed schema with the same override syntax
    (``"model=egnn"``, ``"trainer.lr=1e-3"``), so unknown keys and wrong types fail the same way. Hand the result
    to ``Trainer.from_config(cfg, run_dir).fit()`` (``run_dir``: any folder; the command line's
    ``hydra.run.dir``). Not inside a running ``@hydra.main`` application (Hydra is initialised once per process).
    """
    from hydra import compose, initialize_config_dir

    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        raise ConfigError(f"{CONF_DIR / (config_name + '.yaml')} not found: compose_config needs the launch/conf "
                          f"folder of a source checkout (pip install -e .)")
    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The fully resolved configuration as plain Python data (what config.yaml holds)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
