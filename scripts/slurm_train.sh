#!/usr/bin/env bash
# Multi-node training on Slurm: one task per GPU; main.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_NODELIST.
#   sbatch --nodes=2 scripts/slurm_train.sh configs/dn_dab_deformable_detr_r50.py logs/dn_deform_r50
#SBATCH --job-name=dn-detr
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=72:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
CONFIG=${1:?usage: sbatch slurm_train.sh CONFIG OUTPUT_DIR [flags]}
OUTPUT=${2:?usage: sbatch slurm_train.sh CONFIG OUTPUT_DIR [flags]}
shift 2
export MASTER_PORT=${MASTER_PORT:-29500}
# Resume automatically when the job is requeued after a preemption.
RESUME=()
if [ -f "$OUTPUT/checkpoint.pth" ]; then RESUME=(--resume "$OUTPUT/checkpoint.pth"); fi
srun python main.py --config "$CONFIG" --coco_path "${COCO_PATH:-data/coco}" --output_dir "$OUTPUT" \
    "${RESUME[@]}" "$@"
