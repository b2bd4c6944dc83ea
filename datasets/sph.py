"""SPH fluid scenes through SPlisHSPlasH's Python bindings (pysplishsplash), the simulator behind Water-3D and
Fluid113K (docs/maths.md §6).

Scene recipe (one scene = one trajectory), after the DistEGNN paper's Fluid113K:

- a static box of ``box`` = (width, height, depth) (default 5 × 10 × 5), x and z centred on 0, floor at y = 0,
  gravity −9.81 along y; particle radius ``particle_radius`` (0.025: spacing 0.05); DFSPH pressure solver,
  standard viscosity, CFL time stepping (steps of at most 5 ms), volume-map walls (Bender et al. 2019);
- one block of fluid: a regular lattice of ``nx × ny × nz`` ≈ ``num_particles`` particles whose side ratios
  are drawn in [1/aspect, aspect], turned by a uniformly random rotation about its centre (redrawn until
  the turned block fits in the box) and placed at a uniformly random position where the whole turned block
  lies inside the box, two particle radii from the walls; every particle starts with the same random
  velocity (uniform direction, speed uniform in [0, max_speed]);
- frames at ``fps`` (50): frame k is the state at exactly t = k / fps (the step before a frame time is
  shortened to land on it), k = 0 .. round(duration · fps) − 1; positions in m, velocities in m/s straight
  from the simulator (not finite differences);
- walls as particles (:func:`box_walls`, added when the store is assembled): the box's surface sampled on a
  lattice at the fluid's particle spacing 2r, ``wall_layers`` layers deep (the first on the faces, then every
  2r outward; the default 2 cover the SPH kernel support, 4r, of a fluid particle resting ~1.6r from a
  face), edges and corners filled.
  They are the same in every frame (velocity 0) and marked by the node scalar ``type`` = 1 (fluid 0), after
  the fluid's rows of each scene. The simulator itself keeps its volume-map walls (the particles are not
  fed back into it): SPlisHSPlasH's particle sampling of boundaries (Akinci et al. 2012) would change the
  boundary handling, and its Poisson-disk sampling gives one irregular layer, so a regular lattice is used.

Every scene draws its recipe from its own seed (``seed``, split, scene index), so a scene does not depend on
which worker ran it or whether the run was resumed. The simulator itself uses OpenMP and is not bitwise
reproducible across thread counts; the recipe is.

How a store is made (:func:`generate_sph`):

1. Each scene runs in its own Python subprocess (``python -m dist_egnn.datasets.sph_scene SPEC OUT``, a small module
   that imports only NumPy and the library): the library is a process-wide singleton and may crash
   (segfault) on a bad scene; a crash costs that scene a retry (``retries``), not the run. Scenes run in
   parallel through dask (``datasets.parallel.map_tasks``: threads that wait on the subprocesses, or the
   workers of a dask.distributed cluster), ``threads_per_scene`` OpenMP threads each.
2. A scene streams its frames into memory-mapped ``pos.npy``/``vel.npy`` in a temporary folder, renamed to
   ``<store>.work/<split>-<scene>`` when the scene is complete: the rename is the durable record that the
   scene is done. Its log is ``<store>.work/logs/<split>-<scene>.log``. Memory per subprocess: the
   simulator's state plus one frame.
3. When every scene is done, the scenes are copied a few frames at a time into the store (written to a
   temporary sibling, renamed into place: ``datasets.store.atomic_store``), and the work folder is deleted.

Interrupted or failed runs keep every completed scene; the same command resumes with the missing ones. The
work folder remembers the parameters it was made with: a re-run with other parameters stops with an error
instead of mixing scenes (``prepare.overwrite=true`` starts over). Run options (retries, timeout, threads)
may change between runs.

The walls' volume map is computed once per work folder (by the first scene, alone, before the others start)
and cached in ``<store>.work/scenes/Cache`` (SPlisHSPlasH's own cache), because it costs minutes for the
5 × 10 × 5 box. The walls are a unit cube written by :func:`unit_cube_obj`, scaled to the box.

Particles are read and written through ``FluidModel.getFieldBuffer(name)``, a NumPy view of the simulator's
own arrays (one copy per stored frame, instead of 10^5 ``getPosition(i)`` calls); z-sorting is switched
off so that row i is the same particle in every frame.

Importing ``pysplishsplash`` segfaults on some machines (its bundled GL dispatch library clashes with the
system one); ``dist_egnn.datasets.sph_scene.import_pysplishsplash`` loads the system ``libGLdispatch`` first, and only
subprocesses import the library at all, so a crash there never takes the parent down.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from dist_egnn.datasets.parallel import available_cores, map_tasks
from dist_egnn.datasets.store import WALL, StoreError, atomic_store, create_split, write_root_attrs
from dist_egnn.errors import BadInput, ConfigError
from dist_egnn.keys import SPLITS

SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}
RECIPE_VERSION = 1            # bump when the recipe changes the data: old work folders are then refused
NODE_SCALARS = ["type"]       # particle type: 0 = fluid (one phase here), 1 = wall (datasets.store)
ROTATION_TRIES = 100         # random rotations tried until the turned block fits in the box


@dataclass
class SPHConfig:
    """Parameters of one SPH store (see the module docstring for the recipe).

    Also the ``dataset.sph`` section of the Hydra schema (dist_egnn/config.py): the one definition of these
    keys, so fields keep OmegaConf types (int, float, str, bool, list, ``X | None``); derived values are
    properties and methods, which the schema ignores.
    """

    num_particles: int = 2000          # target particles per scene; the lattice gives within a few %
    train: int = 4                     # training scenes
    val: int = 1                       # validation scenes
    test: int = 1                      # test scenes
    duration: float = 1.0              # simulated seconds per scene
    fps: float = 50.0                  # stored frames per second
    box: list[float] = field(default_factory=lambda: [5.0, 10.0, 5.0])   # width, height, depth (m)
    particle_radius: float = 0.025     # m; particle spacing is twice this
    max_speed: float = 1.0             # initial block speed, m/s
    aspect: float = 1.5                # block side ratios in [1/aspect, aspect]
    viscosity: float = 0.01            # standard viscosity coefficient
    map_cell: float | None = None      # volume-map grid cell (m); None: the kernel support, 4 radii
    seed: int = 0                      # every scene's recipe is drawn from (seed, split, scene index)
    retries: int = 1                   # extra attempts for a scene whose subprocess crashed
    timeout_s: float | None = None     # wall-clock limit per scene attempt
    threads_per_scene: int | None = None  # OpenMP threads per scene; None: cores / parallel scenes
    wall_layers: int = 2               # wall particle layers outside each face (2: the kernel support); 0: none
    wall_reach: float | None = None    # m; keep a scene's walls that some fluid particle comes this close to
                                       # in some frame (>= the training radius); None: every wall particle

    @property
    def num_frames(self) -> int:
        return int(round(self.duration * self.fps))

    def scenes(self, split: str) -> int:
        return int(getattr(self, split))


# ----------------------------------------------------------------------------------------------- recipe
def scene_recipe(cfg: SPHConfig, split: str, scene: int) -> dict[str, Any]:
    """The random initial condition of one scene, from that scene's own seed (JSON-ready)."""
    rng = np.random.default_rng([cfg.seed, SPLIT_SEED_OFFSET[split], scene])
    spacing = 2.0 * cfg.particle_radius
    ratios = np.exp(rng.uniform(-np.log(cfg.aspect), np.log(cfg.aspect), size=3))
    ratios /= np.prod(ratios) ** (1.0 / 3.0)
    counts = np.maximum(1, np.round(cfg.num_particles ** (1.0 / 3.0) * ratios)).astype(int)
    nudges = np.array(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij")).reshape(3, -1).T
    candidates = np.maximum(1, counts + nudges)              # the lattice closest to num_particles
    counts = candidates[np.argmin(np.abs(np.prod(candidates, axis=1) - cfg.num_particles))]   # first of ties
    half = counts * spacing / 2.0                          # half extent of the lattice (cell-centred)
    box = np.asarray(cfg.box, dtype=float)
    for _ in range(ROTATION_TRIES):                        # a long block may fit only when turned some ways
        rotation = _random_rotation(rng)
        reach = np.abs(rotation) @ half                    # half extent of the turned block's bounding box
        lower = np.array([-box[0] / 2, 0.0, -box[2] / 2]) + reach + spacing
        upper = np.array([box[0] / 2, box[1], box[2] / 2]) - reach - spacing
        if np.all(lower <= upper):
            break
    else:
        raise ConfigError(f"sph: a block of {int(np.prod(counts))} particles ({np.round(2 * half, 2).tolist()} m) "
                         f"does not fit turned in the box {[float(b) for b in box]} m ({ROTATION_TRIES} random "
                         f"rotations tried); lower dataset.sph.num_particles or enlarge dataset.sph.box")
    centre = rng.uniform(lower, upper)
    direction = rng.normal(size=3)
    velocity = direction / np.linalg.norm(direction) * rng.uniform(0.0, cfg.max_speed)
    return dict(split=split, scene=scene, counts=counts.tolist(), num_particles=int(np.prod(counts)),
                rotation=rotation.tolist(), centre=centre.tolist(), velocity=velocity.tolist())


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random proper rotation (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def box_corners(box: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) corners of the box of ``box`` = (width, height, depth): [−w/2, w/2] × [0, h] × [−d/2, d/2],
    x and z centred on 0, the floor at y = 0 (where the scene, its walls and a rollout's container put it)."""
    w, h, d = (float(b) for b in box)
    return np.array([-w / 2, 0.0, -d / 2]), np.array([w / 2, h, d / 2])


def box_walls(box: list[float], particle_radius: float, layers: int) -> np.ndarray:
    """(M, 3) float32 wall particles of the box [−w/2, w/2] × [0, h] × [−d/2, d/2]: the points of a lattice of
    spacing 2r that lie on or outside its surface, ``layers`` deep (the first on the faces, the next 2r further
    out, ...), edges and corners included. Along a side that is not a whole number of spacings the nearest
    whole number of equal cells is used. Order: x, then y, then z (row-major over the lattice)."""
    if layers < 0:
        raise ConfigError(f"dataset.sph.wall_layers={layers}: must be >= 0 (0: no walls)")
    if layers == 0:
        return np.zeros((0, 3), np.float32)
    spacing = 2.0 * particle_radius
    lows, _ = box_corners(box)
    axes, inside = [], []
    for low, side in zip(lows, box):
        cells = max(1, int(round(side / spacing)))
        on = low + np.arange(cells + 1) * side / cells                 # the faces and the points between
        out = np.arange(1, layers) * spacing
        axes.append(np.concatenate([low - out[::-1], on, low + side + out]))
        interior = np.zeros(len(axes[-1]), bool)
        interior[layers:layers + cells - 1] = True                     # strictly between the two faces
        inside.append(interior)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    within = np.logical_and.reduce(np.meshgrid(*inside, indexing="ij")).reshape(-1)
    return grid[~within].astype(np.float32)


def wall_layer_of(walls: np.ndarray, box: list[float], particle_radius: float) -> np.ndarray:
    """(M,) int: the layer of each wall particle of :func:`box_walls`, 0 on the faces, k at k · 2r outside them
    (edges and corners: the farthest of their axes)."""
    lows, highs = box_corners(box)
    outside = np.maximum(lows - walls, walls - highs).max(axis=1)
    return np.rint(np.maximum(outside, 0.0) / (2.0 * particle_radius)).astype(int)


def warn_dropped_layers(walls: list[np.ndarray], cfg: SPHConfig) -> None:
    """A warning when ``wall_reach`` left out whole layers of ``wall_layers`` in every scene (``walls``: each
    scene's kept wall particles). The layers are there to stop a particle that a model pushes into a wall; one
    that no fluid particle came within the reach of in the simulation is dropped however many were asked for
    (fluid_small_walls: the fluid rests 0.035 m above the floor, so 0.075 m never reaches the layer 0.05 m below
    it, and two layers became one; docs/results/README.md)."""
    if cfg.wall_reach is None or cfg.wall_layers == 0:
        return
    kept = max((int(wall_layer_of(w, cfg.box, cfg.particle_radius).max()) + 1 for w in walls if len(w)), default=0)
    if kept == 0:
        warnings.warn(f"dataset.sph.wall_reach={cfg.wall_reach:g} keeps no wall particle in any scene: no fluid "
                      f"particle comes within {cfg.wall_reach:g} m of the box's faces, so the store has no walls; "
                      f"raise dataset.sph.wall_reach, or set it to null to keep them all", stacklevel=2)
    elif kept < cfg.wall_layers:
        spacing = 2.0 * cfg.particle_radius
        warnings.warn(f"dataset.sph.wall_reach={cfg.wall_reach:g} keeps {kept} of the {cfg.wall_layers} wall layers "
                      f"(dataset.sph.wall_layers) in every scene: no fluid particle comes within {cfg.wall_reach:g} m "
                      f"of layer {kept + 1}, {kept * spacing:g} m outside the faces, so a particle that a model moves "
                      f"past layer {kept} meets no wall behind it; to keep them raise dataset.sph.wall_reach to about "
                      f"{cfg.wall_reach + (cfg.wall_layers - kept) * spacing:g}", stacklevel=2)


def stop_time(cfg: SPHConfig) -> float:
    """Simulated time at which the run stops: just after the last frame."""
    return (cfg.num_frames - 1) / cfg.fps + 1e-4


def scene_file(cfg: SPHConfig, recipe: dict[str, Any], geometry: str) -> dict[str, Any]:
    """The SPlisHSPlasH scene (JSON) of one recipe. The block is created axis-aligned at the box centre;
    the subprocess turns, moves and launches it before the first step."""
    box = [float(b) for b in cfg.box]
    spacing = 2.0 * cfg.particle_radius
    extent = (np.asarray(recipe["counts"]) + 1) * spacing     # SPlisHSPlasH fills [start + d, end - d] every d
    start = np.array([0.0, box[1] / 2, 0.0]) - extent / 2
    cell = cfg.map_cell or 4.0 * cfg.particle_radius
    return {
        "Configuration": {
            "particleRadius": cfg.particle_radius, "simulationMethod": 4, "gravitation": [0.0, -9.81, 0.0],
            "timeStepSize": 0.005, "cflMethod": 1, "cflFactor": 1, "cflMaxTimeStepSize": 0.005,
            "boundaryHandlingMethod": 2, "enableZSort": False,   # z-sort would reorder particles between frames
            "stopAt": stop_time(cfg),
            "DFSPH": {"minIterations": 2, "maxIterations": 100, "maxError": 0.05, "maxIterationsV": 100,
                      "maxErrorV": 0.1, "enableDivergenceSolver": True},
        },
        "Materials": [{"id": "Fluid", "density0": 1000, "viscosityMethod": 1, "viscosity": cfg.viscosity,
                       "maxEmitterParticles": 0}],
        "RigidBodies": [{"geometryFile": geometry, "translation": [0.0, box[1] / 2, 0.0],
                         "rotationAxis": [1, 0, 0], "rotationAngle": 0, "scale": box, "isDynamic": False,
                         "isWall": True, "mapInvert": True, "mapThickness": 0.0,
                         "mapResolution": [max(4, int(np.ceil(b / cell))) for b in box]}],
        "FluidBlocks": [{"denseMode": 0, "start": start.tolist(), "end": (start + extent).tolist()}],
    }


# ------------------------------------------------------------------------------------------- subprocess
def simulator_available(timeout: float = 120.0) -> tuple[bool, str]:
    """Whether pysplishsplash imports here (probed in a subprocess, since a failed import may segfault)."""
    probe = "from datasets.sph_scene import import_pysplishsplash; import_pysplishsplash()"
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=timeout,
                              cwd=_repo_root(), env=_child_env(1))
    except subprocess.TimeoutExpired:
        return False, f"importing pysplishsplash took more than {timeout:.0f} s"
    if proc.returncode == 0:
        return True, "pysplishsplash imports"
    what = (f"the import crashed with signal {-proc.returncode}" if proc.returncode < 0
            else ((proc.stderr or proc.stdout).strip().splitlines() or [f"exit code {proc.returncode}"])[-1])
    return False, f"pysplishsplash does not import ({what}); install it with pip install -e '.[sph]'"


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[1])


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([_repo_root(), *filter(None, [env.get("PYTHONPATH")])])
    return env


# --------------------------------------------------------------------------------------------- parent
def work_folder(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".work")


def _scene_name(split: str, scene: int) -> str:
    return f"{split}-{scene:05d}"


def _generator_record(cfg: SPHConfig) -> dict[str, Any]:
    return dict(asdict(cfg), recipe_version=RECIPE_VERSION, simulator="SPlisHSPlasH via pysplishsplash")


# fields that do not change the simulated scenes: a resumed run may change them (walls are added on assembly)
_RUN_OPTIONS = ("retries", "timeout_s", "threads_per_scene", "wall_layers", "wall_reach")


def _data_keys(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _RUN_OPTIONS}


def _prepare_work(work: Path, cfg: SPHConfig, overwrite: bool) -> None:
    """Create the work folder, or check that an existing one was made with the same parameters."""
    record = _generator_record(cfg)
    marker = work / "generator.json"
    if work.exists() and overwrite:
        shutil.rmtree(work)
    if marker.exists():
        old = json.loads(marker.read_text())
        changed = sorted(k for k in set(_data_keys(old)) | set(_data_keys(record)) if old.get(k) != record.get(k))
        if changed:
            raise StoreError(f"{work} holds scenes of an interrupted run made with other parameters "
                             f"({', '.join(f'{k}: {old.get(k)!r} -> {record.get(k)!r}' for k in changed)}); "
                             f"restore them to resume, or pass prepare.overwrite=true (or delete {work}) to start over")
        return
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "scenes").mkdir(exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, marker)


def _geometry_file(work: Path) -> str:
    """A unit cube (OBJ, 12 triangles, outward normals) for the walls, written once into the work folder.

    The winding matters: with ``mapInvert`` the fluid lives inside the cube, and a cube whose triangles face
    inward would put every particle inside the wall (they then barely move).
    """
    path = work / "scenes" / "UnitBox.obj"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(unit_cube_obj())
        os.replace(tmp, path)
    return str(path.resolve())


def unit_cube_obj() -> str:
    """The OBJ text of the cube [-0.5, 0.5]^3 with counter-clockwise (outward-facing) triangles."""
    corners = np.array([(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    faces = []
    for axis in range(3):
        for side in (-0.5, 0.5):
            quad = [i for i in range(8) if corners[i, axis] == side]          # 4 corners of one face
            centre = corners[quad].mean(axis=0)
            u, v = [a for a in range(3) if a != axis]
            quad.sort(key=lambda i: np.arctan2(corners[i, v] - centre[v], corners[i, u] - centre[u]))
            for tri in ((quad[0], quad[1], quad[2]), (quad[0], quad[2], quad[3])):
                a, b, c = corners[list(tri)]
                if np.dot(np.cross(b - a, c - a), centre) < 0:                 # make the normal point outward
                    tri = (tri[0], tri[2], tri[1])
                faces.append(tri)
    return ("".join(f"v {x} {y} {z}\n" for x, y, z in corners)
            + "".join(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in faces))


def run_scene_task(task: dict[str, Any]) -> dict[str, Any]:
    """One dask task: run one scene's subprocess (with retries); report, never raise, a failure."""
    out = Path(task["out"])
    if out.exists():
        return dict(task, ok=True, attempts=0)
    log = Path(task["log"])
    error = ""
    for attempt in range(1, task["retries"] + 2):
        with open(log, "a") as sink:
            sink.write(f"--- attempt {attempt}\n")
            sink.flush()
            try:
                proc = subprocess.run(scene_command(task["spec"], task["out"]), stdout=sink, stderr=subprocess.STDOUT,
                                      cwd=_repo_root(), env=_child_env(task["threads"]), timeout=task["timeout_s"])
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        if code == 0 and out.exists():
            return dict(task, ok=True, attempts=attempt)
        error = (f"timed out after {task['timeout_s']} s" if code is None
                 else f"crashed with signal {-code}" if code < 0
                 else f"exited with code {code}" if code else "exited without writing its output")
        for stale in out.parent.glob(f".{out.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
    return dict(task, ok=False, attempts=task["retries"] + 1, error=error, tail=_tail(log))


def _tail(log: Path, lines: int = 5) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def scene_command(spec_path: str, out_path: str) -> list[str]:
    """The command line of one scene's subprocess (this worker's Python)."""
    return [sys.executable, "-m", "dist_egnn.datasets.sph_scene", str(spec_path), str(out_path)]


def scene_task(cfg: SPHConfig, recipe: dict[str, Any], work: Path, name: str, threads: int) -> dict[str, Any]:
    """Write one scene's SPlisHSPlasH scene file and subprocess spec into ``work``; return its task.

    Scenes that share ``work`` share the walls' volume-map cache (``work/scenes/Cache``).
    """
    (work / "scenes").mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    spec_path = work / "scenes" / f"{name}.spec.json"
    scene_path = work / "scenes" / f"{name}.json"
    out = work / name
    if not out.exists():
        scene_path.write_text(json.dumps(scene_file(cfg, recipe, _geometry_file(work)), indent=1))
        spec_path.write_text(json.dumps(dict(recipe=recipe, num_frames=cfg.num_frames, fps=cfg.fps,
                                             scene_file=str(scene_path.resolve()), stop_at=stop_time(cfg),
                                             output=str((work / "scenes" / f"output-{name}").resolve()))))
    return dict(name=name, out=str(out), log=str(work / "logs" / f"{name}.log"), spec=str(spec_path),
                threads=threads, retries=cfg.retries, timeout_s=cfg.timeout_s, num_particles=recipe["num_particles"])


def _scene_tasks(cfg: SPHConfig, work: Path, threads: int) -> list[dict[str, Any]]:
    return [scene_task(cfg, scene_recipe(cfg, split, scene), work, _scene_name(split, scene), threads)
            for split in SPLITS for scene in range(cfg.scenes(split))]


def generate_sph(path: str | Path, cfg: SPHConfig, dataset: str = "fluid", overwrite: bool = False,
                 progress: bool = True, scheduler: str = "auto", workers: int | None = None,
                 cluster: str | None = None, radius: float | None = 0.075) -> Path:
    """Simulate every scene (resuming an interrupted run) and write a validated-layout store at ``path``.

    ``radius`` is stored as the store's default radius-graph cutoff.
    """
    path = Path(path).absolute()           # subprocesses run in the repository root
    if path.exists() and not overwrite:
        raise StoreError(f"{path} already exists; delete it or pass prepare.overwrite=true to replace it")
    if cfg.wall_reach is not None and not cfg.wall_reach > 0:
        raise ConfigError(f"dataset.sph.wall_reach={cfg.wall_reach}: must be > 0 (a distance in m, at least the "
                         f"training radius), or null to keep every wall particle")
    if cluster is None:                    # on a cluster the workers' environment is what counts
        ok, reason = simulator_available()
        if not ok:
            raise BadInput(f"cannot simulate dataset {dataset!r}: {reason}")
    if cfg.num_frames < 2:
        raise ConfigError(f"sph: duration {cfg.duration} s at {cfg.fps} fps gives {cfg.num_frames} frames; "
                         f"need at least 2 (raise dataset.sph.duration)")
    for split in SPLITS:                       # every recipe must fit before anything is written
        for scene in range(cfg.scenes(split)):
            scene_recipe(cfg, split, scene)
    work = work_folder(path)
    _prepare_work(work, cfg, overwrite)
    parallel = workers or available_cores()
    threads = cfg.threads_per_scene or max(1, available_cores() // parallel)
    tasks = _scene_tasks(cfg, work, threads)
    pending = [t for t in tasks if not Path(t["out"]).exists()]
    if len(pending) < len(tasks):
        print(f"resuming {dataset}: {len(tasks) - len(pending)} of {len(tasks)} scenes already simulated in {work}")
    print(f"simulating {len(pending)} scenes of ~{cfg.num_particles} particles x {cfg.num_frames} frames "
          f"(logs: {work / 'logs'})", flush=True)
    failed = []
    if pending and not any((work / "scenes" / "Cache").glob("*.cdm")):
        # the first scene computes the walls' volume map; the others then read it from the cache
        first = dict(pending[0], threads=cfg.threads_per_scene or available_cores())   # alone: every core
        failed += [r for _, r in map_tasks(run_scene_task, [first], scheduler="sync", progress=progress,
                                           desc=f"simulating {dataset} (first scene + wall map)", unit="scene")
                   if not r["ok"]]
        pending = pending[1:]
        if failed and not any((work / "scenes" / "Cache").glob("*.cdm")):
            pending = []          # no wall map: the others would all fail the same way (and race on the cache)
    if pending:
        failed += [r for _, r in map_tasks(run_scene_task, pending, scheduler=scheduler, workers=parallel,
                                           cluster=cluster, progress=progress, desc=f"simulating {dataset}",
                                           unit="scene") if not r["ok"]]
    if failed:
        lines = "\n".join(f"  {r['name']}: {r['error']} after {r['attempts']} attempt(s); log {r['log']}:\n"
                          f"    " + r["tail"].replace("\n", "\n    ") for r in failed)
        done = sum(Path(t["out"]).exists() for t in tasks)
        raise StoreError(f"{len(failed)} of {len(tasks)} scenes failed; {done} completed scenes are kept in {work} "
                         f"and the same command resumes with the rest:\n{lines}")
    missing = [t["name"] for t in tasks if not Path(t["out"]).exists()]
    if missing:                          # a scheduler that lost a task must not leave a store without it
        raise StoreError(f"{len(missing)} of {len(tasks)} scenes were never simulated ({', '.join(missing)}); the "
                         f"{len(tasks) - len(missing)} others are kept in {work} and the same command resumes with "
                         f"the rest")
    _assemble(path, work, cfg, dataset, radius, overwrite, progress)
    shutil.rmtree(work, ignore_errors=True)
    return path


def _assemble(path: Path, work: Path, cfg: SPHConfig, dataset: str, radius: float | None, overwrite: bool,
              progress: bool) -> None:
    """Copy the completed scenes into the store, a few frames at a time (memory: a few scene frames)."""
    from tqdm.auto import tqdm

    total = sum(cfg.scenes(s) for s in SPLITS)
    lattice = box_walls(cfg.box, cfg.particle_radius, cfg.wall_layers)
    bar = tqdm(total=total, desc=f"writing {path.name}", unit="scene", disable=not progress)
    kept_walls = []
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="sph", dt=1.0 / cfg.fps,
                         units={"length": "m", "time": "s", "velocity": "m/s"}, radius=radius,
                         node_scalars=NODE_SCALARS,
                         generator=dict(_generator_record(cfg), wall_particles=len(lattice),
                                        wall_spacing=2.0 * cfg.particle_radius))
        for split in SPLITS:
            folders = [work / _scene_name(split, s) for s in range(cfg.scenes(split))]
            metas = [json.loads((f / "scene.json").read_text()) for f in folders]
            walls = [walls_within_reach(lattice, f, cfg.wall_reach) for f in folders]
            kept_walls += walls
            group = create_split(root, split, [m["num_particles"] + len(w) for m, w in zip(metas, walls)],
                                 cfg.num_frames, num_scalars=len(NODE_SCALARS))
            group.attrs["recipes"] = [dict(m["recipe"], steps=m["steps"], threads=m["threads"],
                                           simulation_s=round(float(m["simulation_s"]), 3),
                                           seconds_per_frame=m.get("seconds_per_frame"), num_walls=len(w))
                                      for m, w in zip(metas, walls)]
            for s, folder in enumerate(folders):
                _copy_scene(group, s, folder, walls[s])
                bar.update(1)
    bar.close()
    warn_dropped_layers(kept_walls, cfg)


def walls_within_reach(lattice: np.ndarray, folder: Path, reach: float | None) -> np.ndarray:
    """The wall particles of one scene: every lattice point (``reach`` None), or those that some fluid particle of
    the scene comes within ``reach`` of in some frame, in lattice order. No edge joins two walls
    (``datasets/graphs.py``), so a wall farther than the radius from every fluid particle in every frame sends
    and receives no message at any radius <= ``reach``; leaving it out changes only the means over all nodes
    (the centroid is over moving nodes; the virtual-node terms (5) and (7) count walls, docs/maths.md §8). That
    holds for the stored frames, not for a rollout, whose particles can go where no simulated one went: a reach
    that drops whole layers is warned about (:func:`warn_dropped_layers`)."""
    from scipy.spatial import cKDTree

    if reach is None or len(lattice) == 0:
        return lattice
    fluid = np.load(folder / "pos.npy", mmap_mode="r")              # (frames, particles, 3)
    frames, particles = fluid.shape[:2]
    block = max(1, 2_000_000 // max(particles, 1))                 # one tree over ~2M points at a time
    near = np.zeros(len(lattice), bool)
    for first in range(0, frames, block):
        points = np.asarray(fluid[first:first + block], np.float64).reshape(-1, 3)
        distance, _ = cKDTree(points).query(lattice[~near], k=1, distance_upper_bound=reach * (1 + 1e-6))
        near[np.flatnonzero(~near)[np.isfinite(distance)]] = True
    return lattice[near]


def _copy_scene(group: zarr.Group, index: int, folder: Path, walls: np.ndarray, frames_per_write: int = 8) -> None:
    """One scene's rows: its fluid particles (every frame from the work folder), then the walls (the same
    positions in every frame, velocity 0, type 1)."""
    ptr = group["scene_ptr"]
    start, stop = int(ptr[index]), int(ptr[index + 1])
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ("pos", "vel")}
    frames, fluid = arrays["pos"].shape[:2]
    if stop - start != fluid + len(walls):
        raise StoreError(f"{folder}: {fluid} particles + {len(walls)} wall particles, but scene {index} of "
                         f"{group.path} has {stop - start} rows; prepare again with prepare.overwrite=true")
    still = {"pos": walls, "vel": np.zeros_like(walls)}
    for first in range(0, frames, frames_per_write):
        last = min(first + frames_per_write, frames)
        for name, values in arrays.items():
            block = np.empty((last - first, stop - start, 3), np.float32)
            block[:, :fluid] = values[first:last]
            block[:, fluid:] = still[name]
            group[name][first:last, start:stop] = block
    types = np.zeros((stop - start, len(NODE_SCALARS)), np.float32)
    types[fluid:, NODE_SCALARS.index("type")] = WALL
    group["node_scalars"][start:stop] = types
