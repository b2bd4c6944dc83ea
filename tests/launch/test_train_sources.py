"""`launch/train.py dataset=NAME` trains on the store of every source (made on first use), and
`launch/prepare.py` stops on bad input with exit code 2 and a message naming the file."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_gns import write_folder

ROOT = Path(__file__).resolve().parents[2]
SMALL_MODEL = ["model.hidden=8", "model.layers=1", "trainer.max_epochs=1", "trainer.batch_size=2",
               "trainer.eval_batch_size=4", "trainer.progress=false", "trainer.num_threads=1"]


def run(script: str, tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / script), f"paths.data={tmp_path / 'data'}", *overrides]
    if script == "train.py":
        cmd.append(f"hydra.run.dir={tmp_path / 'run'}")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})


def final_record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])


def test_train_on_sph_fluid(tmp_path):
    from dist_egnn.datasets.sph import simulator_available

    ok, reason = simulator_available()
    if not ok:
        pytest.skip(reason)
    proc = run("train.py", tmp_path, "dataset=fluid_small", "dataset.sph.num_particles=100", "dataset.sph.train=1",
               "dataset.sph.val=1", "dataset.sph.test=1", "dataset.sph.duration=0.08", "dataset.sph.box=[0.8,1.6,0.8]",
               "dataset.delta_t=1", *SMALL_MODEL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_mse" in final_record(tmp_path)
    assert (tmp_path / "data" / "fluid_small.zarr").exists()


def test_train_on_protein_md(tmp_path):
    pytest.importorskip("MDAnalysisTests")
    proc = run("train.py", tmp_path, "dataset=protein_adk", "dataset.frame_stride=25", *SMALL_MODEL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_mse" in final_record(tmp_path)


def test_train_on_converted_gns_files(tmp_path):
    pytest.importorskip("h5py")
    write_folder(tmp_path / "Water-3D", trajectories={"train.h5": [(8, 30)], "valid.h5": [(6, 20)],
                                                      "test.h5": [(6, 20)]})
    proc = run("prepare.py", tmp_path, "dataset=water3d", f"dataset.gns.path={tmp_path / 'Water-3D'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "water3d.zarr: valid" in proc.stdout
    proc = run("train.py", tmp_path, "dataset=water3d", "dataset.delta_t=2", "dataset.radius=0.05", *SMALL_MODEL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_mse" in final_record(tmp_path)


def test_prepare_reports_bad_input_with_exit_code_2(tmp_path):
    proc = run("prepare.py", tmp_path, "dataset=water3d", f"dataset.gns.path={tmp_path / 'missing'}")
    assert proc.returncode == 2
    assert f"{tmp_path / 'missing'} is not a folder" in proc.stderr
