# DN-DAB-Deformable-DETR (deformable encoder only), R50, 3 patterns, 50 epochs (official zoo / paper
# Table 3: 48.6 AP). The released run used 2 nodes x 8 GPUs x 1 image (total batch 16): the dense
# decoder attends to every level's tokens, which needs much memory. scripts/zoo/ launches it that way
# (on each node: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0>; GPUS=16 NNODES=1 on one 16-GPU node).
# Another split of the same total batch is not the same run: padding, the denoising groups (sized by
# the fullest image of a batch) and the per-process denoising loss normaliser all change.
modelname = "dn_dab_deformable_detr_deformable_encoder_only"
use_dn = True
backbone = "resnet50"
transformer_activation = "relu"
num_patterns = 3
num_feature_levels = 4
enc_n_points = 4
epochs = 50
lr_drop = 40
batch_size = 1
