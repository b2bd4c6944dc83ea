"""A trained run's model, ready to call: ``dist_egnn.load_model(run_dir)``.

A run directory (``launch/train.py``) holds ``config.yaml`` (the resolved configuration) and
``checkpoints/best.pt`` (``torch.load(weights_only=True)``: ``model``, the portable state dict of the best
evaluation, with ``epoch``, ``val_mse`` and ``config``). :func:`load_model` rebuilds the model from the
``model`` section of ``config.yaml`` (``dist_egnn.training.setup.build_model``), loads the weights, and
returns it in eval mode in the run's ``trainer.dtype``.

The model it returns is the ``torch.nn.Module`` itself (``EGNN`` or ``FastEGNN``), called as in training,
``model(**batch.model_inputs())`` -> ``Prediction(pos, virtual_pos)`` (``dist_egnn.datasets.loader.GraphBatch``);
for a run trained with ``trainer.normalization`` rms or radius it is wrapped in
``dist_egnn.training.normalization.NormalizedModel``, which takes and returns the store's units with the
statistics ``best.pt`` recorded (the trained module is its ``.model``). Three plain attributes are added:

* ``model.config``: the run's configuration (an OmegaConf ``DictConfig``, as read from ``config.yaml``):
  the dataset recipe (``model.config.dataset``: ``delta_t``, ``velocity_unit``, features, radius), which a
  caller needs to build inputs the model was trained on;
* ``model.run_dir``: the run directory (``pathlib.Path``);
* ``model.checkpoint``: what ``best.pt`` says about itself (``epoch``, ``val_mse``, ``val_rollout_mse`` (None
  without a validation rollout), ``selected_on`` (``trainer.select_on``), its path).

Every problem is a :class:`RunError` (a ``BadInput``: exit 2 from the launch scripts) naming the file and the
fix: no ``config.yaml``, one without a key of :data:`REQUIRED_KEYS`, no or unreadable ``best.pt``, weights
whose shapes or names do not match the model ``config.yaml`` builds (a config from another run, or edited
widths).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from dist_egnn.errors import BadInput

CONFIG_FILE = "config.yaml"
BEST_FILE = "checkpoints/best.pt"
DTYPES = {"float32": torch.float32, "float64": torch.float64}
# what a rollout reads from config.yaml with no default (every other key it reads falls back to the default of
# the version that wrote the run, so that older runs still load)
REQUIRED_KEYS = ("dataset.name", "dataset.store", "dataset.delta_t", "dataset.node_features",
                 "dataset.edge_features", "model.name")


class RunError(BadInput):
    """A run directory without a usable model: the message names the file and the fix."""


def read_run_config(run_dir: str | Path) -> DictConfig:
    """``RUN_DIR/config.yaml`` as a DictConfig; a :class:`RunError` when it is missing or not a run's config."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        what = "is a file" if run_dir.exists() else "does not exist"
        raise RunError(f"run directory {run_dir} {what}: give the folder launch/train.py printed "
                       f"(`run directory: ...`), e.g. run=runs/nbody_small-fastegnn/<date>")
    if not path.is_file():
        raise RunError(f"{path} is missing: {run_dir} is not a finished training run (launch/train.py writes "
                       f"config.yaml when training starts); give the run directory launch/train.py printed, or "
                       f"train one first")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # yaml and OmegaConf raise several types
        raise RunError(f"{path} cannot be read ({type(err).__name__}: {err}); restore the run's config.yaml") from err
    if not isinstance(cfg, DictConfig) or not all(k in cfg for k in ("model", "dataset", "trainer")):
        raise RunError(f"{path} lacks the model, dataset or trainer section of a training configuration; "
                       f"restore the config.yaml launch/train.py wrote")
    missing = [key for key in REQUIRED_KEYS if OmegaConf.select(cfg, key, default=None) is None]
    if missing:
        raise RunError(f"{path} lacks {', '.join(missing)}, which the model's inputs are built from: restore the "
                       f"config.yaml launch/train.py wrote (checkpoints/best.pt keeps a copy under its 'config' key)")
    return cfg


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> torch.nn.Module:
    """The trained model of ``run_dir`` in eval mode; see the module docstring.

    Args:
        run_dir: a run directory of ``launch/train.py`` (``config.yaml`` and ``checkpoints/best.pt``).
        device: where the model lives (``"cpu"``, ``"cuda"``, ...).
        dtype: ``"float32"``/``"float64"`` (or a torch dtype); None: the run's ``trainer.dtype``.
    """
    from dist_egnn.training.setup import build_model, has_external_field  # lazy: `import dist_egnn` stays light

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    best = run_dir / BEST_FILE
    if not best.is_file():
        raise RunError(f"{best} is missing: the run has not finished an evaluation yet (best.pt is written "
                       f"after the first one); wait for it, continue the run with resume=auto "
                       f"(hydra.run.dir={run_dir}), or give another run directory")
    try:
        saved = torch.load(best, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunError(f"{best} cannot be loaded safely ({type(err).__name__}: {str(err)[:200]}); it is damaged "
                       f"or not a dist-egnn checkpoint: train the run again or take another run") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise RunError(f"{best} holds no 'model' state dict; it is not a dist-egnn best.pt: train the run again")
    dtype = _dtype(dtype if dtype is not None else cfg.trainer.get("dtype", "float32"))
    try:
        model = build_model(cfg.model, device, external_field=has_external_field(cfg.dataset))
    except BadInput as err:
        raise RunError(f"{run_dir / CONFIG_FILE}: {err}") from err
    except (TypeError, ValueError, KeyError, AttributeError) as err:   # widths that cannot build a model
        raise RunError(f"{run_dir / CONFIG_FILE}: its model section cannot build a model ({err}); restore the "
                       f"config.yaml launch/train.py wrote") from err
    check_state(model, saved["model"], cfg, run_dir)
    model.load_state_dict(saved["model"])
    model = normalized(model, saved, cfg, best)
    model.to(device=device, dtype=dtype).eval()
    model.config = cfg
    model.run_dir = run_dir
    model.checkpoint = {"path": str(best), "epoch": saved.get("epoch"), "val_mse": saved.get("val_mse"),
                        "val_rollout_mse": saved.get("val_rollout_mse"),
                        "selected_on": saved.get("selected_on", "val_mse")}
    return model


def normalized(model: torch.nn.Module, saved: dict[str, Any], cfg: DictConfig, best: Path) -> torch.nn.Module:
    """The model as the trainer called it: with ``trainer.normalization`` rms or radius wrapped in
    ``NormalizedModel`` with the scales ``best.pt`` recorded (inputs scaled, outputs in the store's units); else
    the model itself."""
    from dist_egnn.training.normalization import Normalization, NormalizedModel

    mode = cfg.trainer.get("normalization", "none")
    if mode == "none":
        return model
    state = saved.get("normalization")
    if not isinstance(state, dict):
        raise RunError(f"{best} holds no 'normalization' statistics, but its config.yaml says trainer.normalization="
                       f"{mode}: the model's units are unknown; restore the best.pt written with this config.yaml, "
                       f"or train the run again")
    return NormalizedModel(model, Normalization.from_state(state))


def check_state(model: torch.nn.Module, state: dict[str, Any], cfg: DictConfig, run_dir: Path) -> None:
    """Every weight of ``best.pt`` must have a parameter of its name and shape in the model config.yaml
    builds; the first mismatches are named with the config keys that set those widths."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    extra = [k for k in state if k not in mine]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in mine.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or extra or shapes):
        return
    m, d = cfg.model, cfg.dataset
    widths = (f"model.name={m.get('name')}, model.hidden={m.get('hidden')}, model.layers={m.get('layers')}, "
              f"model.virtual_channels={m.get('virtual_channels')}, model.node_features={m.get('node_features')} "
              f"(dataset.node_features={list(d.get('node_features', []))}), "
              f"model.edge_features={m.get('edge_features')} "
              f"(dataset.edge_features={list(d.get('edge_features', []))}), "
              f"dataset.gravity={d.get('gravity')} (set: phi_g, field_mlp, in every layer)")
    found = []
    if shapes:
        found.append("shapes differ: " + "; ".join(f"{k} {a} in best.pt, {b} from config.yaml"
                                                   for k, a, b in shapes[:4]))
    if missing:
        found.append(f"best.pt lacks {missing[:4]}")
    if extra:
        found.append(f"config.yaml's model has no {extra[:4]}")
    raise RunError(f"{run_dir / BEST_FILE} does not match the model {run_dir / CONFIG_FILE} builds ({widths}): "
                   f"{'; '.join(found)}. The config.yaml was edited or belongs to another run: restore the one "
                   f"written with this checkpoint (best.pt keeps a copy under its 'config' key)")


def _dtype(value: str | torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise RunError(f"dtype={value!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[value]
