"""Run every benchmark of the suite once, without asv: a smoke test that keeps benchmarks from rotting.

    DIST_EGNN_BENCH_TINY=1 python asv_bench/run_once.py       # every benchmark on a 200-node graph, seconds

Follows asv's protocol: ``setup_cache`` once per class, then for every parameter combination ``setup``
(``NotImplementedError`` = skipped, as in asv), each ``time_``/``peakmem_``/``mem_``/``track_`` method once,
``teardown``. Prints one line per benchmark; exits non-zero if any raised.
"""
from __future__ import annotations

import importlib
import inspect
import itertools
import pkgutil
import sys
import time
import traceback
from pathlib import Path

PREFIXES = ("time_", "peakmem_", "mem_", "track_")


def benchmark_classes():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchmarks
    for info in pkgutil.iter_modules(benchmarks.__path__):
        module = importlib.import_module(f"benchmarks.{info.name}")
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and any(
                    attr.startswith(PREFIXES) for attr in dir(obj)):
                yield f"{info.name}.{name}", obj


def parameter_sets(cls) -> list[tuple]:
    params = getattr(cls, "params", [])
    if not params:
        return [()]
    if not isinstance(params[0], (list, tuple)):
        params = [params]
    return list(itertools.product(*params))


def run_all(out=sys.stdout) -> dict:
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    for class_name, cls in benchmark_classes():
        instance = cls()
        cache = ()
        if hasattr(instance, "setup_cache"):
            cache = (instance.setup_cache(),)
        methods = sorted(attr for attr in dir(cls) if attr.startswith(PREFIXES))
        for args in parameter_sets(cls):
            full = (*cache, *args)
            try:
                if hasattr(instance, "setup"):
                    instance.setup(*full)
            except NotImplementedError as skip:
                counts["skipped"] += len(methods)
                print(f"skip {class_name}{list(args)}: {skip}", file=out)
                continue
            for method in methods:
                start = time.perf_counter()
                try:
                    value = getattr(instance, method)(*full)
                except Exception:                                   # noqa: BLE001  report all, then fail
                    counts["failed"] += 1
                    print(f"FAIL {class_name}.{method}{list(args)}\n{traceback.format_exc()}", file=out)
                    continue
                counts["ran"] += 1
                shown = f" -> {value:.4g}" if isinstance(value, (int, float)) else ""
                print(f"ok   {class_name}.{method}{list(args)} {time.perf_counter() - start:.2f}s{shown}", file=out)
            if hasattr(instance, "teardown"):
                instance.teardown(*full)
    print(f"{counts['ran']} ran, {counts['skipped']} skipped, {counts['failed']} failed", file=out)
    return counts


if __name__ == "__main__":
    import torch
    torch.set_num_threads(1)          # a smoke run measures nothing; one thread keeps it quick on a busy machine
    sys.exit(1 if run_all()["failed"] else 0)
