# The DINO-style variant on the synthetic set: the demo's network and schedule (configs/synthetic.py) with
# contrastive denoising, mixed query selection from the encoder proposals and look-forward-twice.
#   python main.py --config configs/synthetic_dino.py --coco_path data/synthetic --output_dir outputs/demo_dino
_base_ = "synthetic.py"
modelname = "dn_dab_dino_deformable_detr"
contrastive = True
use_mqs = True
use_lft = True
two_stage = True
