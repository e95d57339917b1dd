#!/bin/bash
# Train any recipe on Slurm, one task per GPU:
#   sbatch [--nodes N --account A --partition P --time T] slurm/train.sh RECIPE [dotted.key=value ...]
# The job runs the planner and input checks first, then every rank; before the time limit it
# receives SIGUSR1, the trainer saves and exits 75, and the job requeues itself under the same
# id to resume from that checkpoint. Site settings: see slurm/common.sh. Run from the checkout
# (logs go to logs/%x_%j.out there).
#SBATCH --job-name=hpd-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x_%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail

if (( $# < 1 )); then
    echo "usage: sbatch slurm/train.sh RECIPE [dotted.key=value ...]" >&2
    exit 2
fi
# shellcheck source=slurm/common.sh
source "${HPD_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hpd_environment
hpd_train "$@"
