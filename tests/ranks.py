"""Run a function on P gloo ranks in fresh processes and collect what each returns (tests only)."""
from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(value):
    """Tensors -> NumPy arrays, recursively: tensors through a queue would share memory with a dying process."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _entry(fn, rank: int, world_size: int, port: int, results, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        results.put((rank, "ok", _plain(fn(rank, world_size, *args))))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the rank's traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 180) -> list:
    """``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; returns their results by rank
    (tensors in them as NumPy arrays).

    ``fn`` must be importable (a module-level function); a rank that raises fails the call with its traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world_size, port, results, args), daemon=True)
             for rank in range(world_size)]
    for p in procs:
        p.start()
    collected, errors = {}, []
    try:
        for _ in range(world_size):
            rank, status, value = results.get(timeout=timeout)
            (collected.__setitem__(rank, value) if status == "ok" else errors.append(f"rank {rank}:\n{value}"))
    except queue_module.Empty:
        missing = sorted(set(range(world_size)) - set(collected))
        errors.append(f"timed out after {timeout} s waiting for ranks {missing}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [collected[r] for r in range(world_size)]
