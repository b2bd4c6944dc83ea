"""`python launch/gpu_check.py --dry-run`: every stage of the one-call GPU validation runs on the CPU."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("environment", "device_vs_cpu", "fused_vs_plain", "bf16", "determinism", "speed", "deepspeed")


def test_dry_run_passes_every_stage_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu.md"
    # One CPU thread: on the CPU the stages are a smoke run of the GPU check (its numbers mean nothing); torch's
    # default of every core, beside the other test worker, spends more time spinning than computing (~2x slower).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    assert "python launch/gpu_check.py --dry-run" in report
    summary = report[report.index("### summary"):]
    for stage in STAGES:
        assert f"| {stage} | ok |" in summary
    assert "authors' structure fp32" in report and "ours bf16" in report
    assert "| resume | 0 |" in report                       # the resumed run exited 0
