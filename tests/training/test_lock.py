"""RunLock: one training per run directory, refused with a message naming the holder; released when it dies."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from dist_egnn.training.lock import LOCK_NAME, RunLock, RunLockedError

HOLD = textwrap.dedent("""
    import sys, time
    from dist_egnn.training.lock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(600)
""")
TRY = textwrap.dedent("""
    import sys
    from dist_egnn.training.lock import RunLock, RunLockedError
    try:
        with RunLock(sys.argv[1]):
            print("acquired")
    except RunLockedError as err:
        print(err)
        sys.exit(3)
""")


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/run (killed at the end if still alive)."""
    proc = python(HOLD, str(tmp_path / "run"))
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_second_process_is_refused_while_the_first_holds_it(tmp_path, holder):
    run = tmp_path / "run"
    second = python(TRY, str(run))
    out, err = second.communicate(timeout=60)
    assert second.returncode == 3, out + err
    for fragment in (f"process {holder.pid}", f"host {socket.gethostname()}", "running since", str(run),
                     "Wait for it to finish", "hydra.run.dir"):
        assert fragment in out, f"{fragment!r} not in: {out}"
    # in this process too, and the holder's details are left as they were
    with pytest.raises(RunLockedError, match=f"process {holder.pid} on host"):
        RunLock(run).acquire()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == holder.pid


def test_lock_is_released_when_the_holder_dies(tmp_path, holder):
    run = tmp_path / "run"
    os.kill(holder.pid, signal.SIGKILL)                       # no clean-up runs: only the kernel releases it
    holder.wait(timeout=30)
    assert (run / LOCK_NAME).exists()                         # the dead holder's file is still there
    second = python(TRY, str(run))
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0 and out.strip() == "acquired", out + err
    with RunLock(run) as lock:                                # and here: the stale file is taken over
        assert lock.held
        assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_in_one_process_release_and_context(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as first:
        details = json.loads((run / LOCK_NAME).read_text())
        assert details["pid"] == os.getpid() and details["host"] == socket.gethostname() and details["since"]
        with pytest.raises(RunLockedError) as caught:         # flock is per open file: refused here too
            RunLock(run).acquire()
        assert isinstance(caught.value, ValueError)
        assert "this very process" in str(caught.value)
        assert first.held
    assert not first.held and not (run / LOCK_NAME).exists()  # a clean release leaves nothing behind
    with pytest.raises(KeyError):
        with RunLock(run):
            raise KeyError("boom")
    RunLock(run).acquire().release()                          # released by the exception too


def test_disabled_lock_is_a_no_op(tmp_path):
    run = tmp_path / "run"
    with RunLock(run) as main, RunLock(run, enabled=False) as other_rank:
        assert main.held and not other_rank.held
    assert not (run / LOCK_NAME).exists()
    with RunLock(tmp_path / "other", enabled=False):
        pass
    assert not (tmp_path / "other").exists()


def test_acquire_twice_and_release_twice_are_harmless(tmp_path):
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is lock.acquire()
    lock.release()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_many_processes_racing_exactly_one_wins(tmp_path):
    """Started together, each tries once: one takes it and holds it until every other one has been refused."""
    run, done = tmp_path / "run", tmp_path / "done"
    race = textwrap.dedent("""
        import os, sys, time
        from dist_egnn.training.lock import RunLock, RunLockedError
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        try:
            lock = RunLock(sys.argv[1]).acquire()
        except RunLockedError:
            print("refused"); sys.exit(0)
        print("won", flush=True)
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.05)
        lock.release()
    """)
    start = time.time() + 1.5
    procs = [python(race, str(run), str(start), str(done)) for _ in range(6)]
    deadline = time.time() + 120
    while sum(p.poll() is not None for p in procs) < 5 and time.time() < deadline:
        time.sleep(0.05)
    done.touch()
    outcomes = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outcomes == ["refused"] * 5 + ["won"], outcomes


def test_a_second_training_into_a_held_run_directory_stops_before_writing(tmp_path):
    """Guards issue 18's interleaved metrics.jsonl: the trainer set-up takes the lock before writing anything."""
    from dist_egnn.training.trainer import Trainer

    from runs import config, digest

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("the other training's files\n")
    before = digest(run)
    with RunLock(run):                                    # another training holds it
        with pytest.raises(RunLockedError, match="in use by another training"):
            Trainer.from_config(config(tmp_path / "data"), run)
    after = digest(run)
    assert after == before
    result = Trainer.from_config(config(tmp_path / "data"), run).fit()     # free again: runs
    assert "test_mse" in result and not (run / ".lock").exists()
