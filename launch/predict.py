"""Roll a trained model out: ``python launch/predict.py run=RUN_DIR steps=K [overrides]``.

    python launch/predict.py run=runs/nbody_small-fastegnn/<date> steps=10
    python launch/predict.py run=RUN_DIR steps=10 format=vtk                    # + .vtu frames for ParaView
    python launch/predict.py run=RUN_DIR steps=5 data=data/other.zarr split=val
    python launch/predict.py run=RUN_DIR steps=10 parts=2 halo=exact partition=spatial

Loads the run's ``config.yaml`` and ``checkpoints/best.pt``, rolls the model out K task steps on the test split
(feeding its predictions back, the graph rebuilt every step; P parts re-partitioned every step), and writes
``RUN_DIR/predict/``: ``rollout.json`` (per-step MSE and constant velocity's), ``rollout.zarr`` (dataset layout),
``rollout.png`` and, with ``format=vtk``, ``vtk/``. Options: ``launch/conf/predict.yaml`` and PredictConfig in
``dist_egnn/config.py``; what is done and written: ``dist_egnn.inference``.

Exit codes: 0 done; 2 bad input (one line naming the key or file and the fix; nothing written); 1 a bug.
"""
from __future__ import annotations

import shlex
import sys
import traceback

import hydra
from omegaconf import DictConfig

from dist_egnn.config import register
from dist_egnn.errors import BadInput
from dist_egnn.inference.predict import predict, summary
from dist_egnn.inference.rollout import velocity_gap_note
from dist_egnn.training import guard

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    command = shlex.join(["python", "launch/predict.py", *sys.argv[1:]])
    try:
        record = predict(cfg, command=command)
    except BadInput as err:  # a user's mistake (dist_egnn.errors): one line naming it and the fix
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(guard.EXIT_BAD_INPUT)
    except ValueError:  # any other is a bug, not bad input: keep its traceback
        traceback.print_exc()
        sys.exit(guard.EXIT_RANK_FAILED)
    print(summary(record))
    if record["stopped_early"]:
        print(f"note: {record['stopped_early']}")
    gap = velocity_gap_note(record["input_velocity_gap"], record["start_frame"] + record["delta_t"])
    if gap:
        print(f"note: {gap}")
    print(f"wrote {cfg.out or cfg.run + '/predict'}: rollout.json, rollout.zarr, rollout.png"
          + (", vtk/" if cfg.format == "vtk" else ""))


if __name__ == "__main__":
    main()
