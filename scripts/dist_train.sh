#!/usr/bin/env bash
# Distributed training with torchrun, single or multi node.
#   scripts/dist_train.sh CONFIG OUTPUT_DIR [more main.py flags]
# Environment: GPUS per node (default 8), COCO_PATH (default data/coco); for several nodes run it on
# every node with NNODES, NODE_RANK and MASTER_ADDR (the address of node 0) set; MASTER_PORT (29500).
set -euo pipefail
CONFIG=${1:?usage: dist_train.sh CONFIG OUTPUT_DIR [flags]}
OUTPUT=${2:?usage: dist_train.sh CONFIG OUTPUT_DIR [flags]}
shift 2
cd "$(dirname "$0")/.."
torchrun --nproc_per_node="${GPUS:-8}" --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" main.py \
    --config "$CONFIG" --coco_path "${COCO_PATH:-data/coco}" --output_dir "$OUTPUT" "$@"
