#!/usr/bin/env bash
# dab_detr_r50_dc5 on 8 GPUs (batch 2 per GPU). Extra flags go to main.py.
exec "$(dirname "$0")/../dist_train.sh" configs/dab_detr_r50_dc5.py "${OUTPUT_DIR:-logs/dab_detr_r50_dc5}" "$@"
