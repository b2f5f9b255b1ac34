# DN-DAB-Deformable-DETR-R50-v2 (official zoo: 49.5 AP at 50 epochs, 48.4 at 24 epochs).
modelname = "dn_dab_deformable_detr"
use_dn = True
backbone = "resnet50"
transformer_activation = "relu"
num_feature_levels = 4
enc_n_points = 4
dec_n_points = 4
epochs = 50
lr_drop = 40
batch_size = 2
