"""Train EGNN or FastEGNN: ``python launch/train.py [overrides]``; see conf/config.yaml for the groups.

Prints the run directory at start and end; the run directory holds config.yaml, metrics.jsonl and
checkpoints/best.pt (see dist_egnn.train).
"""
from __future__ import annotations

import json
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from datasets.store import StoreError
from dist_egnn.config import register
from dist_egnn.train import Trainer

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    print(f"run directory: {run_dir}", flush=True)
    try:
        result = Trainer(cfg, run_dir).fit()
    except (StoreError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))
    print(f"run directory: {run_dir}")


if __name__ == "__main__":
    main()
