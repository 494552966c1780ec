#!/bin/bash
#SBATCH --job-name=eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=02:00:00
#SBATCH --array=0-1
#SBATCH --output=/scratch/eval-jobs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --partition=gpu
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=1

# recpre evaluation job array, written by launchers/submit.py from cluster profile 'slurm-gpu': generic SLURM cluster with 8 NVIDIA GPUs per node, one task per GPU
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# setup (from the profile)
source .venv/bin/activate

# environment
export OMP_NUM_THREADS=8
export NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1

# one checkpoint per array task
CHECKPOINTS=(
  /scratch/runs/a/checkpoints/step-00001000
  '/scratch/runs/b c/checkpoints/latest'
)
CHECKPOINT="${CHECKPOINTS[${SLURM_ARRAY_TASK_ID:-0}]}"
echo "evaluating $CHECKPOINT"

# launch
srun --ntasks-per-node=1 --cpus-per-task=8 python -u evaluate/run.py --checkpoint "$CHECKPOINT" --tasks hellaswag,arc_easy
