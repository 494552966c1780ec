#!/bin/bash
#SBATCH --job-name=nebel
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --time=12:00:00
#SBATCH --output="/scratch/runs/nebel raven/slurm/%x-%j.out"
#SBATCH --open-mode=append
#SBATCH --signal=USR2@180
#SBATCH --requeue
#SBATCH --partition=gpu
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0

# recpre training job, written by launchers/submit.py from cluster profile 'slurm-gpu': generic SLURM cluster with 8 NVIDIA GPUs per node, one task per GPU
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# setup (from the profile)
source .venv/bin/activate

# environment
export OMP_NUM_THREADS=8
export NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT=29500
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"

# launch
srun --ntasks-per-node=8 --cpus-per-task=8 python -u train.py --config /opt/recpre/launch_configs/nebel-raven-3.5b-frontier.yaml optim.lr=4e-4 'run.name=nebel raven' 'run.out_dir=/scratch/runs/nebel raven'
