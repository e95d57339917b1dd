#!/bin/bash
# Convert checkpoints on a CPU node (the converters need host memory, not GPUs):
#   sbatch slurm/convert.sh hf-to-megatron --hf-dir HF --out OUT --tp 4 --pp 1 [--verify]
#   sbatch slurm/convert.sh megatron-to-hf --ckpt DIR --out OUT [--verify]
# One task converts at any TP x PP; `sbatch --ntasks=T*P` runs one task per shard instead
# (each reads and writes only its own). Site settings: see slurm/common.sh.
#SBATCH --job-name=hpd-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x_%j.out
set -euo pipefail

direction=${1:-}
case $direction in
    hf-to-megatron) tool=tools/convert_hf_to_megatron.py ;;
    megatron-to-hf) tool=tools/convert_megatron_to_hf.py ;;
    *) echo "usage: sbatch slurm/convert.sh hf-to-megatron|megatron-to-hf ARGS..." >&2; exit 2 ;;
esac
shift
# shellcheck source=slurm/common.sh
source "${HPD_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh"
hpd_environment
hpd_log "converting: $tool $*"
status=0
srun "${HPD_SRUN_ARGS[@]}" --cpus-per-task="$HPD_CPUS_PER_TASK" "$HPD_PYTHON" "$tool" "$@" \
    || status=$?
hpd_log "the converter exited with $status"
exit "$status"
