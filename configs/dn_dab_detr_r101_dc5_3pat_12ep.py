# DN-DAB-DETR-R101-DC5 with 3 patterns, 12 epochs (paper Table 2: 42.8 AP).
_base_ = "dn_dab_detr_r50_dc5_3pat_12ep.py"
backbone = "resnet101"
