# DN-Deformable-DETR sized for a CPU and the synthetic shapes dataset (python -m datasets.synthetic):
# small images, a ResNet-18 trained from scratch (no ImageNet weights offline), a narrow transformer.
# The 4-level deformable model is used because it learns from scratch at these sizes in minutes,
# where the single-scale model's stride-32 map (3x4 cells at 112 px) leaves it near AP 0.
# For the single-scale DN-DAB-DETR: --config configs/synthetic.py -m dn_dab_detr.
modelname = "dn_dab_deformable_detr"
use_dn = True
backbone = "resnet18"
no_pretrained_backbone = True
batch_norm_type = "BatchNorm2d"
hidden_dim = 128
dim_feedforward = 256
nheads = 8
enc_layers = 3
dec_layers = 3
num_queries = 30
transformer_activation = "relu"
scalar = 5
lr = 2e-4
lr_backbone = 2e-4
batch_size = 8
epochs = 20
lr_drop = 16
clip_max_norm = 0.1
train_scales = [80, 96, 112, 128]
max_size = 160
val_scale = 112
crop_resize_scales = [80, 96, 112]
crop_size = [64, 96]
num_workers = 1
# The demo and its follow-ups (plot, inference, export) need checkpoint.pth only: no numbered copies of
# it (about 150 MB each), also none at the lr drop.
save_checkpoint_interval = 0
