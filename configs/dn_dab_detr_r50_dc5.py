# DN-DETR-R50-DC5 (official zoo: 46.3 AP at 50 epochs).
_base_ = "dn_dab_detr_r50.py"
dilation = True
