# DN-DETR's DINO-style variant, R50, 36 epochs (reported 50.8-51.0 AP on COCO val; no checkpoint released).
# The flags of the reference state dict: contrastive denoising, mixed query selection from the encoder
# proposals (two-stage), look-forward-twice. The original does not record this run's command; the learning-rate
# drop at epoch 30 is our choice (the 50-epoch recipes drop at 80%). Batch 16 = 8 GPUs x 2 images.
modelname = "dn_dab_dino_deformable_detr"
use_dn = True
contrastive = True
use_mqs = True
use_lft = True
two_stage = True
backbone = "resnet50"
transformer_activation = "relu"
num_feature_levels = 4
enc_n_points = 4
dec_n_points = 4
epochs = 36
lr_drop = 30
batch_size = 2
