#!/bin/bash
# HPD-distil Llama-3.1-70B-Instruct into Llama-3.1-8B on 4 nodes x 8 GPUs (TP4 PP1 DP8, sequence
# parallel: the layout of recipes/llama3.1_70b_to_8b_hpd.yaml, the planner's first choice):
#   export HPD_TEACHER_CKPT=... HPD_STUDENT_CKPT=... HPD_DATA=... [HPD_RUN_DIR=...]
#   sbatch [--account A --partition P] slurm/hpd_70b_to_8b.sh [dotted.key=value ...]
# The checkpoints come from tools/convert_hf_to_megatron.py (or slurm/convert.sh), the data
# from tools/prepare_data.py. HPD_RECIPE selects another recipe with the same launch (the
# tests use it to run this very script on a tiny CPU recipe). Requeue, logs and site
# settings as in slurm/train.sh and slurm/common.sh.
#SBATCH --job-name=hpd-70b-to-8b
#SBATCH --nodes=4
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

# shellcheck source=slurm/common.sh
source "${HPD_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hpd_environment
hpd_train "${HPD_RECIPE:-recipes/llama3.1_70b_to_8b_hpd.yaml}" "$@"
