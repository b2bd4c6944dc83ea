"""Train EGNN or FastEGNN on one process or many; see conf/config.yaml for the configuration groups.

    python launch/train.py [overrides]                                        one process
    deepspeed --num_gpus P launch/train.py distributed.parts=P [overrides]    P ranks (CPU: gloo, GPU: nccl)
    torchrun --nproc-per-node P launch/train.py engine=ddp distributed.parts=P [overrides]

Prints the run directory at start and end; it holds config.yaml, metrics.jsonl and checkpoints/ (see
dist_egnn.training.trainer). Every rank of a launch writes into rank 0's run directory. Continue a stopped or finished
run with ``resume=auto`` and the same ``hydra.run.dir``.

Exit codes: 0 finished; 2 bad input or configuration (nothing changed); 3 NaN/Inf loss or gradients
(diagnostic checkpoint written); 75 stopped by SIGTERM/SIGINT after writing a checkpoint; 1 another error,
e.g. a rank that died or hung (the others fail within ``distributed.timeout_s``).
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from dist_egnn.config import register
from dist_egnn.errors import BadInput
from dist_egnn.parallel import runtime
from dist_egnn.training import guard
from dist_egnn.training.callbacks import Callback
from dist_egnn.training.checkpoint import write_text_atomic
from dist_egnn.training.trainer import Trainer

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    env = runtime.DistEnv.from_environ()
    if env.rank == 0:
        print(f"run directory: {run_dir}", flush=True)
    try:
        result = Trainer.from_config(cfg, run_dir, env, callbacks=[LaunchRecord(cfg, run_dir, env.rank)]).fit()
    except guard.Stopped as err:
        finish(env, f"{err}", guard.EXIT_STOPPED)
    except guard.NonFiniteError as err:
        finish(env, f"error (rank {env.rank}): {err}", guard.EXIT_NONFINITE)
    except BadInput as err:  # a user's mistake (dist_egnn.errors): one line naming it and the fix
        finish(env, f"error (rank {env.rank}): {err}", guard.EXIT_BAD_INPUT)
    except ValueError:
        # Any other ValueError is a bug, not bad input: keep its traceback (exit 1). Under a multi-process
        # launch leave at once, as below, without tearing down a process group others may be waiting in.
        traceback.print_exc()
        if env.distributed:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(guard.EXIT_RANK_FAILED)
        sys.exit(guard.EXIT_RANK_FAILED)
    except RuntimeError as err:
        if not env.distributed:
            raise
        # A collective failed: another rank died or hung (distributed.timeout_s), or this rank's own error.
        # The process group may be broken, so leave without tearing it down.
        traceback.print_exc()
        print(f"error (rank {env.rank}): {type(err).__name__}: {str(err)[:500]}\nThe run stops on every rank "
              f"(a dead or hung rank fails the others' collectives within distributed.timeout_s="
              f"{cfg.distributed.timeout_s:g} s); continue it with resume=auto (hydra.run.dir={run_dir})",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(guard.EXIT_RANK_FAILED)
    runtime.shutdown()
    if env.rank == 0:
        print(json.dumps(result))
        print(f"run directory: {run_dir}")


class LaunchRecord(Callback):
    """Hydra's record of this launch in ``<run>/.hydra``: config.yaml (as composed), hydra.yaml and
    overrides.yaml, written by rank 0 once the trainer has accepted the run (conf/config.yaml sets
    ``hydra.output_subdir: null``): Hydra writes it before any check, so a refused launch (exit 2: "nothing
    changed"), e.g. a fresh start into a used run directory, rewrote the record of the run it was refused for."""

    def __init__(self, cfg: DictConfig, run_dir: str, rank: int):
        self.cfg, self.folder, self.rank = cfg, Path(run_dir) / ".hydra", rank
        self.hydra = HydraConfig.get()              # a Hydra job's state, read while the job runs

    def on_start(self, trainer) -> None:
        if self.rank != 0:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", self.cfg), ("hydra.yaml", {"hydra": self.hydra}),
                           ("overrides.yaml", list(self.hydra.overrides.task))):
            write_text_atomic(OmegaConf.to_yaml(node), self.folder / name)


def finish(env: runtime.DistEnv, message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    runtime.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    _env = runtime.DistEnv.from_environ()
    if _env.distributed and "DIST_EGNN_RUN_STAMP" not in os.environ:
        try:
            os.environ["DIST_EGNN_RUN_STAMP"] = runtime.join_run(_env, sys.argv)
        except BadInput as _err:       # e.g. MASTER_PORT taken: one line; the launcher stops the other ranks
            print(f"error (rank {_env.rank}): {_err}", file=sys.stderr, flush=True)
            sys.exit(guard.EXIT_BAD_INPUT)
    sys.argv = runtime.launcher_arguments(sys.argv, _env)
    main()
