# Baseline of dn_dab_deformable_detr_deformable_encoder_only_r50_12ep: the same network and recipe without denoising training.
_base_ = "dn_dab_deformable_detr_deformable_encoder_only_r50_12ep.py"
use_dn = False
