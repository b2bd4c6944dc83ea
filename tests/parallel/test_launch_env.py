"""Where a rank stands, from each launcher's variables (issue 20 item 1): never guessed, and layouts that cannot hold P
refused on every rank before any collective."""
from __future__ import annotations

import pytest

from dist_egnn.errors import ConfigError
from dist_egnn.parallel.runtime import DistEnv, check_layout, rendezvous_timeout_s

# What each launcher sets for the second rank of node 1 of a 2-node × 2-rank launch (read from the installed
# torch/distributed/elastic/agent/server/local_elastic_agent.py and deepspeed/launcher/launch.py; Open MPI, MPICH
# and Slurm from their manuals).
LAUNCHES = {
    "torchrun": dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                     GROUP_WORLD_SIZE="2", ROLE_RANK="3", TORCHELASTIC_RUN_ID="x"),
    "deepspeed": dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_SIZE="2", CROSS_RANK="1", CROSS_SIZE="2"),
    "openmpi": dict(OMPI_COMM_WORLD_RANK="3", OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_LOCAL_RANK="1",
                    OMPI_COMM_WORLD_LOCAL_SIZE="2"),
    "mpich": dict(PMI_RANK="3", PMI_SIZE="4", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2"),
    "srun": dict(SLURM_PROCID="3", SLURM_NTASKS="4", SLURM_LOCALID="1", SLURM_STEP_TASKS_PER_NODE="2(x2)",
                 SLURM_NODEID="1", SLURM_NNODES="2"),
    # torchrun inside a Slurm allocation: torchrun's variables win over the allocation's
    "srun torchrun": dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                          GROUP_WORLD_SIZE="2", SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0",
                          SLURM_NTASKS_PER_NODE="1", SLURM_NODEID="1", SLURM_NNODES="2"),
}


@pytest.mark.parametrize("launcher", LAUNCHES)
def test_every_launcher_gives_rank_and_ranks_per_node(launcher):
    env = DistEnv.from_environ(LAUNCHES[launcher])
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    if launcher not in ("openmpi", "mpich"):          # MPI names no node index or count: left unknown
        assert (env.node, env.nodes) == (1, 2)
    check_layout(env, 2)                               # 2 nodes × 2 ranks hold P = 2 (and P = 4, P = 1)
    check_layout(env, 4)


def test_one_process_without_launcher():
    env = DistEnv.from_environ({})
    assert (env.rank, env.world_size, env.local_world_size, env.nodes) == (0, 1, 1, 1) and not env.distributed
    check_layout(env, 4)                               # one process runs every part itself


def test_ranks_per_node_are_never_guessed():
    """Guards the old guess (world / CROSS_SIZE): a multi-process launch that does not say how many ranks run on a
    node is refused, naming the variables to set."""
    env = DistEnv.from_environ(dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", CROSS_SIZE="1"))
    assert env.local_world_size is None
    with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE or LOCAL_SIZE.*not guessed"):
        check_layout(env, 2)
    env = DistEnv.from_environ(dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="0"))
    with pytest.raises(ConfigError, match="SLURM_NTASKS_PER_NODE"):
        check_layout(env, 2)


def test_slurm_per_node_lists():
    uneven = dict(SLURM_PROCID="4", SLURM_NTASKS="5", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="2(x2),1",
                  SLURM_NODEID="2", SLURM_NNODES="3")
    assert DistEnv.from_environ(uneven).local_world_size == 1


@pytest.mark.parametrize("variables, parts, message", [
    (dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", GROUP_RANK="0", GROUP_WORLD_SIZE="3"), 2,
     r"world size 3 \(launch layout: 3 nodes × 1 rank per node, from torchrun/deepspeed variables\) is not a "
     r"multiple of distributed.parts=2"),
    (dict(RANK="0", WORLD_SIZE="6", LOCAL_RANK="0", LOCAL_SIZE="3", CROSS_RANK="0", CROSS_SIZE="2"), 2,
     r"2 nodes × 3 ranks per node.*straddle nodes unevenly"),
    (dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", LOCAL_SIZE="3", CROSS_RANK="0", CROSS_SIZE="2"), 2,
     r"2 × 3 != 4 ranks.*same number of ranks on every node"),
])
def test_layouts_that_cannot_hold_the_parts_are_named(variables, parts, message):
    with pytest.raises(ConfigError, match=message):
        check_layout(DistEnv.from_environ(variables), parts)


def test_the_rendezvous_timeout_comes_from_the_command_line():
    assert rendezvous_timeout_s(["train.py", "distributed.timeout_s=7", "x=1"]) == 7.0
    assert rendezvous_timeout_s(["train.py", "++distributed.timeout_s=2.5"]) == 2.5
    assert rendezvous_timeout_s(["train.py"]) == 300.0
    with pytest.raises(ConfigError, match="distributed.timeout_s='soon'"):
        rendezvous_timeout_s(["train.py", "distributed.timeout_s=soon"])


def test_export_fills_what_deepspeed_reads():
    environ = dict(LAUNCHES["srun"])
    DistEnv.from_environ(environ).export(environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"], environ["LOCAL_WORLD_SIZE"]) == \
        ("3", "4", "1", "2")
