"""``trainer.normalization``: the units the model works in (docs/maths.md §1, "Normalisation").

``none`` (default): the model sees the data as the loader gives it; nothing here touches a number.

``rms``: the model works in units where the training split's displacement target has RMS 1. With s_x the
displacement RMS and s_v the input-velocity RMS (``datasets/statistics.py``; s_v in training units, after
``dataset.velocity_unit``), the model is called on

    x / s_x,   v / s_v,   speed / s_v,   distance / s_x,   distance_sq / s_x²,   radial_velocity / s_v,   gravity / s_x

(the other features are dimensionless or not lengths: unchanged; ``gravity``, the per-graph field of
``dataset.gravity`` in the task's units, enters the displacement through φ_g, so it is scaled as one), and its
outputs, positions and virtual positions, are multiplied by s_x. Only positive scalars multiply vectors and
nothing shifts one, so a rotation, reflection or translation of the inputs moves the outputs the same way: the
model stays E(3) equivariant. The loss is the MSE in those units (the original MSE / s_x²); the MMD term keeps its value
(``loss.mmd_sigma`` stays a length in the store's unit, converted by :meth:`Normalization.mmd_sigma`), so λ now
weighs it against an MSE of order 1. What is reported, train_mse, val_mse, test_mse and the reference
baselines, stays in the store's units. The statistics go into ``best.pt`` (``normalization``), and
``dist_egnn.load_model`` wraps a model trained so in :class:`NormalizedModel`, which takes and returns the
store's units like the trainer's evaluation.

``radius``: the same with the length unit L = the graphs' radius (``dataset.radius``, else the store's) instead of
s_x (x / L, distance / L, ..., outputs × L; velocities still over s_v), so the target's RMS is s_x / L rather
than 1. Under rms the geometry the model reads scales with 1 / s_x, so with the frame rate: the water3d_like fluid
at 50 fps has s_x ≈ the radius, at 200 fps s_x is a quarter of it, every distance reads 4x larger (a wall 10 m
away: 550 units) and the untrained model starting as constant velocity was off by 2 s_x at its first step (the
loss 4.3, not ~1e-3; docs/results/README.md, "The floor at 200 fps"). In units of the radius the model reads the
same neighbourhoods at any Δt or frame rate, as GNS scales relative positions by its connectivity radius.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dist_egnn.datasets.store import StoreError
from dist_egnn.errors import ConfigError

NORMALIZATIONS = ("none", "rms", "radius")
# Under rms, a displacement RMS below this fraction of the graphs' radius gets a warning: water3d_like trained under
# rms at s_x ≈ the radius (50 fps) and broke from its first steps at s_x = radius / 4 (200 fps); fluid_small_walls
# at 50 fps, s_x = radius / 2.52, trained (study=fluid_small_dt1). The threshold lies between 1/4 (broke) and 1/2.52
# (trained), not at a measured edge.
SMALL_DISPLACEMENT = 0.3


@dataclass(frozen=True)
class Normalization:
    """How model inputs and outputs are scaled: ``mode`` none (identity) or rms; ``length`` s_x and ``velocity``
    s_v (positive scalars); the feature recipes say which feature columns are speeds and distances."""

    mode: str = "none"
    length: float = 1.0
    velocity: float = 1.0
    node_features: tuple[str, ...] = ()
    edge_features: tuple[str, ...] = ()
    statistics: dict[str, Any] = field(default_factory=dict)   # the store's record it came from (reported)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @classmethod
    def rms(cls, record: dict[str, Any], velocity_scale: float, node_features, edge_features,
            where: str = "the store") -> "Normalization":
        """From a store's statistics record (``datasets.statistics``): s_x = displacement RMS, s_v = velocity
        RMS × the loader's velocity scale. A statistic that is zero, negative or not finite (a store in which
        nothing moves) is a StoreError naming ``where`` and the key."""
        check_statistics(record, ("displacement_rms", "velocity_rms"), "rms", where)
        return cls(mode="rms", length=float(record["displacement_rms"]),
                   velocity=float(record["velocity_rms"]) * float(velocity_scale),
                   node_features=tuple(node_features), edge_features=tuple(edge_features), statistics=dict(record))

    @classmethod
    def radius(cls, record: dict[str, Any], velocity_scale: float, radius: float | None, node_features,
               edge_features, where: str = "the store") -> "Normalization":
        """As :meth:`rms`, with lengths in units of the graphs' connectivity radius (``dataset.radius``, else the
        store's) instead of s_x. None or a non-positive radius (a complete graph) is a ConfigError naming the key."""
        if radius is None or not math.isfinite(float(radius)) or float(radius) <= 0:
            raise ConfigError(f"trainer.normalization=radius measures lengths in units of the graphs' radius, which is "
                              f"{radius!r} here (dataset.radius, else the store's; a complete graph has none): set "
                              f"dataset.radius to a positive length or use trainer.normalization=rms")
        check_statistics(record, ("velocity_rms",), "radius", where)
        return cls(mode="radius", length=float(radius), velocity=float(record["velocity_rms"]) * float(velocity_scale),
                   node_features=tuple(node_features), edge_features=tuple(edge_features), statistics=dict(record))

    def small_displacement(self, radius: float | None) -> str | None:
        """Under rms with a radius graph, a warning when s_x is under :data:`SMALL_DISPLACEMENT` times the radius
        (every distance then reads radius / s_x times larger than at s_x ≈ radius); None otherwise."""
        if self.mode != "rms" or radius is None or not self.length < SMALL_DISPLACEMENT * float(radius):
            return None
        return (f"trainer.normalization=rms: the training displacement's RMS s_x = {self.length:.4g} is "
                f"{float(radius) / self.length:.3g}x smaller than the graphs' radius {float(radius):.4g}, so the model "
                f"reads every distance that many times larger than at s_x ≈ radius (on water3d_like at 200 fps, "
                f"s_x = radius / 4, training broke from its first steps; docs/results/README.md, \"The floor at 200 "
                f"fps\"); trainer.normalization=radius keeps lengths in units of the radius at any frame rate")

    # -- what the model sees --------------------------------------------------------------------------
    def inputs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The model's keyword arguments (``GraphBatch.model_inputs()``) in model units; ``kwargs`` itself
        when inactive. Arguments not named here pass unchanged."""
        if not self.active:
            return kwargs
        scaled = dict(kwargs, pos=kwargs["pos"] / self.length, vel=kwargs["vel"] / self.velocity)
        if "node_features" in kwargs:
            scaled["node_features"] = self.columns(kwargs["node_features"], self.node_features,
                                                   {"speed": 1.0 / self.velocity})
        if kwargs.get("gravity") is not None:
            scaled["gravity"] = kwargs["gravity"] / self.length
        if kwargs.get("edge_attr") is not None:
            scaled["edge_attr"] = self.columns(kwargs["edge_attr"], self.edge_features,
                                               {"distance": 1.0 / self.length, "distance_sq": self.length ** -2,
                                                "radial_velocity": 1.0 / self.velocity})
        return scaled

    @staticmethod
    def columns(values: Tensor, recipe: tuple[str, ...], factors: dict[str, float]) -> Tensor:
        """``values`` (n, len(recipe)) with the columns named in ``factors`` multiplied by their factor."""
        scale = [factors.get(name, 1.0) for name in recipe]
        if all(s == 1.0 for s in scale):
            return values
        return values * torch.tensor(scale, dtype=values.dtype, device=values.device)

    def model_units(self, value: Tensor | None) -> Tensor | None:
        """A position (or the target) in model units: ``value / s_x``; unchanged when inactive or None."""
        return value if value is None or not self.active else value / self.length

    def restore(self, pred):
        """A model's ``Prediction`` in the store's units (positions and virtual positions × s_x)."""
        if not self.active:
            return pred
        virtual = pred.virtual_pos
        return pred._replace(pos=pred.pos * self.length, virtual_pos=None if virtual is None else virtual * self.length)

    def call(self, model: Callable[..., Any], kwargs: dict[str, Any]):
        """``model`` on inputs in the store's units, its prediction in the store's units."""
        return self.restore(model(**self.inputs(kwargs)))

    # -- loss and reports -----------------------------------------------------------------------------
    def mmd_sigma(self, sigma: float, kernel: str) -> float:
        """``loss.mmd_sigma`` (store units) in model units, so that every kernel value is the one of the store's
        units: exp(−d²/2σ²) needs σ / s_x, exp(−d/2σ²) needs σ / √s_x."""
        if not self.active:
            return sigma
        return sigma / (self.length if kernel == "gaussian" else math.sqrt(self.length))

    def original_mse(self, mse: float) -> float:
        """An MSE in model units in the store's units (× s_x²)."""
        return mse * self.length ** 2 if self.active else mse

    def describe(self) -> str:
        s = self.statistics
        velocity = f"velocity RMS s_v={self.velocity:.6g} over {s.get('samples')} training samples"
        if self.mode == "radius":
            rms = s.get("displacement_rms", float("nan"))
            return (f"trainer.normalization=radius: lengths in units of the graphs' radius {self.length:.6g} (the "
                    f"displacement's RMS is {rms / self.length:.4g} of it), {velocity}")
        return (f"trainer.normalization=rms: displacement RMS s_x={self.length:.6g} (mean |displacement| "
                f"{s.get('displacement_mean_norm', float('nan')):.6g}), {velocity}")

    # -- saved with the model -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What ``best.pt`` keeps (plain numbers and strings: ``torch.load(weights_only=True)`` reads it)."""
        return dict(mode=self.mode, length=self.length, velocity=self.velocity,
                    node_features=list(self.node_features), edge_features=list(self.edge_features),
                    statistics=dict(self.statistics))

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Normalization":
        mode = state.get("mode")
        if mode not in NORMALIZATIONS:
            raise ConfigError(f"normalization mode {mode!r} in a checkpoint: choose one of {NORMALIZATIONS}")
        return cls(mode=mode, length=float(state["length"]), velocity=float(state["velocity"]),
                   node_features=tuple(state.get("node_features", ())),
                   edge_features=tuple(state.get("edge_features", ())), statistics=dict(state.get("statistics", {})))


NONE = Normalization()


def check_statistics(record: dict[str, Any], keys: tuple[str, ...], mode: str, where: str) -> None:
    """Each of ``keys`` in a store's statistics ``record`` must be a positive finite number (a StoreError naming
    ``where`` and the key): the model's units divide by them."""
    for key in keys:
        value = record.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise StoreError(
                f"{where}: statistics {key}={value!r} over the training split's moving nodes: "
                f"trainer.normalization={mode} divides by it, so it must be a positive number (a store in which "
                f"nothing moves, or no velocities, cannot be normalised); use trainer.normalization=none")


class NormalizedModel(nn.Module):
    """A model trained with ``trainer.normalization`` rms or radius, called in the store's units:
    ``model(**inputs)`` scales the inputs, runs the trained model and returns its ``Prediction`` in the store's
    units. The trained model is ``.model``; its attributes (widths, ``set_comm``) read through."""

    def __init__(self, model: nn.Module, normalization: Normalization):
        super().__init__()
        self.model = model
        self.normalization = normalization

    def forward(self, **inputs):
        return self.normalization.call(self.model, inputs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)
