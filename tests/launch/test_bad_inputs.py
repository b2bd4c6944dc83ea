"""The catalogue of bad inputs: configurations, stores, partitions, checkpoints, run directories.

Each case damages a copy of good material (a tiny store with stored partitions, a finished run with its
checkpoints), runs what a user would run, and checks three things: the error is of the documented kind,
its message names the file or field and the fix, and nothing that existed before was changed (every file's
SHA-256 is the same afterwards). Guards against silent damage, half-applied resumes and unsafe unpickling.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import zarr

from dist_egnn.config import check
from dist_egnn.datasets.store import StoreError
from dist_egnn.errors import ConfigError
from dist_egnn.partitioners.artifacts import StalePartitionError, load_assignments, prepare_partitions
from dist_egnn.training.checkpoint import CheckpointError, sha256
from dist_egnn.training.lock import RunDirError
from dist_egnn.training.rank_data import GraphWarning

from runs import config, digest, fit, prepare_cli

STORE = "nbody_small.zarr"
PARTITION = "nbody_small.partitions/random-p2-s0.zarr"
LAST = "checkpoints/engine/epoch-00002"             # the newest checkpoint of the finished run


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """data/: the store and random partitions for P = 2 and 3; done/: a finished 2-epoch run."""
    root = tmp_path_factory.mktemp("pristine")
    fit(root / "data", root / "done", "trainer.max_epochs=2")
    for parts in (2, 3):
        prepare_partitions(splits(root / "data"), "random", parts, 0, progress=False)
    return root


def splits(data: Path, *overrides: str):
    from dist_egnn.training.setup import load_splits, open_dataset_store
    cfg = config(data, *overrides)
    return load_splits(cfg, open_dataset_store(cfg.dataset, progress=False))


@dataclass
class Case:
    """``damage`` prepares the bad input in the case directory; ``run`` does what a user would do."""

    damage: Callable[[Path], None]
    run: Callable[[Path], object]
    error: type[BaseException] | type[Warning]  # a Warning: the run completes, warning once with the message
    says: tuple[str, ...]                      # fragments the message must hold: the file or field, the fix
    skip: str | None = None                    # why the case does not apply on this machine


def nothing(_: Path) -> None:
    pass


def train(*overrides: str, run: str = "new") -> Callable[[Path], object]:
    return lambda case: fit(case / "data", case / run, *overrides)


def resume(*overrides: str) -> Callable[[Path], object]:
    return train("trainer.max_epochs=2", "resume=auto", *overrides, run="done")


def edit_attrs(path: str, **attrs) -> Callable[[Path], None]:
    def damage(case: Path) -> None:
        group = zarr.open_group(str(case / "data" / path), mode="r+")
        group.attrs.update(attrs)
    return damage


def set_nan(case: Path) -> None:
    zarr.open_group(str(case / "data" / STORE), mode="r+")["val/pos"][0, 0, 0] = float("nan")


def delete_array(case: Path) -> None:
    shutil.rmtree(case / "data" / STORE / "val" / "vel")


def store_is_a_file(case: Path) -> None:
    shutil.rmtree(case / "data" / STORE)
    (case / "data" / STORE).write_text("not a zarr store")


def truncate_checkpoint(case: Path) -> None:
    path = case / "done" / f"{LAST}.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_manifest(**fields) -> Callable[[Path], None]:
    def damage(case: Path) -> None:
        path = case / "done" / f"{LAST}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return damage


def garble_manifest(case: Path) -> None:
    (case / "done" / f"{LAST}.json").write_text('{"format": "dist-egnn-checkpoint", "schema_ver')


def replace_checkpoint(make: Callable[[Path], None]) -> Callable[[Path], None]:
    """Write another file in place of the newest checkpoint and update its manifest to match (as someone
    copying a checkpoint from elsewhere would): only the content check can stop it."""
    def damage(case: Path) -> None:
        path = case / "done" / f"{LAST}.pt"
        make(path)
        manifest_path = path.with_suffix(".json")
        manifest = json.loads(manifest_path.read_text())
        manifest["files"][path.name] = dict(bytes=path.stat().st_size, sha256=sha256(path))
        manifest_path.write_text(json.dumps(manifest))
    return damage


def other_model_shape(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["model"] = {k: torch.cat([v, v]) if v.dim() else v for k, v in state["model"].items()}
    torch.save(state, path)


class Payload:
    """An object whose unpickling would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def malicious(path: Path) -> None:
    torch.save({"model": Payload(path.parent / "PWNED"), "optimizer": {}}, path)


def model_only(case: Path) -> None:
    """What predict needs and nothing else: config.yaml and checkpoints/best.pt (no metrics, no engine state)."""
    (case / "model" / "checkpoints").mkdir(parents=True)
    shutil.copy(case / "done" / "config.yaml", case / "model" / "config.yaml")
    shutil.copy(case / "done" / "checkpoints" / "best.pt", case / "model" / "checkpoints" / "best.pt")


def cut_metrics(case: Path) -> None:
    path = case / "done" / "metrics.jsonl"
    path.write_text(path.read_text().splitlines(keepends=True)[0])


def stale_partition(case: Path):
    return prepare_partitions(splits(case / "data", "dataset.radius=2.0"), "random", 2, 0, rebuild=False,
                              progress=False)


def delete_partition_chunk(case: Path) -> None:
    """One chunk file of the stored assignment gone: zarr would read it as zeros, every node on rank 0."""
    (case / "data" / PARTITION / "train" / "assignment" / "c" / "0" / "0").unlink()


def truncate_halo_chunk(case: Path) -> None:
    path = case / "data" / PARTITION / "train" / "halo_mask" / "c" / "0" / "0"
    path.write_bytes(path.read_bytes()[:5])


def halo_of_first_sample(case: Path):
    """What rank 0 of a 2-rank exact-halo run reads for its first sample."""
    from dist_egnn.training.rank_data import RankData
    data = splits(case / "data")["train"]
    return RankData(data, 0, 2, halo=True, assignments=load_assignments(case / "data" / PARTITION, "train")).nodes_of(0)


FORGED = "epoch-00000-step-000001.json"


def forge_manifest(**fields) -> Callable[[Path], None]:
    """A victim folder beside the run, and a manifest that points outside checkpoints/ at it: an old
    checkpoint (position (0, 1)), so the next pruning would delete what its tag names."""
    def damage(case: Path) -> None:
        (case / "victim").mkdir()
        (case / "victim" / "precious.txt").write_text("not the run's to delete")
        engine = case / "done" / "checkpoints" / "engine"
        manifest = json.loads((engine / f"{LAST.rsplit('/', 1)[1]}.json").read_text())
        manifest.update({"tag": FORGED.removesuffix(".json"), "position": [0, 1], **fields})
        (engine / FORGED).write_text(json.dumps(manifest))
    return damage


def prune_run(case: Path):
    from dist_egnn.training.checkpoint import prune
    return prune(case / "done" / "checkpoints" / "engine", 1)


def rank_data_with_other_parts(case: Path):
    from dist_egnn.training.rank_data import RankData
    data = splits(case / "data")["train"]
    return RankData(data, 0, 2, assignments=load_assignments(case / "data" / PARTITION.replace("p2", "p3"), "train"))


def checked(*overrides: str) -> Callable[[Path], object]:
    """The configuration check alone (``dist_egnn.config.check``), as ``launch/train.py`` runs it first."""
    return lambda case: check(config(case / "data", *overrides))


def make_store(folder: str, *overrides: str) -> Callable[[Path], None]:
    """Another store of the tiny N-body set under ``<case>/<folder>`` (as a run with these overrides makes it)."""
    def damage(case: Path) -> None:
        from omegaconf import OmegaConf

        from dist_egnn.datasets.prepare import prepare_dataset
        cfg = config(case / folder, *overrides)
        prepare_dataset(OmegaConf.to_container(cfg.dataset, resolve=True), cfg.dataset.store, progress=False)
    return damage


def copy_store(folder: str, **attrs) -> Callable[[Path], None]:
    """A copy of the store under ``<case>/<folder>``, with root attributes changed (other contents)."""
    def damage(case: Path) -> None:
        shutil.copytree(case / "data" / STORE, case / folder / STORE)
        zarr.open_group(str(case / folder / STORE), mode="r+").attrs.update(attrs)
    return damage


def garble(path: str, text: str = '{"zarr_format": 3, "node_ty') -> Callable[[Path], None]:
    def damage(case: Path) -> None:
        (case / "data" / path).write_text(text)
    return damage


def link_store(target: str) -> Callable[[Path], None]:
    """``<case>/links/nbody_small.zarr``: a symbolic link to ``target`` (relative to the link's folder)."""
    def damage(case: Path) -> None:
        (case / "links").mkdir()
        (case / "links" / STORE).symlink_to(target)
    return damage


def file_as_run_dir(case: Path) -> None:
    (case / "afile").write_text("not a run directory")


def as_deepspeed_checkpoint(case: Path) -> None:
    """The newest checkpoint rewritten in DeepSpeed's layout (a folder ``<tag>/``), its manifest saying
    engine=deepspeed, as a run under the deepspeed launcher leaves it."""
    engine = case / "done" / "checkpoints" / "engine"
    tag = LAST.rsplit("/", 1)[1]
    (engine / tag).mkdir()
    os.replace(engine / f"{tag}.pt", engine / tag / "mp_rank_00_model_states.pt")
    manifest = json.loads((engine / f"{tag}.json").read_text())
    path = engine / tag / "mp_rank_00_model_states.pt"
    manifest.update(engine="deepspeed", files={f"{tag}/{path.name}": dict(bytes=path.stat().st_size,
                                                                         sha256=sha256(path))})
    (engine / f"{tag}.json").write_text(json.dumps(manifest))


def resume_under_deepspeed(case: Path):
    """What a DeepSpeed launch resuming the plain run checks first (the engine needs a launcher to start)."""
    from dist_egnn.training.checkpoint import check_engine, read_manifest
    where = case / "done" / f"{LAST}.json"
    return check_engine(where, read_manifest(where), "deepspeed")


def launch_prepare(*overrides: str) -> Callable[[Path], object]:
    """``python launch/prepare.py <overrides>`` in this process (its ``prepare`` function)."""
    def run(case: Path):
        return prepare_cli().prepare(config(case / "data", *overrides))
    return run


def first_batch(*overrides: str, data: str = "data") -> Callable[[Path], object]:
    """Rank 0's first training batch of a one-process run with these overrides (graphs built, nothing written)."""
    def run(case: Path):
        from dist_egnn.training.rank_data import RankData
        return RankData(splits(case / data, *overrides)["train"]).build([0, 1, 2])
    return run


def make_synthetic(case: Path) -> None:
    """A tiny synthetic store whose generator documents its mean degree (4 neighbours at radius 0.075)."""
    from dist_egnn.datasets.synthetic import SyntheticConfig, generate_synthetic
    generate_synthetic(case / "syn" / "synthetic.zarr", SyntheticConfig(num_particles=300, neighbors=4.0, frames=3),
                       dataset="synthetic", progress=False)


def dense_synthetic_batch(case: Path):
    from dist_egnn.datasets.loader import TrajectoryDataset
    from dist_egnn.datasets.store import open_store
    from dist_egnn.training.rank_data import RankData
    data = TrajectoryDataset(open_store(case / "syn" / "synthetic.zarr"), "train", delta_t=1, node_features=["speed"],
                             edge_features=["distance"], radius=0.25)
    return RankData(data).build([0])


NO_GPU = "a GPU is visible" if torch.cuda.is_available() else None
CHANGED = "dataset.nbody.num_particles=16"


CASES = {
    # configurations: rejected before anything is read or written
    "unknown key": Case(nothing, train("trainer.learning_rate=0.1"), Exception, ("learning_rate", "trainer")),
    "wrong type": Case(nothing, train("trainer.max_epochs=many"), Exception, ("trainer.max_epochs", "many")),
    "nonfinite policy": Case(nothing, train("trainer.nonfinite=ignore"), ValueError,
                             ("trainer.nonfinite='ignore'", "choose one of ('stop', 'skip')")),
    "negative checkpoint interval": Case(nothing, train("trainer.checkpoint_every_steps=-1"), ValueError,
                                         ("trainer.checkpoint_every_steps=-1", ">= 0")),
    "keep no checkpoint": Case(nothing, train("trainer.keep_last=0"), ValueError, ("trainer.keep_last=0", ">= 1")),
    "resume mode": Case(nothing, train("resume=latest"), ValueError, ("resume='latest'", "resume=auto")),
    "feature width": Case(nothing, train("model.node_features=3"), ValueError,
                          ("model.node_features=3", "dataset.node_features")),
    "halo mode": Case(nothing, train("distributed.parts=2", "distributed.halo=full"), ValueError,
                      ("distributed.halo='full'", "'exact'")),
    "unknown schedule": Case(nothing, train("trainer.scheduler=linear"), ConfigError,
                             ("trainer.scheduler='linear'", "'cosine'", "'plateau'")),
    "weight average decay of 1": Case(nothing, train("trainer.ema_decay=1.0"), ConfigError,
                                      ("trainer.ema_decay=1.0", "[0, 1)")),
    "negative weight average decay": Case(nothing, train("trainer.ema_decay=-0.5"), ConfigError,
                                          ("trainer.ema_decay=-0.5", ">= 0")),
    "no micro-batch per step": Case(nothing, train("trainer.accumulate=0"), ConfigError,
                                    ("trainer.accumulate=0", ">= 1")),
    # dataset stores
    "missing store": Case(nothing, train("dataset.auto_prepare=false", "paths.data=elsewhere"), StoreError,
                          ("does not exist", "prepare.py")),
    "newer store schema": Case(edit_attrs(STORE, schema_version=99), train(), StoreError,
                               (STORE, "schema_version 99", "upgrade dist-egnn")),
    "missing array": Case(delete_array, train(), StoreError, ("val", "'vel' is missing", "prepare the dataset again")),
    "NaN in store": Case(set_nan, train(), StoreError, ("val/pos: NaN or Inf",)),
    "store is a file": Case(store_is_a_file, train(), StoreError, (STORE, "not a readable zarr group", "prepare")),
    # stored partitions
    "stale partition": Case(nothing, stale_partition, StalePartitionError,
                            ("random-p2-s0.zarr", "radius", "launch/prepare.py distributed.parts=2")),
    "partition schema": Case(edit_attrs(PARTITION, schema_version=7), lambda case: load_assignments(
        case / "data" / PARTITION, "train"), StalePartitionError, ("random-p2-s0.zarr", "schema_version 7", "prepare")),
    "partition for other P": Case(nothing, rank_data_with_other_parts, ValueError,
                                  ("random-p3-s0.zarr", "3 parts but distributed.parts=2", "prepare")),
    "partition chunk missing": Case(delete_partition_chunk,
                                    train("distributed.parts=2", "distributed.partition=random"), StalePartitionError,
                                    ("random-p2-s0.zarr", "train/assignment/c/0/0", "missing", "damaged",
                                     "launch/prepare.py dataset=nbody_small distributed.parts=2 "
                                     "distributed.partition=random distributed.seed=0", "or delete the folder")),
    "partition chunk truncated": Case(truncate_halo_chunk, halo_of_first_sample, StalePartitionError,
                                      ("random-p2-s0.zarr/train/halo_mask/c/0/0", "cannot be read", "damaged",
                                       "launch/prepare.py dataset=nbody_small distributed.parts=2",
                                       "or delete the folder")),
    # checkpoints and run directories (resume=auto on the finished run)
    "truncated checkpoint": Case(truncate_checkpoint, resume(), CheckpointError,
                                 ("epoch-00002.pt", "damaged", "delete epoch-00002.json")),
    "newer checkpoint schema": Case(edit_manifest(schema_version=99), resume(), CheckpointError,
                                    ("epoch-00002.json", "schema_version 99", "upgrade dist-egnn")),
    "garbled manifest": Case(garble_manifest, resume(), CheckpointError,
                             ("epoch-00002.json", "cannot be read", "delete")),
    "changed configuration": Case(nothing, resume("model.hidden=32"), CheckpointError,
                                  ("epoch-00002.json", "model.hidden: 64 -> 32", "new run directory")),
    "weight average switched on at resume": Case(nothing, resume("trainer.ema_decay=0.99"), CheckpointError,
                                                 ("epoch-00002.json", "trainer.ema_decay: None -> 0.99",
                                                  "new run directory")),
    "wrong model shape": Case(replace_checkpoint(other_model_shape), resume(), CheckpointError,
                              ("epoch-00002.pt", "does not fit this model", "size mismatch")),
    "malicious pickle": Case(replace_checkpoint(malicious), resume(), CheckpointError,
                             ("epoch-00002.pt", "cannot be loaded safely", "GLOBAL posix.system")),
    "metrics log cut": Case(cut_metrics, resume(), CheckpointError,
                            ("metrics.jsonl", "holds 1 complete lines", "restore")),
    "forged manifest tag": Case(forge_manifest(tag="../../../victim"),
                                train("trainer.max_epochs=3", "resume=auto", run="done"), CheckpointError,
                                (FORGED, "'../../../victim'", "not a plain name", "delete it")),
    "forged manifest tag, pruning": Case(forge_manifest(tag="../../../victim"), prune_run, CheckpointError,
                                         (FORGED, "'../../../victim'", "not a plain name")),
    "manifest lists a file outside": Case(forge_manifest(files={"../../../victim/precious.txt": dict(bytes=23,
                                                                                                      sha256="0")}),
                                          resume(), CheckpointError,
                                          (FORGED, "'../../../victim/precious.txt'", "delete it")),
    "fresh run in a used directory": Case(nothing, train(run="done"), CheckpointError,
                                          ("already holds a run", "resume=auto", "hydra.run.dir")),
    "fresh run over a model without history": Case(model_only, train(run="model"), CheckpointError,
                                                   ("already holds a run", "best.pt present", "hydra.run.dir")),
    # numbers out of range (dist_egnn.config.RANGES / CHOICES): each names the key and its range
    **{f"range {override}": Case(nothing, checked(override), ConfigError, says) for override, says in {
        "model.edge_chunk_size=-1": ("model.edge_chunk_size=-1", "auto or a whole number of edges >= 1"),
        "dataset.radius=-0.1": ("dataset.radius=-0.1", "must be > 0"),
        "dataset.radius=0": ("dataset.radius=0.0", "must be > 0"),
        "dataset.max_neighbors=0": ("dataset.max_neighbors=0", "must be >= 1"),
        "trainer.lr=0": ("trainer.lr=0.0", "must be > 0"),
        "trainer.steps_per_epoch=0": ("trainer.steps_per_epoch=0", "must be >= 1"),
        "dataset.mmd_weight=-1": ("dataset.mmd_weight=-1.0", "must be >= 0"),
        "dataset.mmd_samples=0": ("dataset.mmd_samples=0", "must be >= 1"),
        "dataset.mmd_sigma=0": ("dataset.mmd_sigma=0.0", "must be > 0"),
        "dataset.frame_stride=0": ("dataset.frame_stride=0", "must be >= 1"),
        "dataset.frame_start=-1": ("dataset.frame_start=-1", "must be >= 0"),
        "dataset.delta_t=0": ("dataset.delta_t=0", "must be >= 1"),
        "trainer.num_threads=-1": ("trainer.num_threads=-1", "must be >= 1"),
        "trainer.batch_size=0": ("trainer.batch_size=0", "must be >= 1"),
        "trainer.eval_batch_size=0": ("trainer.eval_batch_size=0", "must be >= 1"),
        "trainer.max_epochs=0": ("trainer.max_epochs=0", "must be >= 1"),
        "trainer.patience=0": ("trainer.patience=0", "must be >= 1"),
        "trainer.eval_every=0": ("trainer.eval_every=0", "must be >= 1"),
        "trainer.weight_decay=-1": ("trainer.weight_decay=-1.0", "must be >= 0"),
        "trainer.dtype=float16": ("trainer.dtype='float16'", "choose one of ('float32', 'float64')"),
        "model.hidden=0": ("model.hidden=0", "must be >= 1"),
        "model.layers=0": ("model.layers=0", "must be >= 1"),
        "model.virtual_channels=0": ("model.virtual_channels=0", "must be >= 1"),
        "model.cutoff_rate=1.5": ("model.cutoff_rate=1.5", "must be in [0, 1]"),
        "distributed.parts=0": ("distributed.parts=0", "must be >= 1"),
        "distributed.timeout_s=0": ("distributed.timeout_s=0.0", "must be > 0"),
        "distributed.prepare_timeout_s=0": ("distributed.prepare_timeout_s=0.0", "must be > 0"),
        "engine.zero_stage=-1": ("engine.zero_stage=-1", "must be >= 0"),
        "engine.gradient_clipping=-1": ("engine.gradient_clipping=-1.0", "must be >= 0"),
        "engine.name=horovod": ("engine.name='horovod'", "choose one of"),
        "prepare.workers=0": ("prepare.workers=0", "must be >= 1"),
    }.items()},
    "bf16 with float64": Case(nothing, checked("trainer.precision=bf16", "trainer.dtype=float64"), ConfigError,
                              ("trainer.precision=bf16 with trainer.dtype=float64", "use trainer.dtype=float32")),
    "cuda without a GPU": Case(nothing, train("trainer.device=cuda"), ConfigError,
                               ("trainer.device=cuda", "no CUDA device is visible", "trainer.device=cpu"), skip=NO_GPU),
    # a store tied to the configuration that made it (issue 18 item 4)
    "store made with other parameters": Case(nothing, train(CHANGED), StoreError,
                                             (STORE, "dataset.nbody.num_particles: store 12, configured 16",
                                              "dataset.name", "paths.data", "prepare.overwrite=true")),
    "store made with other scene counts": Case(nothing, train("dataset.nbody.train=8", "dataset.nbody.val=4"),
                                               StoreError, ("dataset.nbody.train: store 6, configured 8",
                                                            "dataset.nbody.val: store 3, configured 4")),
    "store of another source": Case(nothing, train("dataset.source=synthetic"), StoreError,
                                    (STORE, "dataset.source: store 'nbody', configured 'synthetic'")),
    "prepare over a store made with other parameters": Case(nothing, launch_prepare(CHANGED), StoreError,
                                                            ("dataset.nbody.num_particles: store 12, configured 16",
                                                             "prepare.overwrite=true")),
    "resume on a store made with other parameters": Case(make_store("other", CHANGED), resume("paths.data=other"),
                                                         StoreError, ("other/" + STORE, "dataset.nbody.num_particles: "
                                                                      "store 16, configured 12")),
    "resume on a store with other contents": Case(copy_store("other", radius=2.0), resume("paths.data=other"),
                                                  CheckpointError, ("epoch-00002.json", "trained on the dataset store",
                                                                    "radius: None -> 2.0", "paths.data",
                                                                    "new run directory")),
    # stores that cannot be read or made
    "garbled array metadata": Case(garble(f"{STORE}/val/pos/zarr.json"), train(), StoreError,
                                   (f"{STORE}/val/pos/zarr.json", "cannot be read as JSON", "prepare.overwrite=true")),
    "garbled store metadata": Case(garble(f"{STORE}/zarr.json"), train(), StoreError,
                                   (f"{STORE}/zarr.json", "cannot be read as JSON")),
    "garbled partition metadata": Case(garble(f"{PARTITION}/train/assignment/zarr.json"),
                                       train("distributed.parts=2", "distributed.partition=random"),
                                       StalePartitionError, ("random-p2-s0.zarr/train/assignment/zarr.json",
                                                             "cannot be read as JSON", "damaged",
                                                             "launch/prepare.py dataset=nbody_small "
                                                             "distributed.parts=2", "or delete the folder")),
    "array metadata of the wrong kind": Case(garble(f"{STORE}/val/vel/zarr.json", '{"zarr_format": 3}'), train(),
                                             StoreError, (f"{STORE}/val", "cannot be read", "prepare.overwrite=true")),
    "dangling store link": Case(link_store("../nowhere/nbody_small.zarr"), train("paths.data=links"), StoreError,
                                ("links/" + STORE, "a dangling link", "remove the link")),
    "looping store link": Case(link_store(STORE), train("paths.data=links"), StoreError,
                               ("links/" + STORE, "a symbolic link that loops", "remove the link")),
    "store generation failing validation": Case(nothing, train("paths.data=fresh", "dataset.nbody.val=0"), StoreError,
                                                ("fresh/" + STORE, "failed validation", "nothing is left behind",
                                                 "holds no scenes", "dataset.nbody.val >= 1")),
    # launches and run directories
    "run directory is a file": Case(file_as_run_dir, train(run="afile"), RunDirError,
                                    ("afile is a file, not a folder", "hydra.run.dir")),
    "engine=deepspeed in one process": Case(nothing, train("engine=deepspeed"), ConfigError,
                                            ("engine=deepspeed needs the deepspeed launcher",
                                             "deepspeed --num_gpus P launch/train.py", "engine=plain")),
    "resume a DeepSpeed run under another engine": Case(as_deepspeed_checkpoint, resume(), CheckpointError,
                                                        ("epoch-00002.json", "written by engine=deepspeed",
                                                         "engine=plain cannot read", "deepspeed --num_gpus P",
                                                         "resume=auto")),
    "resume a plain run under DeepSpeed": Case(nothing, resume_under_deepspeed, CheckpointError,
                                               ("epoch-00002.json", "written by engine=plain",
                                                "engine=deepspeed cannot read", "python launch/train.py")),
    # graphs that train, but not as meant: a warning once per split
    "graph without edges": Case(nothing, first_batch("dataset.radius=0.001"), GraphWarning,
                                ("train graphs of", "has no edges at dataset.radius=0.001", "length unit")),
    "radius far denser than documented": Case(make_synthetic, dense_synthetic_batch, GraphWarning,
                                              ("dataset.radius=0.25 gives", "documented mean degree",
                                               "dataset.max_neighbors")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(pristine, tmp_path, monkeypatch, name):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    shutil.copytree(pristine, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    case.damage(tmp_path)
    before = digest(tmp_path)
    if issubclass(case.error, Warning):
        with pytest.warns(case.error) as caught:
            case.run(tmp_path)
        given = [w for w in caught if issubclass(w.category, case.error)]
        assert len(given) == 1, [str(w.message) for w in given]         # once, not every batch
        message = str(given[0].message)
    else:
        with pytest.raises(case.error) as caught:
            case.run(tmp_path)
        message = str(caught.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert digest(tmp_path) == before, "existing data changed"
    assert not (tmp_path / "done" / "checkpoints" / "engine" / "PWNED").exists()


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 60
