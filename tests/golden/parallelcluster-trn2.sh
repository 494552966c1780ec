#!/bin/bash
#SBATCH --job-name=nebel
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --output="/scratch/runs/nebel raven/slurm/%x-%j.out"
#SBATCH --open-mode=append
#SBATCH --signal=USR2@300
#SBATCH --requeue
#SBATCH --partition=compute
#SBATCH --exclusive
#SBATCH --cpus-per-task=192

# recpre training job, written by launchers/submit.py from cluster profile 'parallelcluster-trn2': AWS ParallelCluster trn2.48xlarge (64 logical NeuronCores at LNC=2, 16 EFA devices), torchrun per node
# Secrets (WANDB_API_KEY, HF_TOKEN, ...) are not written here: sbatch passes on your shell's environment.
set -o pipefail
cd /opt/recpre

# setup (from the profile)
source /fsx/torchneuron_venv/bin/activate
export TORCH_NEURONX_NEFF_CACHE_DIR="/fsx/neuron-cache/${USER}"

# environment
export NEURON_LOGICAL_NC_CONFIG=2
export NEURON_RT_STOCHASTIC_ROUNDING_EN=1
export MALLOC_ARENA_MAX=64
export FI_PROVIDER=efa
export FI_EFA_USE_DEVICE_RDMA=1
export FI_EFA_FORK_SAFE=1
export PYTHONUNBUFFERED=1
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_ADDR
export MASTER_PORT=44000
echo "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST"

# launch
srun --ntasks-per-node=1 --cpus-per-task=192 bash -c 'trap "" USR2; exec python -m torch.distributed.run --nproc_per_node=64 --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"' torchrun-per-node train.py --config /opt/recpre/launch_configs/nebel-raven-3.5b-frontier.yaml optim.lr=4e-4 'run.name=nebel raven' 'run.out_dir=/scratch/runs/nebel raven'
