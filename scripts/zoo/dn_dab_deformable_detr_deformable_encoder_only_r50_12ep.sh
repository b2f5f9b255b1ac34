#!/usr/bin/env bash
# dn_dab_deformable_detr_deformable_encoder_only_r50_12ep on 2 nodes x 8 GPUs x 1 image (set NODE_RANK, MASTER_ADDR; see the config). Extra flags go to main.py.
NNODES=${NNODES:-2} exec "$(dirname "$0")/../dist_train.sh" configs/dn_dab_deformable_detr_deformable_encoder_only_r50_12ep.py "${OUTPUT_DIR:-logs/dn_dab_deformable_detr_deformable_encoder_only_r50_12ep}" "$@"
