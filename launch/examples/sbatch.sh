#!/bin/bash
# Slurm: DistEGNN on several nodes, one torchrun agent per node starting one rank per GPU.
#   sbatch launch/examples/sbatch.sh distributed.parts=4 [more launch/train.py overrides]
# paths.data and the run directory must be on a filesystem every node sees (README, "Several nodes").
#SBATCH --job-name=dist-egnn
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1           # one torchrun agent per node; it starts --nproc-per-node ranks
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
RANKS_PER_NODE=${RANKS_PER_NODE:-4}
NODE0=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 .venv/bin/torchrun --nnodes "$SLURM_NNODES" --nproc-per-node "$RANKS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$NODE0:29400" --rdzv-id "$SLURM_JOB_ID" --rdzv-conf read_timeout=120 \
    launch/train.py engine=ddp distributed.halo=exact hydra.run.dir="runs/slurm-$SLURM_JOB_ID" "$@"

# Without torchrun, one Slurm task per rank (ranks from SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE):
#   #SBATCH --ntasks-per-node=4
#   export MASTER_ADDR=$NODE0 MASTER_PORT=29500
#   srun .venv/bin/python launch/train.py engine=ddp distributed.halo=exact distributed.parts=4 "$@"
# or DeepSpeed's own Slurm launcher from inside the allocation (engine=deepspeed; it calls srun):
#   export MASTER_ADDR=$NODE0 MASTER_PORT=29500
#   .venv/bin/deepspeed --hostfile hosts --launcher slurm launch/train.py engine=deepspeed distributed.parts=4 "$@"
