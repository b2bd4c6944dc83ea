"""Checkpoints written atomically: to a temporary name in the same folder, fsynced, then renamed.

A reader therefore sees either the previous complete file or the new complete one, never a torn write.
Loading uses ``weights_only=True``: a checkpoint cannot execute code.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import torch


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` with torch.save to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
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
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); it is damaged or "
                         f"not a dist-egnn checkpoint") from err
