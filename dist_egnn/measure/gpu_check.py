"""One-call GPU validation: does every path a user runs work on CUDA, and how fast is it?

    python launch/gpu_check.py                  # on a GPU machine, ~5 minutes on one H200
    python launch/gpu_check.py --dry-run        # every stage on tiny sizes on the CPU (a test runs this)

Stages, each timed and each allowed to fail without stopping the others (a failed stage is a row marked
FAIL with its error, and the exit code is 1):

1. ``environment``: torch, CUDA, the device, the packages the project needs.
2. ``device_vs_cpu``: EGNN and FastEGNN with the same weights on the device and on the CPU, forward and
   backward in float32 (TF32 off for the comparison): relative difference of positions and of every
   gradient, ≤ 1e-4.
3. ``fused_vs_plain``: the fused message blocks against plain autograd on the device (float32, TF32 off).
4. ``bf16``: FastEGNN under bf16 autocast against float32 on the device: relative error of the outputs, and
   the equivariance error (rotation + translation) in both precisions.
5. ``determinism``: two identical training steps compared bitwise, with ``torch.use_deterministic_algorithms``
   (what ``trainer.deterministic=true`` sets) and without (atomics in ``index_add_`` may reorder sums).
6. ``speed``: one training step (forward + backward) of ours in fp32, bf16 and compiled, and of the
   project's re-implementation of the authors' structure (``asv_bench/benchmarks/reference.py``), on the
   asv suite's 20K- and 113K-node graphs, and ours at several ``model.edge_chunk_size``: median time and
   peak memory (allocated and reserved).
7. ``deepspeed``: a 113K-node synthetic training run on one GPU through the DeepSpeed launcher, stopped after
   one epoch and resumed with ``resume=auto`` (dry run: the tiny N-body set through ``launch/train.py``).

The summary table is printed last and written to ``docs/results/gpu-<date>.md`` (``--out`` elsewhere), after
every stage, so a run cut short keeps what it measured. Timers synchronise the device before reading the
clock; every step is warmed up first.

On the lent GPU machine the image has its own CUDA build of torch (never reinstall it); the project's other
packages travel as wheels (``launch/gpu_wheels.sh`` makes them), and the project itself is installed there
with ``pip install --no-deps --no-index --no-build-isolation -e .`` so that ``dist_egnn.datasets`` resolves.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("torch", "numpy", "scipy", "deepspeed", "zarr", "numcodecs", "dask", "hydra-core", "omegaconf", "pymetis",
            "tqdm", "matplotlib", "psutil")


def bench():
    """The asv suite's shared graphs, models and step (``asv_bench/benchmarks/common.py``)."""
    path = str(ROOT / "asv_bench")
    if path not in sys.path:
        sys.path.insert(0, path)
    from benchmarks import common
    return common


@dataclass
class Check:
    """What the run is asked to do: sizes and devices (the dry run shrinks both)."""

    device: torch.device
    dry_run: bool
    out: Path
    sizes: list[str] = field(default_factory=list)        # speed table graphs
    compare_size: str = "small"                            # correctness comparisons
    chunk_sizes: list[Any] = field(default_factory=list)
    repeat: int = 5

    @classmethod
    def make(cls, dry_run: bool, out: Path | None) -> "Check":
        device = torch.device("cpu") if dry_run or not torch.cuda.is_available() else torch.device("cuda", 0)
        stamp = time.strftime("%Y-%m-%d")
        out = out or ROOT / "docs" / "results" / f"gpu-{stamp}{'-dry-run' if dry_run else ''}.md"
        if dry_run:
            return cls(device, True, out, sizes=["tiny"], compare_size="tiny", chunk_sizes=[64], repeat=1)
        return cls(device, False, out, sizes=["20k", "fluid113k"], compare_size="small",
                   chunk_sizes=[16_384, 65_536, 262_144, 1_048_576, "auto"], repeat=5)


# -- helpers ----------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    norm = float(b.norm())
    return float((a - b).norm()) / norm if norm else float((a - b).norm())


def on(graph: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in graph.items()}


def forward_backward(model: torch.nn.Module, graph: dict, precision: str = "fp32"):
    """Outputs and parameter gradients of the asv suite's training step (forward, loss, backward)."""
    common = bench()
    model.zero_grad(set_to_none=True)
    context = (torch.autocast(graph["pos"].device.type, dtype=torch.bfloat16) if precision == "bf16"
               else torch.autocast(graph["pos"].device.type, enabled=False))
    with context:
        out = model(**common.model_inputs(graph))
    pos, virtual_pos = out[0].float(), out[1]
    loss = (pos - graph["target"]).square().mean()
    if virtual_pos is not None:
        loss = loss + 1e-3 * virtual_pos.float().square().mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return pos.detach(), grads


class NoTF32:
    """TF32 off inside (for comparisons in true float32), restored after."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def twin_models(name: str, *devices: torch.device, **kwargs) -> list[torch.nn.Module]:
    """The same model (same weights) on each device."""
    common = bench()
    first = common.make_model(name, **kwargs)
    models = [first.to(devices[0])]
    for device in devices[1:]:
        twin = common.make_model(name, **kwargs)
        twin.load_state_dict(first.state_dict())
        models.append(twin.to(device))
    return models


def step_time(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls after ``warmup``, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Peak device memory of one call above what was allocated before it (CUDA), MiB; empty on CPU."""
    if device.type != "cuda":
        return {}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return dict(peak_alloc_mib=(torch.cuda.max_memory_allocated(device) - before) / 2**20,
                peak_reserved_mib=torch.cuda.max_memory_reserved(device) / 2**20)


# -- stages -----------------------------------------------------------------------------------------------
def environment(check: Check) -> list[dict]:
    rows = [dict(item="python", value=platform.python_version()),
            dict(item="torch", value=torch.__version__),
            dict(item="cuda (torch build)", value=str(torch.version.cuda)),
            dict(item="device", value=str(check.device)),
            dict(item="cpu cores", value=os.cpu_count())]
    if check.device.type == "cuda":
        props = torch.cuda.get_device_properties(check.device)
        rows += [dict(item="gpu", value=props.name), dict(item="capability", value=f"{props.major}.{props.minor}"),
                 dict(item="gpu memory (GiB)", value=round(props.total_memory / 2**30, 1)),
                 dict(item="multiprocessors", value=props.multi_processor_count),
                 dict(item="bf16 supported", value=torch.cuda.is_bf16_supported())]
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "MISSING"
        rows.append(dict(item=name, value=version))
    return rows


def device_vs_cpu(check: Check) -> list[dict]:
    graph = bench().graph(check.compare_size)
    rows = []
    with NoTF32():
        for name in ("egnn", "fastegnn"):
            cpu_model, dev_model = twin_models(name, torch.device("cpu"), check.device)
            pos_cpu, grads_cpu = forward_backward(cpu_model, graph)
            pos_dev, grads_dev = forward_backward(dev_model, on(graph, check.device))
            worst = max(relative(grads_dev[n], grads_cpu[n]) for n in grads_cpu)
            error = max(relative(pos_dev, pos_cpu), worst)
            rows.append(dict(model=name, graph=check.compare_size, pos_rel=relative(pos_dev, pos_cpu),
                             worst_grad_rel=worst, limit=1e-4, ok=error <= 1e-4))
    return rows


def fused_vs_plain(check: Check) -> list[dict]:
    graph = on(bench().graph(check.compare_size), check.device)
    rows = []
    with NoTF32():
        for name in ("egnn", "fastegnn"):
            fused, plain = twin_models(name, check.device, check.device)
            plain.set_fused(False)
            pos_f, grads_f = forward_backward(fused, graph)
            pos_p, grads_p = forward_backward(plain, graph)
            worst = max(relative(grads_f[n], grads_p[n]) for n in grads_p)
            error = max(relative(pos_f, pos_p), worst)
            rows.append(dict(model=name, pos_rel=relative(pos_f, pos_p), worst_grad_rel=worst, limit=1e-4,
                             ok=error <= 1e-4))
    return rows


def _rotation(seed: int, dtype=torch.float32) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.to(dtype)


def equivariance_error(model: torch.nn.Module, graph: dict, precision: str) -> float:
    """max |f(Rx + t) − (R f(x) + t)| / mean |f(x) − x|, positions and velocities rotated together."""
    common = bench()
    rotation = _rotation(1).to(graph["pos"].device)
    shift = torch.tensor([0.3, -0.2, 0.1], device=graph["pos"].device)
    moved = dict(graph, pos=graph["pos"] @ rotation.T + shift, vel=graph["vel"] @ rotation.T)
    context = (torch.autocast(graph["pos"].device.type, dtype=torch.bfloat16) if precision == "bf16"
               else torch.autocast(graph["pos"].device.type, enabled=False))
    with torch.no_grad(), context:
        plain = model(**common.model_inputs(graph))[0].float()
        turned = model(**common.model_inputs(moved))[0].float()
    expected = plain @ rotation.T + shift
    scale = float((plain - graph["pos"]).abs().mean()) or 1.0
    return float((turned - expected).abs().max()) / scale


def bf16(check: Check) -> list[dict]:
    graph = on(bench().graph(check.compare_size), check.device)
    (model,) = twin_models("fastegnn", check.device)
    rows = []
    with NoTF32():
        pos32, grads32 = forward_backward(model, graph, "fp32")
        pos16, grads16 = forward_backward(model, graph, "bf16")
        rows.append(dict(quantity="pos relative error, bf16 vs fp32", value=relative(pos16, pos32), limit=1e-2,
                         ok=relative(pos16, pos32) <= 1e-2))
        flat = lambda grads: torch.cat([grads[n].double().reshape(-1) for n in sorted(grads32)])   # noqa: E731
        error = relative(flat(grads16), flat(grads32))
        rows.append(dict(quantity="gradient relative error (all parameters)", value=error, limit=5e-2,
                         ok=error <= 5e-2))
        dtypes = {str(g.dtype) for g in grads16.values()}
        rows.append(dict(quantity="gradient dtypes under bf16", value=",".join(sorted(dtypes)), limit="float32",
                         ok=dtypes == {"torch.float32"}))
        for precision in ("fp32", "bf16"):
            error = equivariance_error(model, graph, precision)
            rows.append(dict(quantity=f"equivariance error ({precision})", value=error, limit="",
                             ok=math.isfinite(error)))
    return rows


def determinism(check: Check) -> list[dict]:
    """Two identical training steps, bitwise: with torch's deterministic algorithms and without."""
    graph = on(bench().graph(check.compare_size), check.device)
    rows = []
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            results = []
            for _ in range(2):
                (model,) = twin_models("fastegnn", check.device)
                results.append(forward_backward(model, graph))
            (pos_a, grads_a), (pos_b, grads_b) = results
            same = torch.equal(pos_a, pos_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
            largest = max([relative(pos_a, pos_b)] + [relative(grads_a[n], grads_b[n]) for n in grads_a])
        finally:
            torch.use_deterministic_algorithms(False)
        rows.append(dict(deterministic=deterministic, bitwise_equal=same, largest_relative_difference=largest,
                         ok=same or not deterministic))
    return rows


def _variants(check: Check, size: str) -> list[tuple[str, str, dict, str, bool]]:
    """(label, model, kwargs, precision, compiled) of the speed table for one graph size."""
    variants = [("ours fp32", "fastegnn", {}, "fp32", False), ("ours bf16", "fastegnn", {}, "bf16", False),
                ("ours fp32 compiled", "fastegnn", {}, "fp32", True), ("egnn fp32", "egnn", {}, "fp32", False)]
    if size in ("tiny", "small", "20k"):       # the reference needs ~10 KB per edge: 20K at most
        variants.insert(0, ("authors' structure fp32", "reference-fastegnn", {}, "fp32", False))
    for chunk in check.chunk_sizes:
        rows = None if chunk == "auto" else int(chunk)
        if chunk == "auto" and check.device.type == "cuda":
            from dist_egnn.training.device import edge_chunk_rows
            rows = edge_chunk_rows("auto", check.device, 64)
        variants.append((f"ours fp32 chunk {chunk}" + (f" ({rows})" if chunk == "auto" else ""), "fastegnn",
                         {"edge_chunk_size": rows}, "fp32", False))
    return variants


def speed(check: Check) -> list[dict]:
    common = bench()
    rows = []
    for size in check.sizes:
        graph = on(common.graph(size), check.device)
        edges = int(graph["edge_index"].shape[1])
        baseline = None
        for label, name, kwargs, precision, compiled in _variants(check, size):
            try:
                if compiled and check.device.type != "cuda":
                    rows.append(dict(graph=size, edges=edges, variant=label,
                                     note="skipped: model.compile is CUDA-only (inductor fails on this model on CPU)"))
                    continue
                model = common.make_model(name, **kwargs).to(check.device)
                if compiled:
                    model.compile(dynamic=False)

                def run(model=model, precision=precision):
                    forward_backward(model, graph, precision)
                seconds = step_time(run, check.device, check.repeat, warmup=1 if check.dry_run else 2)
                row = dict(graph=size, edges=edges, variant=label, step_ms=1e3 * seconds,
                           **peak_memory(run, check.device))
                if "peak_alloc_mib" in row:
                    row["bytes_per_edge"] = row["peak_alloc_mib"] * 2**20 / edges
                if label.startswith("authors"):
                    baseline = seconds
                row["speedup_vs_authors"] = baseline / seconds if baseline else None
                rows.append(row)
                del model
            except Exception as err:                      # one variant failing (e.g. compile) is a row
                rows.append(dict(graph=size, edges=edges, variant=label, error=f"{type(err).__name__}: {err}"[:200]))
            if check.device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def deepspeed_run(check: Check) -> list[dict]:
    """Train, stop after an epoch, resume: through the DeepSpeed launcher on one GPU (dry run: plain python)."""
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if check.dry_run:
        launcher = [sys.executable, str(ROOT / "launch" / "train.py")]
        data = ["dataset.nbody.num_particles=12", "dataset.nbody.train=6", "dataset.nbody.val=3",
                "dataset.nbody.test=3", "dataset.nbody.steps=1100", "dataset.frame_start=0", "dataset.frame_stop=1",
                "trainer.batch_size=3", "trainer.num_threads=1"]
    else:
        launcher = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1",
                    str(ROOT / "launch" / "train.py")]
        data = ["dataset=synthetic113k", "trainer.batch_size=1", "trainer.eval_batch_size=1",
                "trainer.steps_per_epoch=3", "engine=deepspeed"]
    common = [f"paths.data={work / 'data'}", f"hydra.run.dir={work / 'run'}", "trainer.progress=false", *data]
    rows = []
    attempts = (("first epoch", ["trainer.max_epochs=1"]), ("resume", ["trainer.max_epochs=2", "resume=auto"]))
    for attempt, extra in attempts:
        started = time.perf_counter()
        proc = subprocess.run([*launcher, *common, *extra], capture_output=True, text=True, timeout=600, cwd=ROOT)
        records = []
        metrics = work / "run" / "metrics.jsonl"
        if metrics.exists():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        resumed = "resumed from" in proc.stdout + proc.stderr
        last = records[-1] if records else {}
        rows.append(dict(attempt=attempt, exit=proc.returncode, seconds=round(time.perf_counter() - started, 1),
                         resumed=resumed, epochs=len([r for r in records if "test_mse" not in r]),
                         test_mse=last.get("test_mse"), step_time_s=last.get("step_time_s"),
                         peak_mem_mb=last.get("peak_mem_mb"), peak_reserved_mb=last.get("peak_reserved_mb"),
                         ok=proc.returncode == 0 and (attempt == "first epoch" or resumed),
                         tail=(proc.stdout + proc.stderr)[-300:] if proc.returncode else ""))
    return rows


STAGES: list[tuple[str, Callable[[Check], list[dict]]]] = [
    ("environment", environment), ("device_vs_cpu", device_vs_cpu), ("fused_vs_plain", fused_vs_plain),
    ("bf16", bf16), ("determinism", determinism), ("speed", speed), ("deepspeed", deepspeed_run)]


# -- report -----------------------------------------------------------------------------------------------
def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if (abs(value) < 1e-2 or abs(value) >= 1e4) and value else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/").replace("\n", " ")


def markdown(name: str, rows: list[dict]) -> list[str]:
    if not rows:
        return [f"### {name}", "", "(no rows)", ""]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = [f"### {name}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines + [""]


def write_report(check: Check, results: list[tuple[str, str, float, list[dict]]], command: str) -> str:
    summary = [dict(stage=name, status=status, seconds=round(seconds, 1)) for name, status, seconds, _ in results]
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M')}", "",
             f"Produced by `{command}` on {check.device} "
             f"({'dry run: tiny sizes on the CPU' if check.dry_run else 'full sizes'}); what the command printed.",
             ""]
    for name, _status, _seconds, rows in results:
        lines += markdown(name, rows)
    lines += markdown("summary", summary)
    text = "\n".join(lines)
    check.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = check.out.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, check.out)
    return text


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every stage on tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, help="where the Markdown summary goes (default docs/results/gpu-DATE.md)")
    parser.add_argument("--stages", default=",".join(name for name, _ in STAGES),
                        help="comma-separated subset of " + ", ".join(name for name, _ in STAGES))
    args = parser.parse_args(argv)
    check = Check.make(args.dry_run, args.out)
    command = "python launch/gpu_check.py" + (" --dry-run" if args.dry_run else "")
    if check.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True    # the trainer's default
    wanted = args.stages.split(",")
    results = []
    for name, stage in STAGES:
        if name not in wanted:
            continue
        started = time.perf_counter()
        try:
            rows = stage(check)
            failed = [r for r in rows if r.get("ok") is False or "error" in r]
            status = "FAIL" if failed else "ok"
        except Exception as err:
            traceback.print_exc()
            rows, status = [dict(error=f"{type(err).__name__}: {err}"[:300])], "FAIL"
        results.append((name, status, time.perf_counter() - started, rows))
        print("\n".join(markdown(f"{name} ({status}, {results[-1][2]:.1f} s)", rows)), flush=True)
        write_report(check, results, command)
    print("\n".join(markdown("summary", [dict(stage=n, status=s, seconds=round(t, 1)) for n, s, t, _ in results])))
    print(f"written: {check.out}")
    return 0 if all(status == "ok" for _, status, _, _ in results) else 1
