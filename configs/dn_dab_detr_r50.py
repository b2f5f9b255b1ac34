# DN-DETR-R50 (official zoo: 44.4 AP at 50 epochs). Batch 16 = 8 GPUs x 2 images.
modelname = "dn_dab_detr"
use_dn = True
backbone = "resnet50"
epochs = 50
lr_drop = 40
batch_size = 2
