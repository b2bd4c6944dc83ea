"""Synthetic particle flows: radius graphs of any size for scaling and memory measurements.

Particles start uniformly at random in a box with the fluid benchmark's 1:2:1 shape, sized so that a
radius graph at ``radius`` has ``neighbors`` neighbours per node on average (Fluid113K: 113K particles,
r = 0.075, ~24 neighbours, 1.7M edges). They are advected by a smooth, divergence-free velocity field
(a sum of a few random Fourier modes of a vector potential, u = ∇ × A) and reflected at the walls, so
consecutive frames are related by a learnable, deterministic flow and the graph changes slowly, as in a
fluid. It is not physics: it is a stand-in with a fluid's graph statistics for when the SPH data are too
slow to make, e.g. for the scaling study (``launch/scaling.py``).

Node scalars: ``type`` (all 0, as a single-phase fluid). Every scene draws from its own seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from dist_egnn.datasets.store import atomic_store, create_split, write_root_attrs, write_scenes
from dist_egnn.errors import ConfigError
from dist_egnn.keys import SPLITS

SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


@dataclass
class SyntheticConfig:
    """Size and motion of a synthetic particle store.

    Also the ``dataset.synthetic`` section of the Hydra schema (dist_egnn/config.py): the one definition of
    these keys.
    """

    num_particles: int = 113_000    # particles per scene
    neighbors: float = 24.0         # mean radius-graph degree the box is sized for
    radius: float = 0.075           # the radius the box is sized for (the store's radius)
    train: int = 1                  # training scenes
    val: int = 1                    # validation scenes
    test: int = 1                   # test scenes
    frames: int = 12                # stored frames per scene
    dt: float = 0.02                # time between stored frames (50 fps)
    speed: float = 0.5              # typical flow speed, box lengths are O(1)
    modes: int = 4                  # random Fourier modes of the vector potential
    substeps: int = 4               # midpoint (RK2) integration steps per stored frame
    seed: int = 0                   # every scene draws from (seed, split, scene index)

    @property
    def box(self) -> np.ndarray:
        """(3,) side lengths a, 2a, a with N·(4/3)πr³ / volume = neighbors."""
        volume = self.num_particles * 4.0 / 3.0 * np.pi * self.radius**3 / self.neighbors
        a = (volume / 2.0) ** (1.0 / 3.0)
        return np.array([a, 2 * a, a])


def velocity_field(rng: np.random.Generator, cfg: SyntheticConfig):
    """u(x) = ∇ × A(x) with A = Σ_k c_k sin(w_k·x + φ_k): divergence-free, smooth on the box scale."""
    box = cfg.box
    waves = rng.normal(size=(cfg.modes, 3)) * (2 * np.pi / box.min())
    amplitude = rng.normal(size=(cfg.modes, 3))
    phase = rng.uniform(0, 2 * np.pi, size=cfg.modes)
    scale = cfg.speed / np.sqrt(cfg.modes) / np.linalg.norm(waves, axis=1).mean()

    def u(x: np.ndarray) -> np.ndarray:
        arg = x @ waves.T + phase                                     # (n, K)
        # curl of c sin(w·x + φ) = cos(w·x + φ) (w × c)
        return scale * np.cos(arg) @ np.cross(waves, amplitude)

    return u


def simulate_scene(cfg: SyntheticConfig, split: str, scene: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and velocities (T, n, 3) float32 of one scene."""
    rng = np.random.default_rng([cfg.seed, SPLIT_SEED_OFFSET[split], scene])
    box = cfg.box
    x = rng.uniform(0, 1, size=(cfg.num_particles, 3)) * box
    u = velocity_field(rng, cfg)
    pos = np.empty((cfg.frames, cfg.num_particles, 3), np.float32)
    vel = np.empty_like(pos)
    h = cfg.dt / cfg.substeps
    for t in range(cfg.frames):
        pos[t], vel[t] = x, u(x)
        for _ in range(cfg.substeps):                                  # midpoint (RK2) steps
            x = x + h * u(x + 0.5 * h * u(x))
            x = np.where(x < 0, -x, x)                                 # reflect at the walls
            x = np.where(x > box, 2 * box - x, x)
    return pos, vel


def generate_synthetic(path: str | Path, cfg: SyntheticConfig, dataset: str = "synthetic",
                       overwrite: bool = False, progress: bool = True) -> Path:
    """Write a store of synthetic flows at ``path`` atomically (layout: ``datasets.store``)."""
    if cfg.num_particles < 2 or cfg.frames < 2:
        raise ConfigError(f"synthetic: need at least 2 particles and 2 frames, got {cfg}")
    bar = tqdm(total=cfg.train + cfg.val + cfg.test, desc=f"making {dataset}", unit="scene", disable=not progress)
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="synthetic", dt=cfg.dt,
                         units={"length": "box", "time": "s"}, radius=cfg.radius, node_scalars=["type"],
                         generator=dict(asdict(cfg), generator="datasets.synthetic"))
        for split in SPLITS:
            count = getattr(cfg, split)
            group = create_split(root, split, [cfg.num_particles] * count, cfg.frames, num_scalars=1)
            for scene in range(count):
                pos, vel = simulate_scene(cfg, split, scene)
                write_scenes(group, scene, pos[None], vel[None], np.zeros((1, cfg.num_particles, 1), np.float32))
                bar.update(1)
    bar.close()
    return Path(path)
