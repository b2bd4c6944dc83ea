"""Validation rollouts and selection on them (trainer.val_rollout_steps, trainer.select_on): every evaluation records
the rollout ``launch/predict.py split=val`` would make of its weights, and best.pt, early stopping and the plateau
schedule follow the number trainer.select_on names.

Runs happen in this process (tests/runs.py) on the tiny N-body set with Δt = 3 frames, so that the 11 stored
frames hold 3 task steps after frame 0.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import dist_egnn
from dist_egnn.config import check
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.inference.rollout import Rollout, rollout
from dist_egnn.training import guard
from dist_egnn.training.validation import better, summarize

from runs import config, engine_checkpoint, fit, max_difference, records, results

# lr 5e-3: large enough that the weights move between the evaluations, so the numbers differ from epoch to epoch
COMMON = ("dataset.delta_t=3", "trainer.checkpoint_every_steps=0", "trainer.max_epochs=4", "trainer.lr=5e-3",
          "trainer.val_rollout_steps=3")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """root/one_step and root/rollout: the same training, best.pt picked on val_mse and on val_rollout_mse."""
    root = tmp_path_factory.mktemp("validation_rollout")
    fit(root / "data", root / "one_step", *COMMON)
    fit(root / "data", root / "rollout", *COMMON, "trainer.select_on=val_rollout_mse")
    return root


def evaluations(run: Path) -> list[dict]:
    return [r for r in records(run) if "test_mse" not in r]


def test_every_evaluation_records_the_rollout_predict_would_make(root):
    """The recorded number is the mean per-step MSE of the rollout that dist_egnn's rollout makes of the same
    weights on the validation split, and constant velocity's is the same at every evaluation."""
    evals = evaluations(root / "rollout")
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert all(r["val_rollout_steps"] == 3 and math.isfinite(r["val_rollout_mse"]) for r in evals)
    assert len({r["val_rollout_baseline_mse"] for r in evals}) == 1
    assert len({r["val_rollout_mse"] for r in evals}) == 4                  # the weights moved
    assert "val_rollout_outside" not in evals[0]                            # N-body has no walls
    model = dist_egnn.load_model(root / "rollout")
    again = rollout(model, model.config, open_store(model.config.dataset.store), "val", 3)
    best = next(r for r in evals if r["epoch"] == model.checkpoint["epoch"])
    assert float(np.mean(again.mse)) == pytest.approx(best["val_rollout_mse"], rel=1e-6)
    assert float(np.mean(again.baseline_mse)) == pytest.approx(best["val_rollout_baseline_mse"], rel=1e-6)
    assert again.mse[0] == pytest.approx(best["val_mse"], rel=1e-6)       # step 1 is the one-step validation


def test_predict_of_a_bf16_run_repeats_its_validation_rollout(root, tmp_path):
    """A trainer.precision=bf16 run scores its validation rollout under bf16 autocast; launch/predict.py split=val
    rolls the same weights out the same way (it used float32 products: another number than the run's)."""
    from hydra import compose, initialize_config_dir

    from dist_egnn.config import register
    from dist_egnn.inference.predict import predict

    register()
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "launch" / "conf"), version_base="1.3"):
        options = compose("predict", overrides=["progress=false", f"run={tmp_path / 'bf16'}", "split=val", "steps=3",
                                                f"out={tmp_path / 'out'}"])

    fit(root / "data", tmp_path / "bf16", *COMMON, "trainer.precision=bf16")
    model = dist_egnn.load_model(tmp_path / "bf16")
    best = next(r for r in evaluations(tmp_path / "bf16") if r["epoch"] == model.checkpoint["epoch"])
    record = predict(options)
    assert float(np.mean(record["mse"])) == pytest.approx(best["val_rollout_mse"], rel=1e-6)
    assert record["precision"] == "bf16"


def test_best_model_follows_select_on(root):
    """Selection changes which weights are saved and tested, not the training: both runs evaluate the same
    numbers, and each keeps the evaluation where its own number is smallest."""
    one_step, on_rollout = evaluations(root / "one_step"), evaluations(root / "rollout")
    for key in ("train_loss", "val_mse", "val_rollout_mse"):
        assert [r[key] for r in one_step] == [r[key] for r in on_rollout]
    picked = []
    for run, metric, evals in (("one_step", "val_mse", one_step), ("rollout", "val_rollout_mse", on_rollout)):
        best = torch.load(root / run / "checkpoints" / "best.pt", weights_only=True)
        chosen = min(evals, key=lambda r: r[metric])
        picked.append(chosen["epoch"])
        assert best["epoch"] == chosen["epoch"] and best["selected_on"] == metric
        assert best[metric] == chosen[metric] and best["val_rollout_mse"] == chosen["val_rollout_mse"]
        assert records(root / run)[-1]["epoch"] == chosen["epoch"]          # the test line is that model's
    assert picked[0] != picked[1]          # at these settings the two disagree (epochs 1 and 3): the test tells
    assert dist_egnn.load_model(root / "rollout").checkpoint["selected_on"] == "val_rollout_mse"


def test_stopped_and_resumed_run_selects_as_one_that_never_stopped(root, monkeypatch):
    """Guards the best evaluation's rollout numbers in the checkpoints' trainer state, and a plateau schedule
    driven by them: a run stopped mid-epoch and resumed equals one that never stopped."""
    options = (*COMMON, "trainer.select_on=val_rollout_mse", "trainer.scheduler=plateau",
               "trainer.plateau_patience=0")
    fit(root / "data", root / "plateau", *options)
    monkeypatch.setenv("DIST_EGNN_FAULTS", "sigterm@3")
    with pytest.raises(guard.Stopped):
        fit(root / "data", root / "plateau-stopped", *options)
    monkeypatch.delenv("DIST_EGNN_FAULTS")
    fit(root / "data", root / "plateau-stopped", *options, "resume=auto")
    assert results(root / "plateau-stopped") == results(root / "plateau")
    # the rollout's number drove the rate: it rose at epoch 4 (13.8 after 0.057), so the rate halved after it
    assert engine_checkpoint(root / "plateau", "epoch-00004")["optimizer"]["param_groups"][0]["lr"] == 2.5e-3
    best = [torch.load(r / "checkpoints" / "best.pt", weights_only=True) for r in (root / "plateau-stopped",
                                                                                 root / "plateau")]
    assert best[0]["epoch"] == best[1]["epoch"] and max_difference(best[0]["model"], best[1]["model"]) == 0.0


def result(mse: list[float], outside: float = math.nan) -> Rollout:
    empty = np.zeros((0, 3))
    return Rollout(split="val", start=0, delta_t=1, requested=5, scenes=[0], scene_ptr=np.array([0, 0]), pred=empty,
                   vel=empty, truth=empty, baseline=empty, scalars=empty, moving=np.zeros(0, bool), mse=mse,
                   baseline_mse=[2.0] * len(mse), outside_share=[0.0] * (len(mse) - 1) + [outside])


def test_a_diverged_rollout_scores_inf_and_ranks_by_the_steps_it_reached():
    finished = summarize(result([1.0, 2.0, 3.0, 4.0, 5.0], outside=0.25), 5)
    assert finished == dict(val_rollout_mse=3.0, val_rollout_baseline_mse=2.0, val_rollout_steps=5,
                            val_rollout_outside=0.25)
    short, shorter = summarize(result([1.0, 2.0, 3.0]), 5), summarize(result([0.5]), 5)
    assert short["val_rollout_mse"] == math.inf and short["val_rollout_steps"] == 3
    metric = "val_rollout_mse"
    assert better(shorter, dict(val_mse=math.inf, epoch=0), metric)       # a first evaluation is kept, diverged or not
    assert better(short, shorter, metric) and not better(shorter, short, metric)
    assert better(finished, short, metric) and not better(short, finished, metric)
    assert not better(dict(val_mse=math.nan), dict(val_mse=math.inf), "val_mse")     # one step: NaN never wins


@pytest.mark.parametrize("overrides, words", [
    (("trainer.select_on=val_rollout_mse",), ("trainer.select_on=val_rollout_mse", "trainer.val_rollout_steps=K")),
    (("trainer.select_on=last",), ("trainer.select_on='last'", "val_rollout_mse")),
    (("trainer.val_rollout_steps=2", "distributed.parts=2"), ("distributed.parts=1", "launch/predict.py")),
    (("trainer.val_rollout_steps=-1",), ("trainer.val_rollout_steps=-1", ">= 0")),
])
def test_settings_that_make_no_sense_are_refused_by_name(tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        check(config(tmp_path / "data", *overrides))
    assert all(w in str(err.value) for w in words), str(err.value)


@pytest.mark.parametrize("overrides, words", [
    (("dataset.delta_t=3", "trainer.val_rollout_steps=4"), ("trainer.val_rollout_steps=4", "<= 3")),
    (("dataset.delta_t=3", "trainer.val_rollout_steps=1", "trainer.val_rollout_start=9"),
     ("from input frame 9", "trainer.val_rollout_steps <= 0")),
    (("dataset.delta_t=3", "trainer.val_rollout_steps=1", "trainer.val_rollout_scenes=4"),
     ("trainer.val_rollout_scenes=4", "at most 3")),
    (("dataset.delta_t=3", "dataset.input_velocity=displacement", "dataset.frame_start=3", "dataset.frame_stop=4",
      "trainer.val_rollout_steps=1", "trainer.val_rollout_start=0"),
     ("trainer.val_rollout_start=0", "input_velocity=displacement", "frame 3")),
])
def test_a_rollout_the_validation_split_cannot_hold_is_refused_before_training(root, tmp_path, overrides, words):
    with pytest.raises(ConfigError) as err:
        fit(root / "data", tmp_path / "run", *overrides)
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_curves_draw_a_diverged_rollout_as_a_gap(root):
    """curves.png of the rollout-selected run holds the rollout's line, and an evaluation whose rollout diverged
    (inf) leaves a gap instead of breaking the log scale."""
    from dist_egnn.training.curves import render

    assert (root / "rollout" / "curves.png").stat().st_size > 0
    evals = [dict(epoch=1, train_loss=1.0, val_mse=0.5, val_rollout_mse=math.inf),
             dict(epoch=2, train_loss=0.8, val_mse=0.4, val_rollout_mse=3.0)]
    assert render(evals, {}).startswith(b"\x89PNG")
