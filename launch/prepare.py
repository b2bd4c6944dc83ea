"""Create a dataset store and its partitions: ``python launch/prepare.py dataset=NAME [overrides]``.

Writes ``<paths.data>/<dataset.name>.zarr`` (validated) with a progress bar; an existing store is
validated and kept unless ``prepare.overwrite=true``, and refused (exit 2, naming the keys) if it was made
with other generator parameters than the configuration's. Generation runs in parallel through dask
(``prepare.scheduler``, ``prepare.workers``; ``prepare.cluster=local`` or a dask.distributed scheduler
address runs it on a cluster). An interrupted SPH generation resumes when the command is run again.
With ``distributed.parts=P`` (P > 1) it also builds, or reuses when its inputs are unchanged, the
partition of every sample (``distributed.partition``, ``distributed.seed``) beside the store; see
``partitioners/artifacts.py``. It records the training split's normalisation statistics for the configured
``dataset.delta_t`` and frame range in the store's attributes (``datasets/statistics.py``) when they are not
there yet, the statistics ``trainer.normalization=rms`` scales by.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from dist_egnn.config import register
from dist_egnn.datasets.prepare import check_store_matches, prepare_dataset
from dist_egnn.datasets.statistics import ensure_statistics, statistics_key
from dist_egnn.datasets.store import StoreError, check_replaceable, check_store_path, open_store
from dist_egnn.errors import BadInput
from dist_egnn.partitioners.artifacts import prepare_partitions
from dist_egnn.training.setup import load_splits

register()


def prepare(cfg: DictConfig) -> None:
    """Make or validate the store; with distributed.parts > 1 also build or reuse its partitions."""
    path = Path(cfg.dataset.store)
    dataset = OmegaConf.to_container(cfg.dataset, resolve=True)
    check_store_path(path)                  # a dangling or looping link: refused before generating anything
    if cfg.prepare.overwrite:
        check_replaceable(path)             # a folder that is not a store: refused before generating, not after
    if path.exists() and not cfg.prepare.overwrite:
        print(f"{path} exists; validating it (prepare.overwrite=true rebuilds it)")
        check_store_matches(dataset, open_store(path))   # made with these generator parameters?
    else:
        prepare_dataset(dataset, path,
                        overwrite=cfg.prepare.overwrite, progress=cfg.trainer.progress,
                        scheduler=cfg.prepare.scheduler, workers=cfg.prepare.workers, cluster=cfg.prepare.cluster)
    info = open_store(path, check_values=True)
    sizes = ", ".join(f"{s}: {m.num_scenes} scenes x {m.num_frames} frames" for s, m in info.splits.items())
    print(f"{path}: valid ({sizes})")
    d = cfg.dataset
    selection = (d.delta_t, d.frame_start, d.frame_stop, d.frame_stride)
    record_statistics(path, info, selection, d.get("input_velocity", "stored"))
    if cfg.distributed.parts > 1:
        prepare_partitions(load_splits(cfg, info), cfg.distributed.partition, cfg.distributed.parts,
                           cfg.distributed.seed, scheduler=cfg.prepare.scheduler, workers=cfg.prepare.workers,
                           progress=cfg.trainer.progress)


def record_statistics(path: Path, info, selection: tuple, input_velocity: str = "stored") -> None:
    """Record the normalisation statistics of the configured frame selection, if the store can give them.

    A store is not refused for them: they serve only ``trainer.normalization=rms``, and a store is often
    prepared once and trained with other frame selections. Statistics that cannot be computed (no sample in
    the selection, a split that does not move) are said in one line, and an rms training of that selection
    then stops with the same error.
    """
    try:
        record, note = ensure_statistics(info, *selection, input_velocity=input_velocity)
    except StoreError as err:
        print(f"note: no normalisation statistics recorded for {statistics_key(*selection, input_velocity)} "
              f"(trainer.normalization=rms would need them): {err}", flush=True)
        return
    key = statistics_key(*selection, input_velocity)
    print(note or f"{path}: normalisation statistics {key} already recorded", flush=True)
    print(f"  training split: displacement RMS {record['displacement_rms']:.6g}, mean |displacement| "
          f"{record['displacement_mean_norm']:.6g}, velocity RMS {record['velocity_rms']:.6g} (store units)")


@hydra.main(version_base="1.3", config_path="conf", config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except BadInput as err:  # a user's mistake (dist_egnn.errors): one line naming it and the fix
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except ValueError:  # any other is a bug, not bad input: keep its traceback
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
