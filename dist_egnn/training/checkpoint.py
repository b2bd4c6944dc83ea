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
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

SCHEMA_VERSION = 1           # of the manifest and of the trainer state inside checkpoints
MANIFEST_FORMAT = "dist-egnn-checkpoint"

# Configuration keys a resume may change (dotted prefixes). Everything else must match the checkpoint.
MAY_CHANGE = ("resume", "paths", "prepare", "distributed", "engine", "dataset.store", "dataset.auto_prepare",
              "dataset.check_values", "trainer.max_epochs", "trainer.patience", "trainer.eval_every",
              "trainer.progress", "trainer.num_threads", "trainer.device", "trainer.checkpoint_every_steps",
              "trainer.keep_last", "trainer.nonfinite")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, from another configuration or a newer version."""


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
                              f"dist-egnn checkpoint: delete it (and its manifest) to resume from an older one") from err


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


def config_changes(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every leaf that differs between two configurations."""
    changes = []
    for key in sorted(set(before) | set(after), key=str):
        a, b = before.get(key, "<absent>"), after.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


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
    return manifest


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
    where = manifest_path(directory, manifest["tag"])
    if manifest["config_hash"] != config_hash(config):
        changes = config_changes(manifest.get("config", {}), identity(config))
        raise CheckpointError(f"{where} was written with another configuration ({'; '.join(changes[:8]) or 'hash differs'}); "
                              f"resume with the run's own settings (see config.yaml of the run directory), or start "
                              f"a new run directory (another hydra.run.dir) for the new ones")
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing though {where} lists it; the checkpoint is damaged: delete "
                                  f"{where.name} to resume from an older checkpoint")
        size = path.stat().st_size
        if size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} is damaged or was replaced ({size} bytes, {expected['bytes']} written, "
                                  f"or another SHA-256); delete {where.name} to resume from an older checkpoint")


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
    manifest_path(directory, tag).unlink(missing_ok=True)            # first: the tag stops counting
    (directory / f"{tag}.pt").unlink(missing_ok=True)
    shutil.rmtree(directory / tag, ignore_errors=True)


def check_weights_only(path: Path) -> None:
    """Fail unless ``path`` unpickles with ``weights_only=True`` (no code can run while loading it)."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} does not load with weights_only=True ({why(err)}); it is damaged or "
                              f"holds objects that could run code, so it is not loaded") from err
