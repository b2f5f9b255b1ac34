#!/usr/bin/env bash
# dab_detr_r101_dc5_3pat_12ep on 8 GPUs (batch 2 per GPU). Extra flags go to main.py.
exec "$(dirname "$0")/../dist_train.sh" configs/dab_detr_r101_dc5_3pat_12ep.py "${OUTPUT_DIR:-logs/dab_detr_r101_dc5_3pat_12ep}" "$@"
