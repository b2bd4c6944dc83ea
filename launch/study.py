"""Accuracy studies: ``python launch/study.py study=NAME [study.budget=paper] [study.seeds=[0,1,2]] [train=false]
[jobs=J] [keep_going=true]``.

Trains every run of a study (``launch/conf/study/NAME.yaml``) once per seed, each as its own
``launch/train.py`` process, and writes ``docs/results/<study>[-<budget>].{json,md,png}``; see
``dist_egnn.measure.study``.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from dist_egnn.config import register
from dist_egnn.measure import study

register()          # the study_schema that conf/study.yaml composes on (with base_config and scaling_schema)


@hydra.main(version_base="1.3", config_path="conf", config_name="study")
def main(cfg: DictConfig) -> None:
    study.run(cfg)


if __name__ == "__main__":
    main()
