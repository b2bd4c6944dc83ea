"""Charged N-body system (docs/maths.md §6; Kipf et al. 2018 as extended to 3-D by Satorras et al. 2021).

Physics, per scene of n particles with charges q_i ∈ {−1, +1}:

    F_i = k Σ_{j≠i} q_i q_j (x_i − x_j) / |x_i − x_j|³        Coulomb: like charges repel
    |F_i| capped at max_force (direction kept)                tames close encounters
    v  += dt · F;   x += dt · v                               semi-implicit (symplectic) Euler

The cap acts on the force's magnitude, not on each component as in Kipf et al.'s code: a per-component
clip depends on the axes, so rotated initial conditions would not give rotated trajectories. No walls:
as in EGNN's version the bounding box is removed, so the dynamics are exactly E(3)-equivariant
(an optional ``box_size`` reflects particles at ±box_size). Initial positions ~ N(0, loc_std²) per
coordinate; initial velocities random directions with speed ``vel_norm``. Every ``sample_every``-th step
is stored, starting with the initial state: frame k is the state after k·sample_every steps. The paper's
set: 5000 steps of dt 0.001, every 100th kept, task frame 30 → 40, 5000/2000/2000 scenes.

Every scene draws its initial state from its own seed (store seed, split, scene index), so the data do not
depend on how scenes are grouped into batches or spread over workers (threads, processes, a dask cluster).

Units are reduced (arbitrary): unit charge, unit mass, Coulomb constant ``interaction``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from dist_egnn.datasets.parallel import map_tasks
from dist_egnn.datasets.store import DEFAULT_CHUNK_NODES, atomic_store, create_split, write_root_attrs, write_scenes
from dist_egnn.errors import ConfigError
from dist_egnn.keys import SPLITS

SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


@dataclass
class NBodyConfig:
    """Parameters of one N-body store; defaults are the paper's system.

    Also the ``dataset.nbody`` section of the Hydra schema (dist_egnn/config.py): the one definition of these keys.
    """

    num_particles: int = 100           # particles per scene
    train: int = 5000                  # training scenes
    val: int = 2000                    # validation scenes
    test: int = 2000                   # test scenes
    steps: int = 5000                  # integration steps per scene
    sample_every: int = 100            # every sample_every-th step is stored (frame 0: the initial state)
    dt: float = 0.001                  # integration time step
    interaction: float = 1.0           # Coulomb constant k
    loc_std: float = 1.0               # initial positions ~ N(0, loc_std²) per coordinate
    vel_norm: float = 0.5              # initial speed (random directions)
    max_force: float = 100.0           # cap on |F_i| (direction kept)
    box_size: float | None = None      # reflect particles at ±box_size; None: no walls (exactly E(3)-equivariant)
    seed: int = 0                      # every scene draws from (seed, split, scene index)
    scenes_per_batch: int = 100        # scenes simulated together in one task

    @property
    def num_frames(self) -> int:
        return self.steps // self.sample_every


def initial_state(cfg: NBodyConfig, split: str, scene: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions (n, 3), velocities (n, 3) and charges (n,) of one scene, from that scene's own seed."""
    rng = np.random.default_rng([cfg.seed, SPLIT_SEED_OFFSET[split], scene])
    pos = rng.normal(0.0, cfg.loc_std, size=(cfg.num_particles, 3))
    direction = rng.normal(size=(cfg.num_particles, 3))
    vel = direction * (cfg.vel_norm / np.linalg.norm(direction, axis=1, keepdims=True))
    charge = rng.choice(np.array([-1.0, 1.0]), size=cfg.num_particles)
    return pos, vel, charge


def simulate(pos: np.ndarray, vel: np.ndarray, charge: np.ndarray, cfg: NBodyConfig) -> tuple[np.ndarray, np.ndarray]:
    """Integrate S scenes at once: pos/vel (S, n, 3), charge (S, n) -> frames pos/vel (S, T, n, 3) float32.

    Float64 throughout. Pairwise distances come from the Gram matrix (|x_i|² + |x_j|² − 2 x_i·x_j), which
    turns the n² work into batched matrix products; float64 keeps the cancellation error far below the
    distances that matter (forces are clipped long before r reaches 1e-6).
    """
    x = torch.as_tensor(pos, dtype=torch.float64).clone()
    v = torch.as_tensor(vel, dtype=torch.float64).clone()
    q = torch.as_tensor(charge, dtype=torch.float64)
    scenes, n, _ = x.shape
    coupling = cfg.interaction * q.unsqueeze(2) * q.unsqueeze(1)              # k q_i q_j (S, n, n)
    frames_pos = np.empty((scenes, cfg.num_frames, n, 3), dtype=np.float32)
    frames_vel = np.empty_like(frames_pos)
    inv_r3 = torch.empty(scenes, n, n, dtype=torch.float64)
    for step in range(cfg.num_frames * cfg.sample_every):
        if step % cfg.sample_every == 0:
            frames_pos[:, step // cfg.sample_every] = x.numpy()
            frames_vel[:, step // cfg.sample_every] = v.numpy()
        sq = (x * x).sum(dim=2)
        torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), x, x.transpose(1, 2), alpha=-2.0, out=inv_r3)  # r²
        inv_r3.clamp_(min=1e-12).diagonal(dim1=1, dim2=2).fill_(float("inf"))
        inv_r3.rsqrt_().pow_(3).mul_(coupling)                                 # k q_i q_j / r³, 0 on i = j
        force = x * inv_r3.sum(dim=2, keepdim=True) - torch.bmm(inv_r3, x)    # Σ_j w_ij (x_i − x_j)
        magnitude = torch.linalg.vector_norm(force, dim=2, keepdim=True)
        force.mul_((cfg.max_force / magnitude.clamp(min=cfg.max_force)))           # cap |F_i|
        v.add_(force, alpha=cfg.dt)
        x.add_(v, alpha=cfg.dt)
        if cfg.box_size is not None:
            _reflect(x, v, cfg.box_size)
    return frames_pos, frames_vel


def _reflect(x: torch.Tensor, v: torch.Tensor, box: float) -> None:
    """Mirror positions that left [−box, box] back inside and flip their velocity component."""
    for sign in (1.0, -1.0):
        out = sign * x > box
        x[out] = sign * 2 * box - x[out]
        v[out] = -v[out]


def generate_nbody(path: str | Path, cfg: NBodyConfig, dataset: str = "nbody", overwrite: bool = False,
                   progress: bool = True, scheduler: str = "auto", workers: int | None = None,
                   cluster: str | None = None) -> Path:
    """Simulate every scene of every split and write a validated-layout store at ``path`` atomically.

    Scenes are simulated in parallel through dask (``datasets.parallel.map_tasks``): one task per run of
    ``scenes_per_chunk`` consecutive scenes, which is exactly one chunk of the store's node axis, so every
    task writes its own chunks and no two tasks ever touch the same chunk (threads, processes or the
    workers of a dask.distributed cluster alike). A task simulates its scenes ``scenes_per_batch`` at a
    time, so memory stays at one batch whatever the dataset size.
    """
    if cfg.steps < cfg.sample_every or cfg.num_particles < 2:
        raise ConfigError(f"N-body: need steps >= sample_every and at least 2 particles, got {cfg}")
    per_chunk = scenes_per_chunk(cfg.num_particles)
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="nbody", dt=cfg.dt * cfg.sample_every,
                         units={"length": "reduced", "time": "reduced"}, radius=None, node_scalars=["charge"],
                         generator=dict(asdict(cfg), simulator="datasets.nbody"))
        tasks = []
        for split in SPLITS:
            count = getattr(cfg, split)
            create_split(root, split, [cfg.num_particles] * count, cfg.num_frames, num_scalars=1,
                         chunk_nodes=per_chunk * cfg.num_particles)
            tasks += [(str(root.store.root), split, first, min(first + per_chunk, count), cfg)
                      for first in range(0, count, per_chunk)]
        for _ in map_tasks(_simulate_task, tasks, scheduler=scheduler, workers=workers, cluster=cluster,
                           progress=progress, desc=f"simulating {dataset}", unit="scene",
                           weights=[stop - first for _, _, first, stop, _ in tasks]):
            pass
    return Path(path)


def scenes_per_chunk(num_particles: int) -> int:
    """Scenes in one chunk of the node axis: as many whole scenes as fit in DEFAULT_CHUNK_NODES (at least 1)."""
    return max(1, DEFAULT_CHUNK_NODES // num_particles)


def _simulate_task(task: tuple[str, str, int, int, NBodyConfig]) -> int:
    """One dask task: simulate scenes [first, stop) of a split and write them into the store at ``store``."""
    store, split, first, stop, cfg = task
    group = zarr.open_group(store, mode="r+")[split]
    for start in range(first, stop, cfg.scenes_per_batch):
        scenes = range(start, min(start + cfg.scenes_per_batch, stop))
        pos, vel, charge = map(np.stack, zip(*(initial_state(cfg, split, s) for s in scenes)))
        frames_pos, frames_vel = simulate(pos, vel, charge, cfg)
        write_scenes(group, start, frames_pos, frames_vel, charge[..., None].astype(np.float32))
    return stop - first
