# Baseline of dn_dab_deformable_detr_deformable_encoder_only_r50: the same network and recipe without denoising training.
_base_ = "dn_dab_deformable_detr_deformable_encoder_only_r50.py"
use_dn = False
