"""Soak test: train for several hundred steps and record every rank's resident memory (RSS) after each step.

    python launch/soak.py [overrides]                                    one process
    torchrun --nproc-per-node P launch/soak.py engine=ddp distributed.parts=P [overrides]

Writes ``<run dir>/soak/``: per-rank CSVs, ``memory.png`` and ``summary.json``; see
``dist_egnn.measure.soak``.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from dist_egnn.config import register
from dist_egnn.errors import BadInput
from dist_egnn.measure import soak
from dist_egnn.parallel import runtime

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    overridden = {o.split("=")[0].lstrip("+") for o in HydraConfig.get().overrides.task}
    soak.run(cfg, Path(HydraConfig.get().runtime.output_dir), overridden)


if __name__ == "__main__":
    _env = runtime.DistEnv.from_environ()
    if _env.distributed and "DIST_EGNN_RUN_STAMP" not in os.environ:
        try:
            os.environ["DIST_EGNN_RUN_STAMP"] = runtime.shared_run_stamp(_env)
        except BadInput as _err:       # e.g. MASTER_PORT taken: one line; the launcher stops the other ranks
            print(f"error (rank {_env.rank}): {_err}", file=sys.stderr, flush=True)
            sys.exit(2)
    sys.argv = runtime.launcher_arguments(sys.argv, _env)
    main()
