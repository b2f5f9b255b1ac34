#!/usr/bin/env bash
# Evaluate a released (or our own) checkpoint on COCO val2017 with the README's batch size of 1.
#   scripts/eval_released.sh CONFIG CHECKPOINT [OUTPUT_DIR] [more main.py flags]
# e.g. scripts/eval_released.sh configs/dn_dab_detr_r50.py checkpoints/dn_detr_r50/checkpoint.pth
# Multi-GPU: GPUS=8 scripts/eval_released.sh ...
set -euo pipefail
CONFIG=${1:?usage: eval_released.sh CONFIG CHECKPOINT [OUTPUT_DIR] [flags]}
CKPT=${2:?usage: eval_released.sh CONFIG CHECKPOINT [OUTPUT_DIR] [flags]}
OUTPUT=${3:-outputs/eval_$(basename "$(dirname "$CKPT")")}
shift $(( $# < 3 ? $# : 3 ))
cd "$(dirname "$0")/.."
LAUNCH=(python)
if [ "${GPUS:-1}" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node="$GPUS"); fi
"${LAUNCH[@]}" main.py --config "$CONFIG" --coco_path "${COCO_PATH:-data/coco}" --resume "$CKPT" --eval \
    --batch_size 1 --output_dir "$OUTPUT" "$@"
