# Baseline of dn_dab_detr_r50_dc5_3pat_12ep: the same network and recipe without denoising training.
_base_ = "dn_dab_detr_r50_dc5_3pat_12ep.py"
use_dn = False
