#!/usr/bin/env bash
# dn_dab_dino_deformable_detr_r50 on 8 GPUs (batch 2 per GPU). Extra flags go to main.py.
exec "$(dirname "$0")/../dist_train.sh" configs/dn_dab_dino_deformable_detr_r50.py "${OUTPUT_DIR:-logs/dn_dab_dino_deformable_detr_r50}" "$@"
