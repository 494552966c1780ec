#!/bin/bash

# recpre evaluation job array, written by launchers/submit.py from cluster profile 'local': this machine (submitit local executor), one process, or torchrun --standalone when devices_per_node > 1
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# environment
export OMP_NUM_THREADS=2
export PYTHONUNBUFFERED=1

# one checkpoint per array task
CHECKPOINTS=(
  /scratch/runs/a/checkpoints/step-00001000
  '/scratch/runs/b c/checkpoints/latest'
)
CHECKPOINT="${CHECKPOINTS[${SLURM_ARRAY_TASK_ID:-0}]}"
echo "evaluating $CHECKPOINT"

# launch
<sys.executable> -u evaluate/run.py --checkpoint "$CHECKPOINT" --tasks hellaswag,arc_easy
