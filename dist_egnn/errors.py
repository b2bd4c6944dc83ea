"""The errors that report a user's mistake, as opposed to a bug.

:class:`BadInput` is the family: a configuration value, a file, a store, a stored partition, a checkpoint or a
launch the user can fix, with a message that names it and says how. The launch scripts (``launch/train.py``,
``launch/prepare.py``) print such an error as one line and exit 2; any other exception, a ``ValueError``
included, is a bug and keeps its traceback (exit 1).

Members: :class:`ConfigError` (``dist_egnn.config.check``), ``datasets.store.StoreError``,
``partitioners.artifacts.StalePartitionError``, ``training.checkpoint.CheckpointError``. Every one is a
``ValueError``, so callers that catch ``ValueError`` keep working.
"""
from __future__ import annotations


class BadInput(ValueError):
    """A mistake in what the user gave (configuration, files, launch); the message names it and the fix."""


class ConfigError(BadInput):
    """A configuration value that its type allows but the run cannot use (``dist_egnn.config.check``)."""
