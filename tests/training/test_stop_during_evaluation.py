"""A stop signal that arrives while the trainer evaluates: a checkpoint, a clear message, exit code 75.

Guards issue 18's "SIGTERM during an evaluation exits 1 with AttributeError: 'str' object has no attribute
'with_suffix'": the evaluation's checkpoint path is what the message names.
"""
import pytest

from dist_egnn.training import guard
from dist_egnn.training.trainer import Trainer

from runs import config


def test_signal_during_validation_stops_with_the_evaluation_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer.from_config(config(tmp_path / "data", "trainer.checkpoint_every_steps=0"), tmp_path / "run")
    evaluate = trainer.evaluate

    def interrupted(split):
        trainer.signals.received = "SIGTERM"          # as StopSignals.handle sets it when the signal lands
        return evaluate(split)

    monkeypatch.setattr(trainer, "evaluate", interrupted)
    with pytest.raises(guard.Stopped) as stop:
        trainer.fit()
    message = str(stop.value)
    assert "stopped by SIGTERM after epoch 1" in message
    assert str(tmp_path / "run" / "checkpoints" / "engine" / "epoch-00001") in message
    assert (tmp_path / "run" / "checkpoints" / "engine" / "epoch-00001.json").is_file()
    assert "resume=auto" in message
