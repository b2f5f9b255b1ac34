# DN-DAB-DETR-R50-DC5 with 3 patterns, 12 epochs (paper Table 2: 41.7 AP).
# The official repository does not state the 12-epoch schedule; lr_drop 11 is our reading.
_base_ = "dn_dab_detr_r50_dc5.py"
num_patterns = 3
epochs = 12
lr_drop = 11
