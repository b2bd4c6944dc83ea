"""The asv suite stays runnable: every benchmark runs once on a tiny graph; the configurations parse.

Guards: a benchmark broken by an API change (it would only show up in a long asv run), a reference model
that drifts from ours, an asv configuration that asv cannot read.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from equivariance import random_graph

BENCH = Path(__file__).resolve().parents[2] / "asv_bench"
sys.path.insert(0, str(BENCH))

from dist_egnn.models import EGNN, FastEGNN  # noqa: E402

from benchmarks.reference import ReferenceEGNN, ReferenceFastEGNN  # noqa: E402


def test_every_benchmark_runs_once_on_a_tiny_graph():
    env = {**os.environ, "DIST_EGNN_BENCH_TINY": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "run_once.py")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    summary = out.stdout.strip().splitlines()[-1]
    ran = int(summary.split()[0])
    assert ran >= 40 and " 0 failed" in summary, out.stdout[-4000:]


@pytest.mark.parametrize("name", ["asv.conf.json", "asv.continuous.conf.json"])
def test_asv_configurations_parse(name):
    text = re.sub(r"^\s*//.*$", "", (BENCH / name).read_text(), flags=re.M)   # asv allows // comments
    conf = json.loads(text)
    assert conf["version"] == 1 and conf["benchmark_dir"] == "benchmarks" and conf["repo"] == ".."
    assert conf["environment_type"] == ("existing" if name == "asv.conf.json" else "virtualenv")
    assert (BENCH / conf["benchmark_dir"] / "__init__.py").exists()


@pytest.mark.parametrize("ours_cls, reference_cls, params", [(FastEGNN, ReferenceFastEGNN, 284_804),
                                                            (EGNN, ReferenceEGNN, 134_084)])
def test_reference_model_is_the_same_function_with_the_same_parameters(ours_cls, reference_cls, params):
    # the speed/memory baseline must compute exactly what our model computes, or the comparison is void
    torch.manual_seed(0)
    ours = ours_cls().double()
    for name, module in ours.named_modules():
        if name.endswith(("coord_mlp", "virtual_coord_mlp", "virtual_pos_mlp")):
            torch.nn.init.normal_(module[2].weight, std=0.3)
    reference = reference_cls().double()
    reference.load_state_dict(ours.state_dict())
    assert sum(p.numel() for p in reference.parameters()) == params
    graph = random_graph(num_graphs=3, nodes=15)
    mine, theirs = ours(**graph.kwargs()), reference(**graph.kwargs())
    assert torch.allclose(mine.pos, theirs[0], rtol=1e-12, atol=1e-12)
    if mine.virtual_pos is not None:
        assert torch.allclose(mine.virtual_pos, theirs[1], rtol=1e-12, atol=1e-12)
    mine.pos.square().sum().backward()
    theirs[0].square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in (a, b)]   # unused: None or 0
        assert torch.allclose(*grads, rtol=1e-9, atol=1e-11), name


def test_asv_runs_a_benchmark_and_publish_builds_the_dashboard(tmp_path):
    """The real asv tool end to end on the installed environment: run one benchmark, publish the HTML."""
    asv = Path(sys.executable).with_name("asv")
    conf = json.loads(re.sub(r"^\s*//.*$", "", (BENCH / "asv.conf.json").read_text(), flags=re.M))
    conf.update(repo=str(BENCH.parent), benchmark_dir=str(BENCH / "benchmarks"), env_dir=str(tmp_path / "env"),
                results_dir=str(tmp_path / "results"), html_dir=str(tmp_path / "html"))
    (tmp_path / "asv.conf.json").write_text(json.dumps(conf))
    # HOME: asv keeps its machine description in ~/.asv-machine.json; the test leaves the user's alone.
    env = {**os.environ, "DIST_EGNN_BENCH_TINY": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    commit = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    if not commit:
        pytest.skip("not a git checkout: asv needs a commit hash")
    for cmd in (["machine", "--yes", "--machine", "ci"],
                ["run", "--python=same", "--quick", "--machine", "ci", "--bench", "mmd", f"--set-commit-hash={commit}"],
                ["publish"]):
        out = subprocess.run([str(asv), *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = list((tmp_path / "results" / "ci").glob("*.json"))
    assert any(r.name != "machine.json" for r in results)
    assert (tmp_path / "html" / "index.html").exists() and (tmp_path / "html" / "index.json").exists()
    index = json.loads((tmp_path / "html" / "index.json").read_text())
    assert any(name.startswith("mmd.") for name in index["benchmarks"])
