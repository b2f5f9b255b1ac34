#!/usr/bin/env bash
# Evaluate a released (or our own) checkpoint on COCO val2017 the way the original authors did: one image
# per process (--batch_size 1, so no image is zero-padded to the size of a batch mate; see the README's
# "Evaluation batch size"). COCO_PATH must name the COCO folder (with val2017/ and annotations/).
#   COCO_PATH=/data/coco scripts/eval_released.sh CONFIG CHECKPOINT [OUTPUT_DIR] [more main.py flags]
# e.g. COCO_PATH=/data/coco scripts/eval_released.sh configs/dn_dab_detr_r50.py checkpoints/dn_detr_r50/checkpoint.pth
# Multi-GPU (still one image per process, same AP): GPUS=8 scripts/eval_released.sh ...
set -euo pipefail
USAGE="usage: COCO_PATH=/path/to/coco eval_released.sh CONFIG CHECKPOINT [OUTPUT_DIR] [flags]"
CONFIG=${1:?$USAGE}
CKPT=${2:?$USAGE}
OUTPUT=${3:-outputs/eval_$(basename "$(dirname "$CKPT")")}
shift $(( $# < 3 ? $# : 3 ))
if [ -z "${COCO_PATH:-}" ]; then
    echo "eval_released.sh: set COCO_PATH to the COCO folder (the one holding val2017/ and annotations/)" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
LAUNCH=(python)
if [ "${GPUS:-1}" -gt 1 ]; then LAUNCH=(torchrun --nproc_per_node="$GPUS"); fi
"${LAUNCH[@]}" main.py --config "$CONFIG" --coco_path "$COCO_PATH" --resume "$CKPT" --eval \
    --batch_size 1 --output_dir "$OUTPUT" "$@"
