# Baseline of dn_dab_detr_r50_dc5: the same network and recipe without denoising training.
_base_ = "dn_dab_detr_r50_dc5.py"
use_dn = False
