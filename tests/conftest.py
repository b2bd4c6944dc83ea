import os
import sys
from pathlib import Path

# tests/equivariance.py and friends are helpers, importable as plain modules.
sys.path.insert(0, str(Path(__file__).parent))


def pytest_xdist_auto_num_workers(config) -> int:
    """Workers for ``-n auto`` (pyproject.toml): one per core, at most 4. Most of the suite's time is whole runs
    started as processes (imports, DeepSpeed and torchrun launchers, small trainings) that keep one core busy
    each, so two workers on CI's 2 cores take the suite from 14 to 9 minutes. More than 4 would mostly add
    memory (each worker's runs hold ~1 GB) and ranks competing for the same cores."""
    return max(1, min(4, len(os.sched_getaffinity(0))))
