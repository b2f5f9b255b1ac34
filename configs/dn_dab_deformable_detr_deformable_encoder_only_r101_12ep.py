# DN-DAB-Deformable-DETR (deformable encoder only), R101, 12 epochs (paper Table 2: 44.1 AP).
_base_ = "dn_dab_deformable_detr_deformable_encoder_only_r50_12ep.py"
backbone = "resnet101"
