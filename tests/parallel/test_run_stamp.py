"""The shared run stamp's store (rank 0's TCPStore before any process group): where it listens, a taken port.

Guards issue 18: the store listened on every interface (``::``/``0.0.0.0``) although MASTER_ADDR was 127.0.0.1;
it must listen on the rendezvous address only. A taken MASTER_PORT is one sentence naming the fix.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from dist_egnn.errors import BadInput
from dist_egnn.parallel import runtime

from ranks import free_port

RANK = textwrap.dedent("""
    import json, os, sys, time
    import psutil
    from dist_egnn.parallel import runtime
    env = runtime.DistEnv.from_environ()
    stamp = runtime.shared_run_stamp(env, timeout_s=60)
    port = int(os.environ["MASTER_PORT"])
    listening = sorted({c.laddr.ip for c in psutil.Process().net_connections("inet")
                        if c.status == psutil.CONN_LISTEN and c.laddr.port == port})
    runtime._STORE.set(f"done/{env.rank}", "1")
    runtime._STORE.wait([f"done/{r}" for r in range(env.world_size)])    # the store stays up until both looked
    print(json.dumps(dict(rank=env.rank, stamp=stamp, listening=listening)))
""")


def run_ranks(port: int, world: int = 2) -> list[dict]:
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, "-c", RANK], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def test_rank_0_store_listens_on_the_rendezvous_address_only():
    port = free_port()
    ranks = run_ranks(port)
    assert ranks[0]["stamp"] == ranks[1]["stamp"]                     # one run directory for both ranks
    assert ranks[0]["listening"] == ["127.0.0.1"], ranks[0]           # not 0.0.0.0 / :: (every interface)
    assert ranks[1]["listening"] == []                                # a client listens nowhere


def test_a_taken_port_is_bad_input_naming_the_fix():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(BadInput, match=f"MASTER_PORT={port} on MASTER_ADDR=127.0.0.1 is in use") as caught:
            runtime.listen_socket("127.0.0.1", port)
    assert "--master_port" in str(caught.value) and "--master-port" in str(caught.value)


def test_an_address_of_another_machine_is_bad_input():
    with pytest.raises(BadInput, match="not an address of this machine"):
        runtime.listen_socket("192.0.2.1", free_port())               # TEST-NET-1: never local
