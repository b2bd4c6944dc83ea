"""Exit codes of the launch scripts: a user's mistake is one line and exit 2, a bug keeps its traceback (exit 1).

User mistakes are the :class:`dist_egnn.errors.BadInput` family (configuration checks, stores, stored
partitions, checkpoints); any other ``ValueError`` is a bug, which must not be reported as "bad input" in
one line with its traceback lost. Bugs are planted by running the script through a small wrapper that
patches one function first (the script itself is unchanged).
"""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dist_egnn.errors import BadInput, ConfigError

ROOT = Path(__file__).resolve().parents[2]
TINY = ["dataset.nbody.num_particles=12", "dataset.nbody.train=6", "dataset.nbody.val=3", "dataset.nbody.test=3",
        "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1",
        "trainer.batch_size=3", "trainer.max_epochs=1", "trainer.progress=false", "trainer.num_threads=1"]
BUG = "planted bug: a ValueError from inside the code, not from the user"


def launch(tmp_path: Path, script: str, *overrides: str, patch: str = "") -> subprocess.CompletedProcess:
    """``python launch/<script> <overrides>``; with ``patch``, that Python code runs first in the same process."""
    path = str(ROOT / "launch" / script)
    args = [f"paths.data={tmp_path / 'data'}", *overrides]
    if script == "train.py":
        args = [args[0], f"hydra.run.dir={tmp_path / 'run'}", *TINY, *args[1:]]
    if patch:
        wrapper = tmp_path / "wrapper.py"
        wrapper.write_text(textwrap.dedent(patch) + textwrap.dedent(f"""
            import runpy, sys
            sys.argv = [{path!r}, *sys.argv[1:]]
            runpy.run_path({path!r}, run_name="__main__")
            """))
        cmd = [sys.executable, str(wrapper), *args]
    else:
        cmd = [sys.executable, path, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def error_lines(stderr: str) -> list[str]:
    """stderr without the warnings libraries print on import."""
    return [line for line in stderr.splitlines() if line.strip() and "Warning" not in line]


def test_a_valueerror_inside_the_model_is_a_bug_with_its_traceback(tmp_path):
    proc = launch(tmp_path, "train.py", patch=f"""
        from dist_egnn.models.fastegnn import FastEGNN

        def forward(self, *args, **kwargs):
            raise ValueError({BUG!r})

        FastEGNN.forward = forward
        """)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert f"ValueError: {BUG}" in proc.stderr
    assert "in forward" in proc.stderr                          # the traceback reaches the frame that raised
    assert "error (rank 0): " + BUG not in proc.stderr          # not reported as bad input


def test_a_bad_configuration_value_is_one_line_with_exit_2(tmp_path):
    proc = launch(tmp_path, "train.py", "trainer.nonfinite=ignore")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == ["error (rank 0): invalid configuration:",
                                        "  trainer.nonfinite='ignore': choose one of ('stop', 'skip')"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # nor Hydra's record of the launch: in a run directory it would replace the record of the run (.hydra/)
    assert not (tmp_path / "run" / ".hydra").exists()


def test_a_refused_start_in_a_used_run_directory_leaves_the_runs_hydra_record(tmp_path):
    """guards: Hydra wrote <run>/.hydra before any check, so a launch refused in an existing run directory
    (exit 2, "nothing changed") replaced the record of the launch that made the run."""
    first = launch(tmp_path, "train.py")
    assert first.returncode == 0, first.stderr[-3000:]
    record = tmp_path / "run" / ".hydra" / "overrides.yaml"
    made = record.read_text()
    assert "trainer.max_epochs=1" in made
    again = launch(tmp_path, "train.py", "trainer.lr=0.5")                  # a fresh start, no resume=auto
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr[-3000:]
    assert record.read_text() == made


def test_a_missing_store_is_bad_input(tmp_path):
    proc = launch(tmp_path, "train.py", "dataset.auto_prepare=false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(error_lines(proc.stderr)) == 1 and "does not exist" in proc.stderr


def test_a_run_directory_that_is_a_file_is_one_line_with_exit_2(tmp_path):
    """Hydra creates the run directory before any of our code runs: its callback checks it first."""
    (tmp_path / "run").write_text("a file where the run directory should be")
    proc = launch(tmp_path, "train.py")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == [f"error: run directory {tmp_path / 'run'} is a file, not a folder: choose "
                                        f"another hydra.run.dir (or paths.runs), or move the file away"]
    assert (tmp_path / "run").read_text() == "a file where the run directory should be"


def test_a_store_made_with_other_parameters_is_one_line_with_exit_2(tmp_path):
    """prepare.py then train.py with another particle count: both refuse the existing store, naming the key."""
    first = launch(tmp_path, "prepare.py", *TINY[:5])        # frames 30 -> 40 of 11 stored: a store, no statistics
    assert first.returncode == 0, first.stderr[-3000:]
    assert "note: no normalisation statistics recorded for delta_t=10" in first.stdout
    for script in ("prepare.py", "train.py"):
        proc = launch(tmp_path, script, *([] if script == "train.py" else TINY[1:5]), "dataset.nbody.num_particles=16")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        lines = error_lines(proc.stderr)
        assert len(lines) == 1 and "dataset.nbody.num_particles: store 12, configured 16" in lines[0], lines
        assert "prepare.overwrite=true" in lines[0]


def test_prepare_reports_a_bug_with_its_traceback(tmp_path):
    proc = launch(tmp_path, "prepare.py", "dataset=nbody_small", patch=f"""
        import dist_egnn.datasets.prepare as prepare

        def prepare_dataset(*args, **kwargs):
            raise ValueError({BUG!r})

        prepare.prepare_dataset = prepare_dataset
        """)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr and f"ValueError: {BUG}" in proc.stderr
    assert "error: " + BUG not in proc.stderr


def test_prepare_reports_bad_md_settings_in_one_line(tmp_path):
    pytest.importorskip("MDAnalysisTests")
    proc = launch(tmp_path, "prepare.py", "dataset=protein_adk", "dataset.md.stride=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error_lines(proc.stderr) == ["error: dataset.md.stride=0: must be >= 1"]


def test_user_errors_are_one_family_of_valueerrors():
    from dist_egnn.datasets.store import StoreError
    from dist_egnn.partitioners.artifacts import StalePartitionError
    from dist_egnn.training.checkpoint import CheckpointError

    for cls in (ConfigError, StoreError, StalePartitionError, CheckpointError):
        assert issubclass(cls, BadInput) and issubclass(cls, ValueError), cls   # `except ValueError` still works


def test_configuration_check_raises_config_error(tmp_path):
    from dist_egnn.config import check

    from runs import config

    with pytest.raises(ConfigError, match="trainer.nonfinite='ignore'"):
        check(config(tmp_path, "trainer.nonfinite=ignore"))


def test_errors_module_is_a_leaf():
    """dist_egnn.errors may be imported by every layer (datasets/ and partitioners/ too): it imports nothing."""
    tree = ast.parse((ROOT / "dist_egnn" / "errors.py").read_text())
    imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert all(isinstance(node, ast.ImportFrom) and node.module == "__future__" for node in imports)
