"""Reference errors of predictors that learn nothing, for reading a study's test MSE.

A trained model is only interesting by how far it gets below these:

    zero motion          x(t + Δt) ≈ x(t)
    constant velocity    x(t + Δt) ≈ x(t) + α v(t), one scalar α fitted by least squares on the training
                         split (so the frame time and the velocity units of each source need not be known)

Both are measured over the same test samples and nodes as ``test_mse`` (mean over every moving node and
coordinate: walls are left out, as in training).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from omegaconf import DictConfig

FIT_SAMPLES = 500          # training samples used to fit α (spread over the split)


def _sums(dataset, indices, alpha: float | None = None) -> tuple[float, float, float, float, int]:
    """Sums over the samples: |d|², d·v, |v|² (d = target - pos), squared error of x + αv, and count."""
    dd = dv = vv = err = 0.0
    count = 0
    for start in range(0, len(indices), 50):
        for s in dataset.read(indices[start:start + 50]):
            rows = slice(None) if getattr(s, "moving", None) is None else s.moving
            d = (s.target - s.pos)[rows].astype(np.float64)
            v = s.vel[rows].astype(np.float64)
            dd += float(np.sum(d * d))
            dv += float(np.sum(d * v))
            vv += float(np.sum(v * v))
            if alpha is not None:
                err += float(np.sum((d - alpha * v) ** 2))
            count += d.size
    return dd, dv, vv, err, count


def trivial_baselines(cfg: DictConfig) -> dict[str, Any]:
    """Test MSE of the zero-motion and the constant-velocity predictor for a resolved training config."""
    from dist_egnn.training.setup import load_splits, open_dataset_store

    cfg = cfg.copy()
    cfg.model.cutoff_rate = 0.0                   # graphs are not used; keep reading cheap and identical
    splits = load_splits(cfg, open_dataset_store(cfg.dataset, progress=False))
    return dict(dataset=cfg.dataset.name, **score(splits["train"], splits["test"]))


def score(train, test) -> dict[str, Any]:
    """Fit α on (up to FIT_SAMPLES of) ``train`` and score both predictors on all of ``test``; the splits
    are anything with ``len`` and ``read(indices) -> samples with pos, vel, target``."""
    alpha, fitted = fit_alpha(train)
    dd, _, _, err, count = _sums(test, np.arange(len(test)), alpha)
    return dict(test_samples=len(test), zero_motion_mse=dd / count, constant_velocity_mse=err / count,
                constant_velocity_alpha=alpha, fit_samples=fitted)


def fit_alpha(train, samples: int = FIT_SAMPLES) -> tuple[float, int]:
    """(α, samples used): the least-squares α of d ≈ α v over up to ``samples`` training samples spread evenly
    over the split (moving nodes only); 0 when no velocity is nonzero."""
    fit_ids = np.unique(np.linspace(0, len(train) - 1, min(samples, len(train))).astype(int))
    _, dv, vv, _, _ = _sums(train, fit_ids)
    return (dv / vv if vv > 0 else 0.0), len(fit_ids)
