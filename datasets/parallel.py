"""Run independent generation tasks (scenes, groups of scenes) in parallel through dask, with a progress bar.

One function, :func:`map_tasks`, serves every generator: it calls ``fn(item)`` for every item and yields
``(index, result)`` pairs as tasks finish, so the caller can write results (or record them) while other
tasks still run. Where the tasks run:

- ``cluster=None``: dask's local schedulers in this process: ``threads`` (default; right for tasks that
  release the GIL: NumPy/torch kernels, or waiting on a subprocess), ``processes`` or ``sync`` (serial,
  for debugging). Results are yielded when every task is done.
- ``cluster="local"``: a ``dask.distributed.LocalCluster`` with ``workers`` single-threaded worker processes.
- ``cluster="tcp://host:8786"``: an existing ``dask.distributed`` scheduler. The same function runs on its
  workers, so everything a task reads or writes (the dataset folder under ``paths.data``) must be on a
  filesystem every worker sees. At most ``2 * workers`` tasks are in flight (``workers`` None: twice the
  cluster's total threads).

Results travel back to the caller (and locally are all held until the end), so tasks return small things
(a path, a count, a status) and write bulk data themselves.
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Any, Callable, Iterator, Sequence

import dask
from dask.callbacks import Callback
from tqdm.auto import tqdm

from dist_egnn.errors import ConfigError

SCHEDULERS = ("auto", "threads", "processes", "sync")


def available_cores() -> int:
    """Cores this process may use (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def map_tasks(fn: Callable[[Any], Any], items: Sequence[Any], *, scheduler: str = "threads",
              workers: int | None = None, cluster: str | None = None, progress: bool = True,
              desc: str = "tasks", unit: str = "task", weights: Sequence[float] | None = None
              ) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(items[index]))`` for every item, in completion order, running tasks in parallel.

    ``weights`` sets how far each task advances the progress bar (default 1). An exception raised by a task
    propagates to the caller once its wave (local) or the task itself (distributed) has finished.
    """
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler={scheduler!r}: choose one of {SCHEDULERS} (prepare.scheduler)")
    weights = [1] * len(items) if weights is None else list(weights)
    bar = tqdm(total=sum(weights), desc=desc, unit=unit, disable=not progress)
    try:
        if cluster:
            yield from _distributed(fn, items, cluster, workers, bar, weights)
        else:
            yield from _local(fn, items, "threads" if scheduler == "auto" else scheduler,
                              workers or available_cores(), bar, weights)
    finally:
        bar.close()


def _local(fn, items, scheduler, workers, bar, weights) -> Iterator[tuple[int, Any]]:
    lazy = [dask.delayed(fn, pure=False)(item, dask_key_name=f"task-{i}") for i, item in enumerate(items)]
    step = {f"task-{i}": weights[i] for i in range(len(items))}
    with Callback(posttask=lambda key, *_: bar.update(step.get(key, 0))):
        results = dask.compute(*lazy, scheduler=scheduler, num_workers=workers)
    yield from enumerate(results)


def _distributed(fn, items, cluster, workers, bar, weights) -> Iterator[tuple[int, Any]]:
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as err:  # pragma: no cover - the `cluster` extra is part of `all`
        raise ConfigError(f"prepare.cluster={cluster!r} needs dask.distributed: pip install -e '.[cluster]'") from err
    local = LocalCluster(n_workers=workers or available_cores(), threads_per_worker=1,
                         dashboard_address=None) if cluster == "local" else None
    client = Client(local if local is not None else cluster)
    try:
        limit = 2 * (workers or sum(client.nthreads().values()) or 1)
        pending = iter(range(len(items)))
        index_of = {}

        def submit(i: int):
            future = client.submit(fn, items[i], pure=False)
            index_of[future.key] = i
            return future

        # islice, not zip(pending, range(limit)): zip draws item `limit` from `pending` before it sees the range
        # end and drops it (a water3d_like preparation lost scene train-00005 that way and failed at writing)
        running = as_completed([submit(i) for i in islice(pending, limit)])
        for future in running:
            i = index_of.pop(future.key)
            result = future.result()          # re-raises the task's exception here
            bar.update(weights[i])
            nxt = next(pending, None)
            if nxt is not None:
                running.add(submit(nxt))
            yield i, result
    finally:
        client.close()
        if local is not None:
            local.close()
