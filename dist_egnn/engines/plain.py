"""One process, plain PyTorch: the engine of ``python launch/train.py``."""
from __future__ import annotations

from dist_egnn.engines.base import Engine


class PlainEngine(Engine):
    name = "plain"
