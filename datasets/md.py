"""Protein molecular dynamics through MDAnalysis: any topology + trajectories MDAnalysis reads -> a store.

Built-in example (``dataset=protein_adk``): the adenylate kinase (AdK) trajectories shipped with
MDAnalysisTests, the protein of docs/maths.md §6: topology ``adk.psf`` (3,341 atoms, CHARMM charges) with the two
DIMS closed→open transitions ``adk_dims.dcd`` (98 frames) and ``adk_dims2.dcd`` (102 frames), nominal frame
interval 1 ps. Their backbone (N, CA, C, O) is 855 atoms, the node count of docs/maths.md §6.

Paths: a plain path, or ``MDAnalysisTests:NAME`` for a file of ``MDAnalysisTests.datafiles`` (e.g.
``MDAnalysisTests:PSF``). ``topology`` is one path for every trajectory or a list with one per trajectory.

What is stored, per trajectory (a scene):

- positions of the selected atoms (``selection``: ``backbone``, ``all``, or any MDAnalysis selection string),
  in Å, every ``stride``-th frame; no unwrapping across periodic boundaries is done: a trajectory wrapped into
  its box (an atom moving over half a box length between stored frames) is refused with the fix
  (:func:`check_unwrapped`): ``unwrap: true`` applies MDAnalysis's NoJump transformation, which follows every
  file frame in order (also those ``stride`` skips) and moves each atom by the image nearest its last position;
- velocities in Å/ps: from the file when every frame carries them (``velocities: file``, or ``auto``),
  otherwise forward differences v(t) = (x(t + 1) − x(t)) / Δt over stored frames (docs/maths.md §6; with the
  nominal 1 ps of the DIMS files this is exactly x(t + 1) − x(t)); the last frame, which has no successor,
  is dropped. With such velocities a task Δt of one stored frame (``dataset.delta_t=1``) makes the target
  x(t + 1) = x(t) + v(t)·Δt a function of the input: training warns (:func:`trivial_target`);
- the frame interval: the file's own, or ``dt`` (ps between the files' frames, before ``stride``) when
  given. Formats that carry none (AMBER ``.mdcrd``, for which MDAnalysis would silently assume 1 ps; NetCDF
  files whose time variable is 0) stop with an error asking for ``dataset.md.dt``;
- node scalar ``charge``: the topology's partial charges in e (0 when the topology has none, with a note).

Splits (``split``):

- ``time`` (default): every trajectory is cut into consecutive blocks of ``split_fractions`` of its frames,
  first block train, then val, then test; each split holds one scene per trajectory. Train never sees the
  later frames, which are the part a model must extrapolate to.
- ``trajectory``: whole trajectories per split, in the given order, by ``split_fractions`` of their number
  (at least one each, so at least three trajectories).

Scenes of one split share a frame count (``datasets/store.py``), so longer blocks are cut to the shortest
one of their split; the generator attributes record every cut.

Δt and cutoff (docs/maths.md §6: 15 frames, 10 Å, on one long equilibrium trajectory): the radius stays 10 Å. The
built-in trajectories have about 100 frames, so a 60/20/20 time split leaves val and test blocks of 19 to 20
frames; ``protein_adk`` therefore uses Δt = 5 frames (15 would leave at most 5 samples per val/test
block). With longer trajectories set ``dataset.delta_t=15``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_egnn.datasets.store import StoreError, atomic_store, create_split, write_root_attrs
from dist_egnn.errors import BadInput
from dist_egnn.keys import SPLITS

SELECTIONS = {"backbone": "backbone", "all": "all"}
USUAL_SELECTIONS = "protein, backbone, nucleic"
VELOCITY_SOURCES = ("auto", "file", "difference")
SPLIT_MODES = ("time", "trajectory")
NODE_SCALARS = ["charge"]
TESTS_PREFIX = "MDAnalysisTests:"


@dataclass
class MDConfig:
    """Parameters of one MD store; defaults: the built-in AdK example (the MDAnalysisTests trajectories).

    Also the ``dataset.md`` section of the Hydra schema (dist_egnn/config.py): the one definition of these keys.
    """

    topology: Any = "MDAnalysisTests:PSF"            # a path (or MDAnalysisTests:NAME) for all, or a list (one each)
    trajectories: list[str] = field(default_factory=lambda: ["MDAnalysisTests:DCD", "MDAnalysisTests:DCD2"])  # files
    selection: str = "backbone"                      # backbone | all | an MDAnalysis selection string
    velocities: str = "auto"                         # auto | file | difference
    split: str = "time"                              # time | trajectory
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train, val, test shares
    stride: int = 1                                  # keep every stride-th frame of the files
    dt: float | None = None                          # ps between the files' frames; None: the files' own
                                                     # (required for formats without one: .mdcrd, NetCDF at 0)
    frames_per_write: int = 64                       # frames buffered per write (memory vs. write count)
    unwrap: bool = False                             # undo wrapping into the periodic box (MDAnalysis NoJump)


def resolve_path(path: str) -> str:
    """A file path, with ``MDAnalysisTests:NAME`` looked up in ``MDAnalysisTests.datafiles``."""
    path = str(path)
    if path.startswith(TESTS_PREFIX):
        name = path[len(TESTS_PREFIX):]
        try:
            import MDAnalysisTests.datafiles as datafiles
        except ImportError as err:
            raise BadInput(f"{path}: MDAnalysisTests is not installed; pip install -e '.[md]' "
                             f"or give the file's path instead") from err
        if not hasattr(datafiles, name):
            raise BadInput(f"{path}: MDAnalysisTests.datafiles has no file named {name!r} "
                             f"(e.g. PSF, DCD, DCD2, GRO, TRR)")
        return str(getattr(datafiles, name))
    return path


def open_universe(topology: str, trajectory: str):
    """An MDAnalysis Universe, with errors that name the file and say what to do."""
    import warnings

    import MDAnalysis as mda

    for kind, path, key in (("topology", topology, "topology"), ("trajectory", trajectory, "trajectories")):
        if not Path(path).exists():
            raise StoreError(f"{path}: {kind} file does not exist; fix dataset.md.{key}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return mda.Universe(topology, trajectory)
    except Exception as err:  # MDAnalysis raises ValueError, TypeError, OSError... by format
        raise StoreError(f"MDAnalysis cannot read topology {topology} with trajectory {trajectory} "
                         f"({type(err).__name__}: {err}); give files in a format MDAnalysis reads "
                         f"(PSF/PDB/GRO/TPR topologies; DCD/XTC/TRR/NetCDF trajectories, ...)") from err


def frame_interval(traj, path: str, override: float | None) -> float:
    """ps between a trajectory's frames: ``override`` (``dataset.md.dt``) when given, else the file's own;
    a file that carries none (MDAnalysis warns "no dt information" and assumes 1 ps, or reads 0) is refused."""
    import warnings

    if override is not None:
        if not (np.isfinite(override) and override > 0):
            raise BadInput(f"dataset.md.dt={override}: must be a positive number of picoseconds between frames")
        return float(override)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dt = float(traj.dt)
    if any("no dt information" in str(w.message) for w in caught):
        why = "MDAnalysis finds no time information in it and would assume 1 ps"
    elif not np.isfinite(dt) or dt <= 0:
        why = f"its frames are {dt!r} ps apart"
    else:
        return dt
    raise BadInput(f"{path}: the file carries no time step ({why}); give the time between its frames with "
                   f"dataset.md.dt=PS (picoseconds, before dataset.md.stride), e.g. dataset.md.dt=2.0")


def trivial_target(attrs: dict[str, Any], delta_t: int) -> str | None:
    """Why the task is trivial, or None: an MD store whose velocities are forward differences over one stored
    frame, with a task Δt of that one frame, has target x(t + 1) = x(t) + v(t)·Δt, a function of the input."""
    generator = attrs.get("generator") or {}
    from_file = generator.get("velocities_from_file")
    if attrs.get("source") != "md" or delta_t != 1 or from_file is None or all(from_file):
        return None
    return (f"dataset.delta_t=1 on {attrs.get('dataset')!r}, whose velocities are forward differences over one "
            f"stored frame: the target x(t+1) = x(t) + v(t)·dt is the input's constant-velocity step, nothing is "
            f"left to learn; use dataset.delta_t >= 2 or velocities from the file (dataset.md.velocities=file)")


@dataclass
class _Trajectory:
    topology: str
    path: str
    universe: Any
    atoms: Any
    frames: int          # stored frames after stride and (for differences) dropping the last
    dt: float            # ps between stored frames
    stride: int          # file frames per stored frame
    from_file: bool      # velocities read from the file
    unwrap: bool = False  # NoJump applied: every file frame is read in order (it unwraps by the move since the last)


def _open_all(cfg: MDConfig) -> list[_Trajectory]:
    paths = [resolve_path(p) for p in cfg.trajectories]
    if not paths:
        raise BadInput("dataset.md.trajectories is empty: give at least one trajectory file")
    tops = cfg.topology if isinstance(cfg.topology, (list, tuple)) else [cfg.topology]
    tops = [resolve_path(t) for t in (tops if len(tops) > 1 else tops * len(paths))]
    if len(tops) != len(paths):
        raise BadInput(f"dataset.md.topology lists {len(tops)} files for {len(paths)} trajectories: "
                         f"give one topology for all, or one per trajectory")
    if cfg.velocities not in VELOCITY_SOURCES:
        raise BadInput(f"dataset.md.velocities={cfg.velocities!r}: choose one of {VELOCITY_SOURCES}")
    if cfg.stride < 1:
        raise BadInput(f"dataset.md.stride={cfg.stride}: must be >= 1")
    selection = SELECTIONS.get(cfg.selection, cfg.selection)
    out = []
    for top, path in zip(tops, paths):
        universe = open_universe(top, path)
        try:
            atoms = universe.select_atoms(selection)
        except Exception as err:
            raise BadInput(f"dataset.md.selection={cfg.selection!r} is not a valid MDAnalysis selection "
                             f"({err}); the usual ones are {USUAL_SELECTIONS}, or e.g. 'protein and name CA'") from err
        if atoms.n_atoms == 0:
            raise BadInput(f"dataset.md.selection={cfg.selection!r} selects no atom of {top} "
                           f"({universe.atoms.n_atoms} atoms); the usual ones are {USUAL_SELECTIONS} "
                           f"(or all)")
        traj = universe.trajectory
        has_file_velocities = bool(traj.ts.has_velocities)
        if cfg.velocities == "file" and not has_file_velocities:
            raise BadInput(f"{path}: holds no velocities, but dataset.md.velocities=file; use auto or difference")
        from_file = has_file_velocities and cfg.velocities != "difference"
        frames = len(range(0, len(traj), cfg.stride)) - (0 if from_file else 1)
        if frames < 2:
            raise BadInput(f"{path}: {len(traj)} frames (stride {cfg.stride}) leave {frames} stored frames; "
                             f"need at least 2 (lower dataset.md.stride)")
        dt = frame_interval(traj, path, cfg.dt) * cfg.stride
        if cfg.unwrap:
            from MDAnalysis.transformations.nojump import NoJump

            try:
                traj.add_transformations(NoJump())
            except Exception as err:  # MDAnalysis raises several types (no box, a box it cannot orthonormalise)
                raise BadInput(f"{path}: dataset.md.unwrap=true, but MDAnalysis's NoJump cannot unwrap it "
                               f"({type(err).__name__}: {err}); it needs a periodic box in every frame, or unwrap "
                               f"the file first (e.g. gmx trjconv -pbc nojump) and leave unwrap out") from err
        out.append(_Trajectory(top, path, universe, atoms, frames, dt, cfg.stride, from_file, cfg.unwrap))
    dts = [t.dt for t in out]
    if max(dts) > min(dts) * (1 + 1e-3):
        raise BadInput("trajectories have different frame intervals ("
                         + ", ".join(f"{Path(t.path).name}: {t.dt:g} ps" for t in out)
                         + "); one store has one Δt: use trajectories of one kind, or strides that equalise them")
    return out


def _layout(cfg: MDConfig, trajs: list[_Trajectory]) -> tuple[dict[str, list[tuple[int, int, int]]], list[str]]:
    """Per split, its scenes as (trajectory index, first stored frame, frame count), counts equal per split;
    and a note for every block cut to the shortest of its split."""
    fractions = np.asarray(cfg.split_fractions, dtype=float)
    if len(fractions) != 3 or np.any(fractions <= 0):
        raise BadInput(f"dataset.md.split_fractions={list(cfg.split_fractions)}: give three positive numbers "
                         f"(train, val, test)")
    fractions = fractions / fractions.sum()
    layout: dict[str, list[tuple[int, int, int]]] = {s: [] for s in SPLITS}
    if cfg.split == "time":
        for k, t in enumerate(trajs):
            n_train = int(round(fractions[0] * t.frames))
            n_val = int(round(fractions[1] * t.frames))
            bounds = [0, n_train, n_train + n_val, t.frames]
            for s, split in enumerate(SPLITS):
                layout[split].append((k, bounds[s], bounds[s + 1] - bounds[s]))
    elif cfg.split == "trajectory":
        if len(trajs) < 3:
            raise BadInput(f"dataset.md.split=trajectory needs at least 3 trajectories (one per split), got "
                             f"{len(trajs)}; add trajectories or use split=time")
        n_val = max(1, int(round(fractions[1] * len(trajs))))
        n_test = max(1, int(round(fractions[2] * len(trajs))))
        n_train = len(trajs) - n_val - n_test
        if n_train < 1:
            raise BadInput(f"dataset.md.split_fractions={list(cfg.split_fractions)} leaves no training trajectory")
        owner = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
        for k, (t, split) in enumerate(zip(trajs, owner)):
            layout[split].append((k, 0, t.frames))
    else:
        raise BadInput(f"dataset.md.split={cfg.split!r}: choose one of {SPLIT_MODES}")
    notes = []
    for split, scenes in layout.items():
        shortest = min(count for _, _, count in scenes)
        if shortest < 2:
            raise BadInput(f"split {split} gets a block of {shortest} frames; need at least 2 "
                             f"(change dataset.md.split_fractions or use longer trajectories)")
        notes += [f"{split}: {Path(trajs[k].path).name} frames {first}..{first + count - 1} cut to the "
                  f"{shortest} of the split's shortest block" for k, first, count in scenes if count > shortest]
        layout[split] = [(k, first, shortest) for k, first, _ in scenes]
    return layout, notes


def _charges(traj: _Trajectory) -> tuple[np.ndarray, bool]:
    """The selected atoms' partial charges, and whether the topology has any (else zeros)."""
    from MDAnalysis.exceptions import NoDataError

    try:
        charges = traj.atoms.charges
    except NoDataError:  # what MDAnalysis 2.x raises for a topology without charges (e.g. PDB, GRO)
        return np.zeros(traj.atoms.n_atoms, np.float32), False
    return np.asarray(charges, dtype=np.float32), True


def generate_md(path: str | Path, cfg: MDConfig, dataset: str = "protein", overwrite: bool = False,
                progress: bool = True, radius: float | None = 10.0) -> Path:
    """Read every trajectory once, frame by frame, and write the store at ``path`` atomically."""
    from tqdm.auto import tqdm

    trajs = _open_all(cfg)
    layout, notes = _layout(cfg, trajs)
    charges = []
    for t in trajs:
        q, ok = _charges(t)
        charges.append(q)
        if not ok:
            notes.append(f"{Path(t.topology).name} has no partial charges: node scalar charge is 0")
    for note in notes:
        print(f"note: {note}")
    total = sum(t.frames for t in trajs)
    bar = tqdm(total=total, desc=f"reading {dataset}", unit="frame", disable=not progress)
    generator = dict(asdict(cfg), topology=[t.topology for t in trajs], trajectories=[t.path for t in trajs],
                     velocities_from_file=[t.from_file for t in trajs], notes=notes, reader="MDAnalysis",
                     layout={s: [[Path(trajs[k].path).name, first, count] for k, first, count in v]
                             for s, v in layout.items()})
    with atomic_store(path, overwrite=overwrite) as root:
        write_root_attrs(root, dataset=dataset, source="md", dt=trajs[0].dt,
                         units={"length": "angstrom", "time": "ps", "velocity": "angstrom/ps", "charge": "e"},
                         radius=radius, node_scalars=NODE_SCALARS, generator=generator)
        groups = {}
        for split, scenes in layout.items():
            group = create_split(root, split, [trajs[k].atoms.n_atoms for k, _, _ in scenes], scenes[0][2],
                                 num_scalars=len(NODE_SCALARS))
            ptr = group["scene_ptr"][:]
            for s, (k, _, _) in enumerate(scenes):
                group["node_scalars"][ptr[s]:ptr[s + 1]] = charges[k][:, None]
            groups[split] = (group, ptr)
        for k, traj in enumerate(trajs):
            # where each stored frame of this trajectory goes: (split group, scene's node slice, frame row)
            targets = {}
            for split, scenes in layout.items():
                for s, (owner, first, count) in enumerate(scenes):
                    if owner == k:
                        for row in range(count):
                            targets[first + row] = (split, s, row)
            _stream(traj, targets, groups, cfg.frames_per_write, bar)
    bar.close()
    return Path(path)


def _stream(traj: _Trajectory, targets: dict[int, tuple[str, int, int]], groups: dict, per_write: int, bar) -> None:
    """Read one trajectory frame by frame; buffer stored frames and write them in blocks."""
    buffers: dict[tuple[str, int], dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    previous = None
    stored = -1

    def flush(key: tuple[str, int]) -> None:
        rows = buffers.pop(key, {})
        if not rows:
            return
        group, ptr = groups[key[0]]
        nodes = slice(int(ptr[key[1]]), int(ptr[key[1] + 1]))
        order = sorted(rows)
        for lo in _runs(order):
            hi = lo[-1] + 1
            group["pos"][lo[0]:hi, nodes] = np.stack([rows[r][0] for r in lo])
            group["vel"][lo[0]:hi, nodes] = np.stack([rows[r][1] for r in lo])

    def put(index: int, pos: np.ndarray, vel: np.ndarray) -> None:
        target = targets.get(index)
        bar.update(1)
        if target is None:
            return
        split, scene, row = target
        key = (split, scene)
        buffers.setdefault(key, {})[row] = (pos, vel)
        if len(buffers[key]) >= per_write:
            flush(key)

    last = None
    reader = traj.universe.trajectory
    for frame in (reader if traj.unwrap else reader[::traj.stride]):
        if traj.unwrap and frame.frame % traj.stride:
            continue                                  # read, so that NoJump follows every move; not stored
        pos = traj.atoms.positions.astype(np.float32)
        if last is not None:
            check_unwrapped(traj.path, pos, last, frame.dimensions, frame.frame, traj.stride)
        last = pos
        if traj.from_file:
            stored += 1
            put(stored, pos, traj.atoms.velocities.astype(np.float32))
        else:
            if previous is not None:
                stored += 1
                put(stored, previous, ((pos.astype(np.float64) - previous) / traj.dt).astype(np.float32))
            previous = pos
    for key in list(buffers):
        flush(key)
    if stored + 1 != traj.frames:
        raise StoreError(f"{traj.path}: read {stored + 1} frames, expected {traj.frames}; the file may be truncated")


def check_unwrapped(path: str, pos: np.ndarray, last: np.ndarray, dimensions, frame: int, stride: int) -> None:
    """Refuse a trajectory wrapped into its periodic box: an atom crossing a face reappears at the other, a jump of
    a box length between two frames that would be stored as a velocity and a target. No atom moves half a box
    between two stored frames of a real trajectory, so such a move is a wrap, never physics."""
    if dimensions is None or not np.all(np.asarray(dimensions[:3]) > 0):
        return                                       # no periodic box recorded: nothing can wrap
    box = np.asarray(dimensions[:3], dtype=np.float64)
    moved = pos.astype(np.float64) - last
    jumps = np.argwhere(np.abs(moved) > box / 2)
    if len(jumps):
        atom, axis = (int(v) for v in jumps[0])
        raise StoreError(f"{path}: atom {atom} of the selection moves {moved[atom, axis]:.4g} Å along "
                         f"{'xyz'[axis]} between the file's frames {frame - stride} and {frame}, over half "
                         f"the periodic box ({box[axis]:.4g} Å; {len(jumps)} such moves in this frame): the "
                         f"coordinates are wrapped into the box, and the jump would be stored as a velocity and a "
                         f"target. Set dataset.md.unwrap=true (MDAnalysis's NoJump), or unwrap the file first (e.g. "
                         f"gmx trjconv -pbc nojump)")


def _runs(rows: list[int]) -> list[list[int]]:
    """Split sorted row numbers into runs of consecutive numbers."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][-1] + 1:
            runs[-1].append(r)
        else:
            runs.append([r])
    return runs


