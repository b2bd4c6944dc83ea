"""`python launch/soak.py`: the soak script records every step's memory and writes the CSV, plot and summary."""
import json
import os
import subprocess
import sys

from runs import ROOT, TINY


def test_soak_records_memory_per_step(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "soak.py"), f"paths.data={tmp_path / 'data'}",
                           f"hydra.run.dir={tmp_path / 'soak'}", *TINY, "trainer.max_epochs=2"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "soak" / "soak"
    rows = (out / "rank0.csv").read_text().splitlines()
    assert rows[0] == "step,rss_mb,elapsed_s" and [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_rank"][0]["steps"] == 4 and summary["per_rank"][0]["rss_max_mb"] > 0
    assert len(summary["per_rank"][0]["block_mean_rss_mb"]) == 4
    assert (out / "memory.png").stat().st_size > 0
