"""One SPH scene in its own process: ``python -m dist_egnn.datasets.sph_scene SPEC.json OUT_FOLDER``.

The subprocess side of ``datasets/sph.py`` (read that first). It imports only NumPy and pysplishsplash,
so it starts in about a second. Output, written into a temporary sibling and renamed to OUT_FOLDER only
when every frame is in it (the rename is the durable "scene done" record)::

    OUT_FOLDER/pos.npy    (T, n, 3) float32   positions, frame k at t = k / fps
    OUT_FOLDER/vel.npy    (T, n, 3) float32   velocities from the simulator
    OUT_FOLDER/scene.json recipe, particle count, steps taken, wall time, threads

Frames go straight to memory-mapped .npy files, so memory is the simulator's state plus one frame.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np

FRAME_TOLERANCE_S = 1e-5     # a step ending this close before a frame time records the frame (float32 clock)


def import_pysplishsplash():
    """Import pysplishsplash safely: load the system libGLdispatch globally first.

    pysplishsplash bundles its own GL dispatch library, which clashes with the system one on some machines
    and segfaults the import; loading the system library first (RTLD_GLOBAL) avoids it.
    """
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("GLdispatch")
    if library:
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    import pysplishsplash

    return pysplishsplash


def simulate_scene(spec_path: str | Path, out_path: str | Path) -> None:
    """Run the scene described by ``spec_path`` (written by ``datasets.sph``) and write it to ``out_path``."""
    spec = json.loads(Path(spec_path).read_text())
    recipe, frames, fps = spec["recipe"], int(spec["num_frames"]), float(spec["fps"])
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.partial-{uuid.uuid4().hex[:8]}")
    sph = import_pysplishsplash()
    base = sph.Exec.SimulatorBase()
    base.init(useGui=False, outputDir=spec["output"], sceneFile=spec["scene_file"], stopAt=spec["stop_at"])
    base.initSimulation()                                  # creates the particles (the walls come later)
    fluid = sph.Simulation.getCurrent().getFluidModel(0)
    n = fluid.numActiveParticles()
    if n != recipe["num_particles"]:
        raise RuntimeError(f"SPlisHSPlasH made {n} particles, the recipe expects {recipe['num_particles']}")

    def field(name: str) -> np.ndarray:
        """A view of the simulator's own array (the buffer has spare rows past the active particles)."""
        return np.asarray(fluid.getFieldBuffer(name))[:n]

    pos, pos0, vel = field("position"), field("position0"), field("velocity")
    rotation = np.asarray(recipe["rotation"], dtype=np.float64)
    centre = pos.astype(np.float64).mean(axis=0)
    turned = (pos.astype(np.float64) - centre) @ rotation.T + np.asarray(recipe["centre"])
    pos[:] = turned                                         # turn and move the block, launch it
    pos0[:] = turned
    vel[:] = np.asarray(recipe["velocity"], dtype=np.float32)

    tmp.mkdir(parents=True)
    out = {name: np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.float32, shape=(frames, n, 3))
           for name in ("pos", "vel")}
    clock = sph.TimeManager.getCurrent()
    state = {"frame": 0, "steps": 0}
    recorded_at = []                                        # wall clock of every frame, for timing

    def record() -> None:
        k = state["frame"]
        out["pos"][k] = field("position")
        out["vel"][k] = field("velocity")
        state["frame"] = k + 1
        recorded_at.append(time.perf_counter())

    record()                                                # frame 0: the initial state

    def after_step() -> None:
        """After every step: record the frame that is due, shorten the next step to land on the next frame."""
        state["steps"] += 1
        if state["frame"] >= frames:
            return
        now = clock.getTime()
        if now >= state["frame"] / fps - FRAME_TOLERANCE_S:
            record()
            print(f"frame {state['frame']}/{frames} t={now:.4f} steps={state['steps']}", flush=True)
        due = state["frame"] / fps
        if now + clock.getTimeStepSize() > due:
            clock.setTimeStepSize(max(due - now, 1e-6))

    base.setTimeStepCB(after_step)
    started = time.perf_counter()
    base.runSimulation()
    wall = time.perf_counter() - started
    base.cleanup()
    if state["frame"] != frames:
        raise RuntimeError(f"the simulation stopped after {state['frame']} of {frames} frames")
    for array in out.values():
        array.flush()
    if not np.all(np.isfinite(out["pos"][frames - 1])):
        raise RuntimeError("the simulation diverged: NaN or Inf positions in the last frame")
    stepping = recorded_at[-1] - recorded_at[1] if frames > 2 else float("nan")
    meta = dict(recipe=recipe, num_particles=n, num_frames=frames, steps=state["steps"],
                threads=int(os.environ.get("OMP_NUM_THREADS", 0)),
                simulation_s=wall,                          # includes loading (or building) the wall map
                seconds_per_frame=stepping / (frames - 2) if frames > 2 else None)   # frames 1 .. T-1 only
    (tmp / "scene.json").write_text(json.dumps(meta))
    out.clear()                                             # close the memory maps before the rename
    os.replace(tmp, out_path)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m dist_egnn.datasets.sph_scene SCENE_SPEC.json OUT_FOLDER  (see datasets/sph.py)",
              file=sys.stderr)
        return 2
    simulate_scene(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
