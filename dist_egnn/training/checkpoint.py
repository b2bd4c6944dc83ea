"""Checkpoints: atomic files, engine checkpoints that are complete only with their manifest, resume, pruning.

Files. :func:`save_atomic` writes to a temporary name in the same folder, fsyncs, then renames: a reader
sees the previous complete file or the new complete one, never a torn write. :func:`load` uses
``weights_only=True``: a checkpoint cannot execute code.

Engine checkpoints (``checkpoints/engine/``). The engine writes its files for a tag (plain, DDP, FSDP:
``<tag>.pt``; DeepSpeed: the directory ``<tag>/``); then, after every rank has finished, rank 0 writes the
manifest ``<tag>.json`` atomically: schema version, position (epoch, step), config hash, metrics line
count, and the size and SHA-256 of every file of the tag. A tag counts only once its manifest exists, so a
checkpoint cut short by a crash or a kill (files without a manifest, a DeepSpeed ``latest`` pointing at a
half-written tag) is never picked; before loading, the files are checked against the manifest, so a
damaged or replaced file is named instead of half-loaded.

Tags name positions: ``epoch-00003`` is written after epoch 3 and its evaluation; ``epoch-00004-step-000002``
after 2 steps of epoch 4 (``trainer.checkpoint_every_steps`` or a stop signal). The manifest's
``position`` = (epochs completed, steps into the next one) orders them: (3, 0) < (3, 2).

What a resume may change. :func:`identity` is the configuration minus the keys that may change between a
run and its resume without changing what is trained (:data:`MAY_CHANGE`: epochs, patience, checkpoint
cadence, threads, launcher, engine, number of parts, paths); its hash is stored with every checkpoint and a
resume with another identity stops, naming the keys that differ.

Paths from manifests. A manifest is data someone may have edited, so every path built from it stays in its
folder: its ``tag`` must be its own file name without ``.json`` (no separators, no ``..``) and every file it
lists must lie under that folder once resolved (:func:`inside`), both checked by :func:`read_manifest`;
deleting (:func:`prune`, :func:`remove_leftovers`) checks again, so nothing outside ``checkpoints/`` is removed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from omegaconf import OmegaConf

from dist_egnn.config import Config
from dist_egnn.errors import BadInput

SCHEMA_VERSION = 1           # of the manifest and of the trainer state inside checkpoints
MANIFEST_FORMAT = "dist-egnn-checkpoint"

# Configuration keys a resume may change (dotted prefixes). Everything else must match the checkpoint.
MAY_CHANGE = ("resume", "paths", "prepare", "distributed", "engine", "dataset.store", "dataset.auto_prepare",
              "dataset.check_values", "trainer.max_epochs", "trainer.patience", "trainer.eval_every",
              "trainer.progress", "trainer.num_threads", "trainer.device", "trainer.checkpoint_every_steps",
              "trainer.keep_last", "trainer.nonfinite", "trainer.tf32", "model.edge_chunk_size", "model.compile")


class CheckpointError(BadInput):
    """A checkpoint that cannot be used: missing, damaged, from another configuration or a newer version."""


TAG_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")      # one file-name component, no separators


def inside(directory: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True if ``path`` (relative to ``directory`` or absolute) lies under ``directory`` once both are
    resolved (symbolic links followed, ``..`` applied), and is not ``directory`` itself."""
    base = Path(directory).resolve()
    target = (base / path).resolve()
    return target != base and target.is_relative_to(base)


def check_tag(tag: Any, where: str | os.PathLike) -> str:
    """``tag`` if it is a safe checkpoint name (one path component: no separator, no ``..``, not absolute);
    else :class:`CheckpointError` naming ``where`` (the manifest or folder it came from)."""
    if not (isinstance(tag, str) and TAG_PATTERN.fullmatch(tag) and ".." not in tag):
        raise CheckpointError(f"{where}: checkpoint tag {tag!r} is not a plain name (letters, digits, '-', '_', "
                              f"'.'; no path separators or '..'): the manifest is damaged or forged, so it is not "
                              f"used; delete it (and the files of its tag) to resume from another checkpoint")
    return tag


# ------------------------------------------------------------------------------------------------ files
def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically; returns the path."""
    return _write_atomic(Path(path), lambda f: torch.save(state, f))


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    return write_text_atomic(json.dumps(data, indent=1), path)


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return _write_atomic(Path(path), lambda f: f.write(text.encode()))


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    return _write_atomic(Path(path), lambda f: f.write(data))


def _write_atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; a clear error if it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely ({why(err)}); it is damaged or not a "
                              f"dist-egnn checkpoint: delete it (and its manifest) to resume from an older one"
                              ) from err


def why(err: Exception) -> str:
    """The telling part of a loading error: for torch's weights_only refusal, the line naming what it refused."""
    text = str(err)
    if text.startswith("Weights only load failed"):
        telling = [p.strip() for p in text.split("\n\n")[1:] if p.strip() and not p.strip().startswith("Check the doc")]
        text = "weights_only=True refused it: " + (telling[0] if telling else text)
    return f"{type(err).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------- config identity
def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved configuration without the keys a resume may change (:data:`MAY_CHANGE`)."""
    def strip(node: Any, prefix: str) -> Any:
        if not isinstance(node, dict):
            return node
        return {k: strip(v, f"{prefix}{k}.") for k, v in node.items() if f"{prefix}{k}" not in MAY_CHANGE}
    return strip(config, "")


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the configuration's :func:`identity`."""
    return hashlib.sha256(json.dumps(identity(config), sort_keys=True).encode()).hexdigest()[:16]


ABSENT = "<absent>"


def config_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "",
                   defaults: dict[str, Any] | None = None) -> list[str]:
    """``key: old -> new`` for every leaf that differs between two configurations. With ``defaults`` (the
    schema's, :func:`schema_defaults`), a key ``before`` lacks and ``after`` holds at its default is no change:
    the version that wrote ``before`` did not have the key yet, and a new key's default is the behaviour from
    before it existed (``trainer.noise_target=clean`` is the training noise of every earlier version)."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key, ABSENT), after.get(key, ABSENT)
        default = defaults.get(key, ABSENT) if isinstance(defaults, dict) else ABSENT
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.", default if isinstance(default, dict) else None)
        elif a is ABSENT and default is not ABSENT and b == default:
            continue
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


def schema_defaults() -> dict[str, Any]:
    """The defaults of every key of the training configuration (``dist_egnn.config.Config``), as nested dicts."""
    return OmegaConf.to_container(OmegaConf.structured(Config))


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """The global generators of this process (torch CPU and CUDA, NumPy, Python), as weights_only-safe data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                python=random.getstate())


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- engine checkpoint manifests
def evaluation_tag(epoch: int) -> str:
    """The tag written after epoch ``epoch`` and its evaluation."""
    return f"epoch-{epoch:05d}"


def step_tag(epoch: int, step: int) -> str:
    """The tag written after ``step`` steps of epoch ``epoch`` (1-based, in progress)."""
    return f"epoch-{epoch:05d}-step-{step:06d}"


def manifest_path(directory: str | os.PathLike, tag: str) -> Path:
    return Path(directory) / f"{tag}.json"


def tag_files(directory: str | os.PathLike, tag: str) -> list[Path]:
    """The files an engine wrote for ``tag``: ``<tag>.pt`` and/or everything under ``<tag>/``."""
    directory = Path(directory)
    files = [directory / f"{tag}.pt"] if (directory / f"{tag}.pt").is_file() else []
    if (directory / tag).is_dir():
        files += sorted(p for p in (directory / tag).rglob("*") if p.is_file())
    return files


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: str | os.PathLike, tag: str, **meta: Any) -> Path:
    """Complete the checkpoint ``tag``: list its files with sizes and hashes, then write the manifest (last)."""
    directory = Path(directory)
    files = tag_files(directory, tag)
    if not files:
        raise CheckpointError(f"{directory}: the engine wrote no files for checkpoint {tag!r}")
    manifest = dict(format=MANIFEST_FORMAT, schema_version=SCHEMA_VERSION, tag=tag,
                    written=time.strftime("%Y-%m-%dT%H:%M:%S"), **meta,
                    files={str(p.relative_to(directory)): dict(bytes=p.stat().st_size, sha256=sha256(p))
                           for p in files})
    return write_json_atomic(manifest, manifest_path(directory, tag))


def read_manifest(path: Path) -> dict[str, Any]:
    """A manifest, checked for format and schema version."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint manifest {path} cannot be read ({err}); delete it and the files of its "
                              f"tag to resume from an older checkpoint") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path} is not a dist-egnn checkpoint manifest (no format={MANIFEST_FORMAT!r}); "
                              f"move it out of {path.parent}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema_version {version!r} is not one this dist-egnn reads "
                              f"(<= {SCHEMA_VERSION}); upgrade dist-egnn or start a new run directory")
    for key in ("tag", "position", "files", "config_hash"):
        if key not in manifest:
            raise CheckpointError(f"{path}: field {key!r} is missing; the manifest is damaged: delete it and the "
                                  f"files of its tag to resume from an older checkpoint")
    check_paths(path, manifest)
    return manifest


def check_paths(path: Path, manifest: dict[str, Any]) -> None:
    """Every path the manifest at ``path`` names stays in its folder: the tag is the manifest's own name and a
    plain name, and each listed file is ``<tag>.pt`` or under ``<tag>/``, inside the folder once resolved."""
    tag = check_tag(manifest["tag"], path)
    position = manifest["position"]
    if not (isinstance(position, list) and len(position) == 2 and all(type(k) is int and k >= 0 for k in position)):
        raise CheckpointError(f"{path}: position {position!r} is not [epochs, steps] (two integers >= 0); the "
                              f"manifest is damaged: delete it and the files of its tag")
    if path.name != f"{tag}.json":
        raise CheckpointError(f"{path}: names checkpoint tag {tag!r} but a manifest is named after its tag "
                              f"({tag}.json): the manifest was renamed, copied or forged, so it is not used; delete "
                              f"it (and the files of its tag) to resume from another checkpoint")
    files, directory = manifest["files"], path.parent
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: field 'files' must map the files of the tag to their sizes and hashes; "
                              f"the manifest is damaged: delete it and the files of its tag")
    for name, expected in files.items():
        parts = Path(name).parts
        if (Path(name).is_absolute() or "\\" in name or ".." in parts or not parts
                or not (name == f"{tag}.pt" or (parts[0] == tag and len(parts) > 1))
                or not inside(directory, name)):
            raise CheckpointError(f"{path}: lists file {name!r}, which is not {tag}.pt or under {tag}/ inside "
                                  f"{directory}: the manifest is damaged or forged, so it is not used; delete it "
                                  f"(and the files of its tag) to resume from another checkpoint")
        if not (isinstance(expected, dict) and isinstance(expected.get("bytes"), int)
                and isinstance(expected.get("sha256"), str)):
            raise CheckpointError(f"{path}: the entry of file {name!r} must hold its bytes and sha256; the manifest "
                                  f"is damaged: delete it and the files of its tag")


def complete_checkpoints(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Manifests of the complete checkpoints in ``directory``, oldest first (by position)."""
    manifests = [read_manifest(p) for p in sorted(Path(directory).glob("*.json")) if not p.name.startswith(".")]
    return sorted(manifests, key=lambda m: tuple(m["position"]))


def latest_tag(directory: str | os.PathLike) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    found = complete_checkpoints(directory) if Path(directory).is_dir() else []
    return found[-1]["tag"] if found else None


def incomplete_tags(directory: str | os.PathLike) -> list[str]:
    """Tags with files but no manifest (a save cut short): never loaded, removed by :func:`prune`."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = {p.stem for p in directory.glob("*.pt")} | {p.name for p in directory.iterdir() if p.is_dir()}
    return sorted(n for n in names if not n.startswith(".") and not manifest_path(directory, n).exists())


def verify(directory: str | os.PathLike, manifest: dict[str, Any], config: dict[str, Any]) -> None:
    """Check that a checkpoint's files are those its manifest lists and that it was written with the same
    configuration identity as ``config``; raises :class:`CheckpointError` naming the file or keys and the fix."""
    directory = Path(directory)
    where = manifest_path(directory, check_tag(manifest["tag"], directory))
    check_paths(where, manifest)
    if manifest["config_hash"] != config_hash(config):
        # keys added since the checkpoint was written, at their defaults, are no change (config_changes)
        changes = config_changes(manifest.get("config", {}), identity(config), defaults=schema_defaults())
        if changes or not manifest.get("config"):
            raise CheckpointError(f"{where} was written with another configuration "
                                  f"({'; '.join(changes[:8]) or 'hash differs'}); "
                                  f"resume with the run's own settings (see config.yaml of the run directory), or "
                                  f"start a new run directory (another hydra.run.dir) for the new ones")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing though {where} lists it; the checkpoint is damaged: delete "
                                  f"{where.name} to resume from an older checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} is damaged or was replaced ({size} bytes, {expected['bytes']} written, "
                                  f"or another SHA-256); delete {where.name} to resume from an older checkpoint")


def engine_family(name: str) -> str:
    """Checkpoint formats: DeepSpeed's own folder, or the portable ``<tag>.pt`` of plain, DDP and FSDP."""
    return "deepspeed" if name == "deepspeed" else "portable"


def check_engine(where: Path, manifest: dict[str, Any], engine: str) -> None:
    """Refuse a checkpoint whose format the resuming engine cannot read, naming the engine that wrote it and
    how to resume (a manifest without ``engine``, from an older dist-egnn, is not checked)."""
    written = manifest.get("engine")
    if not isinstance(written, str) or engine_family(written) == engine_family(engine):
        return
    tag = manifest["tag"]
    if written == "deepspeed":
        raise CheckpointError(f"{where} was written by engine=deepspeed (DeepSpeed's own checkpoint folder {tag}/), "
                              f"which engine={engine} cannot read: resume under the deepspeed launcher "
                              f"(deepspeed --num_gpus P launch/train.py ... resume=auto; with engine.zero_stage=0 P "
                              f"may differ), or start a new run directory")
    raise CheckpointError(f"{where} was written by engine={written} (a portable {tag}.pt), which engine=deepspeed "
                          f"cannot read: resume with python launch/train.py ... resume=auto (engine=plain) or "
                          f"torchrun --nproc-per-node P launch/train.py engine=ddp ... resume=auto, or start a new "
                          f"run directory")


def check_store(where: Path, manifest: dict[str, Any], store: dict[str, Any] | None) -> None:
    """Refuse to resume on a dataset store whose contents differ from the one the checkpoint trained on
    (``store`` and the manifest's: ``datasets.prepare.store_identity``); the path alone may differ (a copied
    store is the same store). Manifests without a store identity (older dist-egnn) are not checked."""
    recorded = manifest.get("store")
    if not isinstance(recorded, dict) or store is None or recorded.get("hash") == store.get("hash"):
        return
    changes = config_changes(recorded.get("record") or {}, store.get("record") or {})
    raise CheckpointError(f"{where} was trained on the dataset store {recorded.get('path')}, but this run opens "
                          f"{store.get('path')}, whose contents differ ({'; '.join(changes[:6]) or 'identity differs'}"
                          f"{' ...' if len(changes) > 6 else ''}): resuming would continue on other data. Resume "
                          f"with the store the run trained on (paths.data and dataset.name as in the run's "
                          f"config.yaml), or start a new run directory (another hydra.run.dir) for the new data")


def prune(directory: str | os.PathLike, keep_last: int, keep: Iterable[str] = ()) -> list[str]:
    """Delete all but the ``keep_last`` newest complete checkpoints and the tags in ``keep`` (the best one).
    Returns the deleted tags. Only the process that writes manifests calls it, after every rank has saved."""
    directory = Path(directory)
    complete = [m["tag"] for m in complete_checkpoints(directory)]
    kept = set(complete[-keep_last:]) | set(keep)
    doomed = [t for t in complete if t not in kept]
    for tag in doomed:
        _delete(directory, tag)
    return doomed


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete what saves cut short left behind: tags without a manifest and temporary files. Only called
    when a run (re)starts, when no rank is writing."""
    directory = Path(directory)
    doomed = incomplete_tags(directory)
    for tag in doomed:
        _delete(directory, tag)
    for tmp in directory.glob(".*.tmp") if directory.is_dir() else []:
        tmp.unlink(missing_ok=True)
    return doomed


def _delete(directory: Path, tag: str) -> None:
    """Remove a tag's manifest and files. ``tag`` is one plain name (checked), so every path is directly in
    ``directory``; a symbolic link there is removed itself, never what it points to."""
    check_tag(tag, directory)
    manifest_path(directory, tag).unlink(missing_ok=True)            # first: the tag stops counting
    (directory / f"{tag}.pt").unlink(missing_ok=True)
    folder = directory / tag
    if folder.is_symlink():
        folder.unlink()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def check_weights_only(path: Path) -> None:
    """Fail unless ``path`` unpickles with ``weights_only=True`` (no code can run while loading it)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} does not load with weights_only=True ({why(err)}); it is damaged or "
                              f"holds objects that could run code, so it is not loaded") from err
