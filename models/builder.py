"""Build a detector, its criterion and post-processor from the command-line arguments."""
import logging
from typing import Dict, Tuple

from torch import nn

from .backbone import build_backbone
from .criterion import SetCriterion, build_weight_dict
from .dab_transformer import build_dab_transformer
from .deformable_transformer import build_deformable_transformer
from .dn_components import DNConfig
from .dn_dab_deformable_detr import DNDABDeformableDETR
from .dn_dab_detr import DNDABDETR
from .matcher import build_matcher
from .postprocess import PostProcess

COCO_NUM_CLASSES = 91


def _num_classes(args) -> int:
    return args.num_classes if args.num_classes is not None else COCO_NUM_CLASSES


def _dn_config(args):
    if not args.use_dn:
        return None
    return DNConfig(args.scalar, args.label_noise_scale, args.box_noise_scale)


def build_dn_dab_detr(args) -> nn.Module:
    if args.two_stage:
        raise ValueError("--two_stage is only meaningful for deformable models and is not supported")
    backbone = build_backbone(args, return_layers=["layer4"], deformable=False)
    return DNDABDETR(backbone, build_dab_transformer(args), num_classes=_num_classes(args),
                     num_queries=args.num_queries, aux_loss=args.aux_loss, dn_config=_dn_config(args),
                     random_refpoints_xy=args.random_refpoints_xy)


def build_dn_dab_deformable_detr(args) -> nn.Module:
    if args.two_stage:
        raise ValueError("--two_stage is not supported by dn_dab_deformable_detr (nor by the official release)")
    if args.num_patterns > 0:
        raise ValueError("--num_patterns is only supported by dn_dab_detr")
    if args.num_feature_levels == 2 or args.num_feature_levels < 1:
        raise ValueError(f"--num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5 plus extra strided levels), "
                         f"got {args.num_feature_levels}")
    if args.transformer_activation != "relu":
        logging.getLogger(__name__).warning(
            "dn_dab_deformable_detr always uses ReLU; --transformer_activation %s is ignored",
            args.transformer_activation)
    return_layers = ["layer4"] if args.num_feature_levels == 1 else ["layer2", "layer3", "layer4"]
    backbone = build_backbone(args, return_layers=return_layers, deformable=True)
    return DNDABDeformableDETR(backbone, build_deformable_transformer(args), num_classes=_num_classes(args),
                               num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                               aux_loss=args.aux_loss, dn_config=_dn_config(args),
                               random_refpoints_xy=args.random_refpoints_xy)


# Per model: its builder and what the reference fixes regardless of the flags (spec §5.1, §5.2, §5.5).
MODELS = {
    "dn_dab_detr": (build_dn_dab_detr, {"matcher_focal_alpha": None, "num_select": None, "log_xy_hw": True}),
    "dn_dab_deformable_detr": (build_dn_dab_deformable_detr,
                               {"matcher_focal_alpha": 0.25, "num_select": 100, "log_xy_hw": False}),
}


def build_model(args) -> Tuple[nn.Module, SetCriterion, Dict[str, nn.Module]]:
    """``args`` is the namespace of ``main.get_args_parser()``; the model is built on the CPU."""
    if args.modelname not in MODELS:
        raise ValueError(f"-m/--modelname: unknown model {args.modelname!r}, choose from {sorted(MODELS)}")
    build, fixed = MODELS[args.modelname]
    model = build(args)
    matcher_alpha = fixed["matcher_focal_alpha"] if fixed["matcher_focal_alpha"] is not None else args.focal_alpha
    criterion = SetCriterion(
        _num_classes(args), build_matcher(args, matcher_alpha), build_weight_dict(args),
        focal_alpha=args.focal_alpha, use_dn=args.use_dn, num_decoder_layers=args.dec_layers,
        aux_loss=args.aux_loss, log_xy_hw=fixed["log_xy_hw"],
    )
    num_select = fixed["num_select"] if fixed["num_select"] is not None else args.num_select
    return model, criterion, {"bbox": PostProcess(num_select)}
