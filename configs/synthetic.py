# DN-DETR sized for a CPU and the synthetic shapes dataset (python -m datasets.synthetic):
# small images, ResNet-18 trained from scratch (no ImageNet weights offline), a narrow transformer.
modelname = "dn_dab_detr"
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
scalar = 5
lr = 2e-4
lr_backbone = 2e-5
batch_size = 8
epochs = 12
lr_drop = 10
clip_max_norm = 0.1
train_scales = [96, 112, 128, 144, 160]
max_size = 224
val_scale = 128
crop_resize_scales = [96, 128, 160]
crop_size = [64, 128]
num_workers = 2
save_checkpoint_interval = 5
