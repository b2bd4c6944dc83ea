"""Pushforward (``trainer.pushforward_*``, dist_egnn/training/pushforward.py): a drawn batch starts u task steps
earlier, the model rolls it forward without gradient exactly as a rollout feeds predictions back, and the loss
goes from that predicted state to the true target. The draw depends on (seed, epoch, batch) only, so a resumed
run equals one that never stopped; whole graphs only.

The store of the first tests is test_walls.py's box of falling particles with wall rows (Δt = 1 frame: inputs 0..4);
the runs use tests/runs.py's tiny N-body set with two input frames (0 and 10, Δt = 10).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import dist_egnn
from dist_egnn.config import check
from dist_egnn.datasets.loader import TrajectoryDataset
from dist_egnn.datasets.store import open_store
from dist_egnn.errors import ConfigError
from dist_egnn.training import guard
from dist_egnn.training.pushforward import Pushforward
from dist_egnn.training.rank_data import RankData
from tests.training.test_walls import wall_store

from runs import engine_checkpoint, fit, max_difference, records, results

SHIFT = np.array([0.01, -0.02, 0.005], dtype=np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return wall_store(tmp_path_factory.mktemp("pushforward") / "data" / "walls.zarr")


def shifting(graph) -> torch.Tensor:
    """A stand-in model, walls held: every moving node moves by SHIFT per task step."""
    moved = graph.pos + torch.from_numpy(SHIFT)
    return torch.where(graph.moving.unsqueeze(-1), moved, graph.pos)


def dataset(store) -> TrajectoryDataset:
    """The wall box with a task step of one frame: input frames 0 .. 4."""
    return TrajectoryDataset(open_store(store), "train", delta_t=1, node_features=["speed", "type"],
                             edge_features=["distance"])


def always(data, unrolls: int) -> Pushforward:
    return Pushforward(data, unrolls=unrolls, probability=1.0)


def test_unrolled_batch_is_the_models_own_rollout_with_the_true_target(store):
    """Two unrolls from frame t − 2Δt: inputs = stored positions there + 2 shifts, velocity = the last predicted
    displacement per task step, walls at rest, the graph and features the loader's recipe at those positions,
    the target the batch's own (frame t + Δt)."""
    data = dataset(store)
    rank = RankData(data)
    sample = next(i for i in range(len(data)) if data.locate(i)[1] == 3)
    batch = rank.build([sample])
    push = always(data, 2)
    index = next(i for i in range(50) if push.unrolls_for(batch.sample_ids, 1, i) == 2)   # a batch drawn for 2
    got = push.apply(batch, epoch=1, index=index, predict=shifting)
    assert got is not batch
    scene, frame = data.locate(sample)
    start = data.read_states([(scene, frame - 2 * data.delta_t)])[0]
    moving = batch.graph.moving.numpy()
    want_pos = start[0].copy()
    want_pos[moving] += 2 * SHIFT
    np.testing.assert_allclose(got.graph.pos.numpy(), want_pos, atol=1e-6)
    want_vel = np.zeros_like(want_pos)
    want_vel[moving] = SHIFT * data.per_displacement
    np.testing.assert_allclose(got.graph.vel.numpy(), want_vel, atol=1e-6)
    assert np.array_equal(got.graph.target, batch.graph.target)
    rebuilt = data.make_sample(scene, frame, got.graph.pos.numpy(), got.graph.vel.numpy(), batch.graph.target.numpy(),
                               start[3])
    assert np.array_equal(got.graph.edge_index.numpy(), rebuilt.edge_index)
    assert np.array_equal(got.graph.node_features.numpy(), rebuilt.node_features)
    assert got.sample_ids == batch.sample_ids and np.array_equal(got.mmd_keys, batch.mmd_keys)


def test_an_unrolled_batch_drops_the_target_shift_of_noise_it_no_longer_has(store):
    """trainer.noise_target=shifted moves a noisy batch's target by its input noise; unrolled, the inputs are the
    model's own (no input noise), so the target is the clean stored frame t + Δt again."""
    data = dataset(store)
    noisy = RankData(data, noise=0.01, noise_shifts_target=True)
    sample = next(i for i in range(len(data)) if data.locate(i)[1] == 3)
    batch = noisy.build([sample], seed=5, epoch=1)
    clean = RankData(data).build([sample])
    assert not np.allclose(batch.graph.target, clean.graph.target)            # shifted by the noise
    push = always(data, 1)
    index = next(i for i in range(50) if push.unrolls_for(batch.sample_ids, 1, i) == 1)
    got = push.apply(batch, epoch=1, index=index, predict=shifting)
    assert np.array_equal(got.graph.target, clean.graph.target)


def test_unrolls_stop_at_the_first_input_frame_and_follow_the_draw(store):
    data = dataset(store)
    by_frame = {data.locate(i)[1]: i for i in range(len(data)) if data.locate(i)[0] == 0}   # scene 0: frame -> id
    push = always(data, 3)
    assert push.unrolls_for([by_frame[0]], epoch=1, index=0) == 0             # nothing before the first frame
    assert {push.unrolls_for([by_frame[1]], epoch=1, index=i) for i in range(50)} == {1}   # one step back at most
    assert push.unrolls_for([by_frame[1], by_frame[0]], epoch=1, index=0) == 0   # the batch's earliest frame rules
    draws = [push.unrolls_for([by_frame[4]], epoch=1, index=i) for i in range(200)]
    assert set(draws) == {1, 2, 3}                                           # uniform over 1 .. unrolls
    assert draws == [push.unrolls_for([by_frame[4]], epoch=1, index=i) for i in range(200)]   # a resume draws the same
    assert draws != [push.unrolls_for([by_frame[4]], epoch=2, index=i) for i in range(200)]
    half = Pushforward(data, unrolls=1, probability=0.5)
    share = half.planned_share([[by_frame[4]]] * 400, epoch=1)
    assert 0.4 < share < 0.6                                                 # about the probability
    assert share == np.mean([half.unrolls_for([by_frame[4]], 1, i) > 0 for i in range(400)])
    late = Pushforward(data, unrolls=1, probability=1.0, start_epoch=3)
    assert late.unrolls_for([by_frame[4]], epoch=2, index=0) == 0 and late.unrolls_for([by_frame[4]], 3, 0) == 1
    assert Pushforward(data, unrolls=1, probability=0.0).unrolls_for([by_frame[4]], 1, 0) == 0


def test_a_prediction_with_nan_leaves_the_batch_as_stored(store):
    data = dataset(store)
    batch = RankData(data).build([next(i for i in range(len(data)) if data.locate(i)[1] == 2)])
    got = always(data, 1).apply(batch, 1, 0, predict=lambda graph: torch.full_like(graph.pos, float("nan")))
    assert got is batch


def test_an_unroll_that_flings_a_particle_is_refused_and_said(store, capsys):
    """A rolled-forward state with one particle moved far beyond what the stored data ever moves in a step (the
    SPH fluid's 1,288 m splash) trains on the stored inputs instead, counted and said on stderr; a step within
    the limit is kept."""
    data = dataset(store)
    batch = RankData(data).build([next(i for i in range(len(data)) if data.locate(i)[1] == 2)])
    push = always(data, 1)
    largest = push.largest_stored_step(batch, *data.read_states([data.locate(batch.sample_ids[0])])[0][:2], 1)
    assert largest > 0

    def flinging(distance):
        def predict(graph):
            pos = graph.pos.clone()
            pos[int(torch.nonzero(graph.moving)[0])] += torch.tensor([distance, 0.0, 0.0])
            return pos
        return predict

    kept = push.apply(batch, 1, 0, predict=flinging(0.5 * largest))
    assert kept is not batch and push.refused == 0
    assert push.apply(batch, 1, 0, predict=flinging(1000.0 * largest)) is batch
    assert push.refused == 1
    said = capsys.readouterr().err
    assert "pushforward: epoch 1 batch 0" in said and "trained on its stored inputs instead" in said


@pytest.mark.parametrize("overrides, message", [
    (["trainer.pushforward_unrolls=2", "distributed.parts=2"], "pushforward_unrolls=2 with distributed.parts=2"),
    (["trainer.pushforward_unrolls=1", "trainer.pushforward_prob=1.5"], "pushforward_prob=1.5: a probability"),
    (["trainer.pushforward_unrolls=-1"], "pushforward_unrolls=-1: must be >= 0"),
    (["trainer.pushforward_start_epoch=0"], "pushforward_start_epoch=0: must be >= 1"),
])
def test_bad_pushforward_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(dist_egnn.compose_config(*overrides))


# Two input frames per scene (0 and 10), one graph per batch: about half the batches can start a step earlier.
FRAMES = ["dataset.nbody.steps=2100", "dataset.frame_stop=11", "dataset.frame_stride=10", "trainer.batch_size=1",
          "trainer.steps_per_epoch=4"]
PUSH = [*FRAMES, "trainer.pushforward_unrolls=1", "trainer.pushforward_prob=1.0"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pushforward-runs")
    fit(root / "data", root / "reference", *PUSH)
    return root


def test_pushforward_run_trains_and_reports_its_share(root):
    plain = root / "plain"
    fit(root / "data", plain, *FRAMES)
    pushed, stored = records(root / "reference"), records(plain)
    assert all(0.0 < r["pushforward_share"] < 1.0 for r in pushed[:-1])     # frame-0 batches cannot unroll
    assert "pushforward_share" not in stored[0]
    assert pushed[0]["train_loss"] != stored[0]["train_loss"]             # the unrolled inputs changed the loss
    assert np.isfinite(pushed[-1]["test_mse"])


def test_resumed_pushforward_run_equals_one_that_never_stopped(root, monkeypatch):
    run = root / "stopped"
    monkeypatch.setenv("DIST_EGNN_FAULTS", "sigterm@3")
    with pytest.raises(guard.Stopped):
        fit(root / "data", run, *PUSH)
    monkeypatch.delenv("DIST_EGNN_FAULTS")
    fit(root / "data", run, *PUSH, "resume=auto")
    assert results(run) == results(root / "reference")
    got, want = (engine_checkpoint(r, "epoch-00003") for r in (run, root / "reference"))
    assert max_difference(got["model"], want["model"]) == 0.0
    assert max_difference(got["optimizer"], want["optimizer"]) == 0.0


def test_config_defaults_leave_pushforward_off():
    cfg = dist_egnn.compose_config()
    assert cfg.trainer.pushforward_unrolls == 0
    assert Pushforward.from_config(OmegaConf.create({"trainer": {"seed": 0}}), None) is None
