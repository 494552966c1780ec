#!/bin/bash

# recpre training job, written by launchers/submit.py from cluster profile 'local': this machine (submitit local executor), one process, or torchrun --standalone when devices_per_node > 1
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# environment
export OMP_NUM_THREADS=2
export PYTHONUNBUFFERED=1

# launch
<sys.executable> -u train.py --config /opt/recpre/launch_configs/nebel-raven-3.5b-frontier.yaml optim.lr=4e-4 'run.name=nebel raven' 'run.out_dir=/scratch/runs/nebel raven'
