"""One training at a time per run directory: :class:`RunLock`, held for the run's life by rank 0.

Two trainings started into the same ``hydra.run.dir`` would both run and interleave ``metrics.jsonl`` and
their checkpoints. The lock is ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lock``: taken atomically
by the kernel (no check-then-create race), and released by the kernel when the holder exits, however it
exits (a crash or ``kill -9`` leaves no stale lock to clean up by hand). The holder writes its pid, host and
start time into the file, so a second training is refused with a message naming them.

Only rank 0 of a multi-rank run takes it (``RunLock(run_dir, enabled=is_main)``): the other ranks of the
same run share the directory by design, and a second run's rank 0 is refused before its ranks write.

Clean release removes the file (while still holding the lock; a process that opened the old file meanwhile
notices that the path no longer names it and tries again), so a finished run leaves no ``.lock`` behind;
a killed holder leaves the file, which the next training simply locks and overwrites.

Limits: flock is per open file, so a child forked while the lock is held (e.g. data-loader workers started
with ``fork``) keeps it held until that child exits too. On network file systems flock is only as good as
the file system's lock support (NFSv4 and Lustre with ``flock`` mounts honour it across hosts).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from dist_egnn.errors import BadInput

LOCK_NAME = ".lock"


class RunLockedError(BadInput):
    """Another training holds the run directory: the message names it (pid, host, since when) and the fix."""


class RunLock:
    """Exclusive use of a run directory by one training, for as long as it is held.

    Args:
        run_dir: the run directory (created if missing); the lock file is ``<run_dir>/.lock``.
        enabled: False makes every method a no-op (ranks other than 0 of a multi-rank run).

    Use ``with RunLock(run_dir, enabled=is_main): ...`` around the whole run, or ``lock = RunLock(...)
    .acquire()`` and ``lock.release()`` in a ``finally``. :meth:`acquire` raises :class:`RunLockedError`
    (a BadInput: exit 2) at once, without waiting, when another process holds it.
    """

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), bool(enabled)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock or raise :class:`RunLockedError` naming its holder; returns self."""
        if not self.enabled or self._fd is not None:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(100):                      # retried only while a holder is removing the file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder, current = _read(fd), _names(self.path, fd)
                os.close(fd)
                if current:
                    raise RunLockedError(self._message(holder)) from None
                continue                          # the file was released and removed as we opened it
            except BaseException:
                os.close(fd)
                raise
            if _names(self.path, fd):
                break
            os.close(fd)                          # we locked a file its holder had just removed: retry
        else:
            raise RunLockedError(f"run directory {self.run_dir}: could not take {self.path} (it keeps being "
                                 f"replaced); is another training starting and stopping there?")
        try:
            details = dict(pid=os.getpid(), host=socket.gethostname(),
                           since=time.strftime("%Y-%m-%dT%H:%M:%S%z"), started=time.time())
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(details) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Remove the lock file and release the lock (no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if _names(self.path, fd):
                self.path.unlink(missing_ok=True)    # while still locked: no one can take the old file
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _message(self, holder: dict[str, Any]) -> str:
        if holder:
            who = f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, running since " \
                  f"{holder.get('since', '?')}"
            if holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid():
                who += " (this very process: the run directory is already locked here)"
        else:
            who = "a process that has not yet written its pid and host"
        return (f"run directory {self.run_dir} is in use by another training ({who}; lock file {self.path}): "
                f"two trainings in one directory would interleave metrics.jsonl and checkpoints. Wait for it to "
                f"finish (or stop it), or choose another hydra.run.dir")


class RunDirError(BadInput):
    """The run directory cannot be one: it, or a folder above it, is a file."""


def check_run_dir(run_dir: str | os.PathLike) -> None:
    """Refuse a run directory that is a file or lies under one (``mkdir`` would fail with a bare
    FileExistsError or NotADirectoryError), naming it and the fix."""
    run_dir = Path(run_dir)
    for path in (run_dir, *run_dir.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                what = "is" if path == run_dir else f"lies under {path}, which is"
                raise RunDirError(f"run directory {run_dir} {what} a file, not a folder: choose another "
                                  f"hydra.run.dir (or paths.runs), or move the file away")
            return


class RunDirCheck(Callback):
    """Hydra callback (``hydra.callbacks`` in launch/conf/config.yaml): Hydra creates the run directory before
    the training code runs, so a run directory that is a file would end in Hydra's traceback; this checks it
    first and exits 2 with one line (the launch scripts' convention for bad input)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        import sys

        from omegaconf import OmegaConf

        try:
            run_dir = OmegaConf.select(config, "hydra.run.dir")
        except Exception:  # noqa: BLE001 - an interpolation only Hydra's job can resolve: Hydra reports it
            return
        if not run_dir:
            return
        try:
            check_run_dir(run_dir)
        except RunDirError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None


def _read(fd: int) -> dict[str, Any]:
    """The holder's details, or {} while it has not written them (or they cannot be read)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _names(path: Path, fd: int) -> bool:
    """True if ``path`` is still the file open as ``fd`` (not removed or replaced since it was opened)."""
    try:
        a, b = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
