"""Create a dataset store: ``python launch/prepare.py dataset=NAME [overrides]``.

Writes ``<paths.data>/<dataset.name>.zarr`` (validated) with a progress bar; an existing store is
validated and kept unless ``prepare.overwrite=true``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from datasets.prepare import prepare_dataset
from datasets.store import StoreError, open_store
from dist_egnn.config import register

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    path = Path(cfg.dataset.store)
    try:
        if path.exists() and not cfg.prepare.overwrite:
            print(f"{path} exists; validating it (prepare.overwrite=true rebuilds it)")
        else:
            prepare_dataset(OmegaConf.to_container(cfg.dataset, resolve=True), path,
                            overwrite=cfg.prepare.overwrite, progress=cfg.trainer.progress)
        info = open_store(path, check_values=True)
    except (StoreError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    sizes = ", ".join(f"{s}: {m.num_scenes} scenes x {m.num_frames} frames" for s, m in info.splits.items())
    print(f"{path}: valid ({sizes})")


if __name__ == "__main__":
    main()
