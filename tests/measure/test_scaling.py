"""The scaling study: the projection arithmetic, the part stand-in communicator, and one tiny end-to-end run."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_egnn.measure.scaling import PartTwin, communication_seconds, project
from dist_egnn.partitioners.subgraphs import HaloPlan

ROOT = Path(__file__).resolve().parents[2]
LINKS = dict(allreduce_alpha_s=1e-4, allreduce_beta_bytes_per_s=1e9, alltoall_alpha_s=2e-4,
             alltoall_beta_bytes_per_s=5e8)


def part(step: float, **kw):
    base = dict(parts=4, step_time_s=step, allreduce_calls=10, allreduce_bytes=10_000, halo_calls=4,
                halo_bytes=1_000_000, edges=100.0, owned=10.0, halo_rows=3.0, full_edges=500.0,
                peak_rss_mb=500.0, baseline_rss_mb=300.0)
    return {**base, **kw}


def test_communication_model():
    """Guards the documented cost model: all-reduce ⌈log2 P⌉(α + b/β), all-to-all (P−1)α + b/β, ×2 for backward."""
    expected = 2 * 2 * (10 * 1e-4 + 10_000 / 1e9) + 2 * (4 * 3 * 2e-4 + 1_000_000 / 5e8)
    assert communication_seconds(part(1.0), 4, LINKS) == pytest.approx(expected)
    assert communication_seconds(part(1.0), 1, LINKS) == 0.0


def test_projection_takes_the_slowest_part():
    row = project([part(0.5), part(0.9, edges=140.0), part(0.7)], LINKS)
    assert row["compute_s"] == 0.9 and row["edges_per_rank"] == 140.0
    assert row["step_time_s"] == pytest.approx(0.9 + communication_seconds(part(0.9), 4, LINKS))
    assert row["added_mem_mb"] == 200.0


def test_part_twin_appends_halo_rows_and_counts_bytes():
    twin = PartTwin(2)
    twin.set_halo_plan(HaloPlan(torch.tensor([0, 2]), [0, 2], [0, 3]))
    h, pos = torch.ones(4, 5), torch.ones(4, 3)
    h_all, pos_all = twin.exchange_halo(h, pos)
    assert h_all.shape == (7, 5) and pos_all.shape == (7, 3)
    assert twin.halo_bytes == (2 + 3) * 8 * 4
    (total,) = twin.sum_over_parts(torch.ones(2, 3))
    assert torch.equal(total, torch.ones(2, 3)) and twin.allreduce_bytes == 24


def test_study_end_to_end(tmp_path):
    """Guards the study command itself (prepare, links, projections, a real 2-rank run, the outputs)."""
    tiny = ["dataset.radius=1.5", f"paths.data={tmp_path / 'data'}", "dataset.nbody.num_particles=30",
            "dataset.nbody.train=2", "dataset.nbody.val=1", "dataset.nbody.test=1", "dataset.nbody.steps=1100",
            "dataset.frame_start=0", "dataset.frame_stop=1", "model.hidden=8", "model.layers=1"]
    cmd = [sys.executable, str(ROOT / "launch" / "scaling.py"), "data=nbody_small", "parts=[1,2]", "halo=[exact]",
           "steps=1", "link_repeats=2", f"overrides=[{','.join(repr(o) for o in tiny)}]",
           f"results_dir={tmp_path / 'out'}", f"work_dir={tmp_path / 'runs'}", "progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    every = list(csv.DictReader(open(tmp_path / "out" / "scaling-nbody_small.csv")))
    rows = [r for r in every if r["kind"] in ("projected", "real")]
    assert {(r["kind"], r["parts"]) for r in rows} == {("projected", "1"), ("real", "1"), ("projected", "2"),
                                                        ("real", "2")}
    # costs (default): the projection to 10M nodes over 64 ranks, over two links; partitioning and loading
    assert [(r["kind"], r["parts"]) for r in every if r not in rows] == [("projected 10M", "64")] * 2
    costs = list(csv.DictReader(open(tmp_path / "out" / "scaling-nbody_small-costs.csv")))
    assert [(r["table"], r["parts"]) for r in costs] == [("partition", "2"), ("load", "1"), ("load", "2")]
    assert all(float(r["step_time_s"]) > 0 and r["edges_per_rank"] and r["dropped_edge_fraction"] for r in rows)
    assert "Check, P = 2, halo exact" in (tmp_path / "out" / "scaling-nbody_small.md").read_text()
    assert (tmp_path / "out" / "scaling-nbody_small.png").stat().st_size > 10_000
    # one measurement is one table: a smaller one (P = 1 only) would replace P = 2's rows, so it stops first
    before = (tmp_path / "out" / "scaling-nbody_small.csv").read_text()
    smaller = subprocess.run(cmd[:3] + ["parts=[1]"] + cmd[4:], capture_output=True, text=True, cwd=tmp_path,
                             timeout=120)
    assert smaller.returncode == 2 and "scaling-nbody_small.csv holds results" in smaller.stderr
    assert "(2, 'exact')" in smaller.stderr and "name=NEW" in smaller.stderr and "overwrite=true" in smaller.stderr
    assert (tmp_path / "out" / "scaling-nbody_small.csv").read_text() == before


@pytest.mark.parametrize("module, fewer", [("latency", ["--parts", "2"]), ("straggler", ["--project"])])
def test_a_measurement_of_fewer_settings_does_not_replace_a_table(tmp_path, module, fewer):
    """latency and straggler write one table per measurement: started with fewer settings than the table at --out
    holds (the committed one), they stop before any work and the table stays as it was."""
    table = tmp_path / f"{module}.csv"
    table.write_text((ROOT / "docs" / "results" / f"{module}.csv").read_text())
    proc = subprocess.run([sys.executable, "-m", f"dist_egnn.measure.{module}", "--out", str(tmp_path / module),
                           *fewer], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and f"{table} holds results" in proc.stderr and "--overwrite" in proc.stderr
    assert table.read_text() == (ROOT / "docs" / "results" / f"{module}.csv").read_text()


def test_a_table_of_an_older_layout_is_refused_not_a_traceback(tmp_path):
    """A latency table written before its overlap column: its rows cannot be compared, so they count as lost."""
    from dist_egnn.measure.reporting import shrink_problem

    table = tmp_path / "latency.csv"
    table.write_text("parts,halo,latency_ms,step_time_s\n2,exact,0.0,1.0\n")
    problem = shrink_problem(table, lambda row: (int(row["parts"]), row["halo"], row["overlap"] == "True"),
                             {(2, "exact", False)}, "--out PATH", "--overwrite")
    assert "rows of an older table layout" in problem and "--overwrite" in problem
    assert shrink_problem(tmp_path / "none.csv", lambda row: None, set(), "--out PATH", "--overwrite") is None
