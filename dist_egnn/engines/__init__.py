"""Engines: one small interface over plain PyTorch, DDP, FSDP and DeepSpeed (docs/design.md §2).

The trainer talks to :class:`~dist_egnn.engines.base.Engine` only: ``engine.model(...)`` runs the forward,
``backward(loss)``, ``step()``, ``save(dir, tag, client_state)`` / ``load(dir, tag)`` for checkpoints and
``export_state()`` / ``import_state()`` for the portable model file. :func:`build_engine` picks one.
"""
from __future__ import annotations

import os
import sys

from dist_egnn.config import zero_stage_problem
from dist_egnn.engines.base import Engine
from dist_egnn.errors import ConfigError

ENGINES = ("auto", "plain", "ddp", "fsdp", "deepspeed")


def resolve_engine(name: str, world_size: int, environ=os.environ, argv=sys.argv) -> str:
    """``auto``: DeepSpeed under the deepspeed launcher, DDP under torchrun or any other multi-process
    launch, plain PyTorch in one process."""
    if name not in ENGINES:
        raise ConfigError(f"engine.name={name!r}: choose one of {ENGINES}")
    if name != "auto":
        return name
    if "CROSS_SIZE" in environ or any(a.startswith("--local_rank") for a in argv):
        return "deepspeed"
    return "ddp" if world_size > 1 else "plain"


def build_engine(name: str, model, make_optimizer, cfg, groups) -> Engine:
    """Wrap ``model`` in the engine ``name`` (already resolved), with ``make_optimizer(parameters)``; every
    engine clips gradients at ``engine.gradient_clipping`` (DeepSpeed through its own configuration)."""
    stage = cfg.engine.get("zero_stage", 0)
    if stage and name != "deepspeed":                  # engine=auto resolved to plain or ddp
        raise ConfigError(zero_stage_problem(stage, f"{name} (engine.name={cfg.engine.get('name', 'auto')})"))
    engine = _build(name, model, make_optimizer, cfg, groups)
    engine.clip = float(cfg.engine.get("gradient_clipping", 0.0) or 0.0)
    return engine


def _build(name: str, model, make_optimizer, cfg, groups) -> Engine:
    if name == "plain":
        from dist_egnn.engines.plain import PlainEngine
        return PlainEngine(model, make_optimizer(model.parameters()), groups)
    if name == "ddp":
        from dist_egnn.engines.ddp import DDPEngine
        return DDPEngine(model, make_optimizer(model.parameters()), groups)
    if name == "fsdp":
        from dist_egnn.engines.fsdp import FSDPEngine
        return FSDPEngine(model, make_optimizer, groups)
    if name == "deepspeed":
        from dist_egnn.engines.deepspeed import DeepSpeedEngine
        return DeepSpeedEngine(model, make_optimizer(model.parameters()), cfg, groups)
    raise ValueError(f"engine {name!r} is not built here; choose one of {ENGINES[1:]}")


__all__ = ["ENGINES", "Engine", "build_engine", "resolve_engine"]
