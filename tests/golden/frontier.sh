#!/bin/bash
#SBATCH --job-name=nebel
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --time=12:00:00
#SBATCH --output="/scratch/runs/nebel raven/slurm/%x-%j.out"
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --account=CHANGE-ME
#SBATCH --partition=batch
#SBATCH --cpus-per-task=7
#SBATCH --gpus-per-task=1
#SBATCH --gpu-bind=closest
#SBATCH --exclusive

# recpre training job, written by launchers/submit.py from cluster profile 'frontier': OLCF Frontier (AMD MI250X, 8 GCDs per node, ROCm), one task per GCD
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# setup (from the profile)
module load PrgEnv-gnu rocm/6.2.4 craype-accel-amd-gfx90a
source "$PROJWORK/recpre/venv/bin/activate"

# environment
export NCCL_NET_GDR_LEVEL=3
export NCCL_SOCKET_IFNAME=hsn
export NCCL_CROSS_NIC=1
export FI_CXI_ATS=0
export HSA_FORCE_FINE_GRAIN_PCIE=1
export OMP_NUM_THREADS=7
export PYTHONUNBUFFERED=1
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT=29500
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"

# launch
srun --ntasks-per-node=8 --cpus-per-task=7 python -u train.py --config /opt/recpre/launch_configs/nebel-raven-3.5b-frontier.yaml optim.lr=4e-4 'run.name=nebel raven' 'run.out_dir=/scratch/runs/nebel raven'
