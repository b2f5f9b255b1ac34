# DN-DAB-Deformable-DETR (deformable encoder only), R50, 12 epochs (paper Table 2: 43.4 AP).
# The original gives no command for this row: patterns and activation are those of the 50-epoch row
# (a released checkpoint's keys override both on --eval --resume), lr_drop 11 is our reading.
_base_ = "dn_dab_deformable_detr_deformable_encoder_only_r50.py"
epochs = 12
lr_drop = 11
