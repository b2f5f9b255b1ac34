"""Build a detector, its criterion and post-processor from the command-line arguments."""
import logging
from typing import Dict, Optional, Tuple

from torch import nn

from util.coco_categories import COCO_NUM_CLASSES

from .criterion import SetCriterion, build_weight_dict
from .dn_components import DNConfig
from .matcher import build_matcher
from .postprocess import PostProcess
from .registry import MODELS, resolve


def resolve_num_classes(args, dataset_max_category_id: Optional[int] = None, dataset_name: Optional[str] = None,
                        checkpoint_num_classes: Optional[int] = None, logger=None) -> int:
    """Set and return ``args.num_classes``, the number of classification logits.

    An explicit ``--num_classes`` wins; otherwise the checkpoint's class count (the rows of its class
    embedding), then the dataset's largest category id + 1, then COCO's 91. A value too small for the
    dataset's ids is an error.
    """
    logger = logger or logging.getLogger(__name__)
    if args.num_classes is None:
        if checkpoint_num_classes is not None:
            args.num_classes = checkpoint_num_classes
            logger.info(f"--num_classes {args.num_classes} read from the checkpoint's class embedding")
        elif dataset_max_category_id is not None:
            args.num_classes = dataset_max_category_id + 1
        else:
            args.num_classes = COCO_NUM_CLASSES
    if dataset_max_category_id is not None and args.num_classes <= dataset_max_category_id:
        raise ValueError(f"--num_classes {args.num_classes} is too small for {dataset_name or args.coco_path}: "
                         f"its category ids go "
                         f"up to {dataset_max_category_id}, so at least {dataset_max_category_id + 1} classification "
                         "logits are needed")
    return args.num_classes


def build_dn_config(args) -> Optional[DNConfig]:
    """The denoising settings of ``args`` (None without ``--use_dn``), with the ones the model fixes."""
    if not args.use_dn:
        return None
    return DNConfig(args.scalar, args.label_noise_scale, args.box_noise_scale, contrastive=args.contrastive,
                    negatives_per_image=args.cdn_split_per_image, **MODELS[args.modelname].dn_options)


def build_model(args) -> Tuple[nn.Module, SetCriterion, Dict[str, nn.Module]]:
    """``args`` is the namespace of ``cli.get_args_parser()``; the model is built on the CPU."""
    if args.modelname not in MODELS:
        raise ValueError(f"-m/--modelname: unknown model {args.modelname!r}, choose from {sorted(MODELS)}")
    entry = MODELS[args.modelname]
    for flag in entry.unsupported_flags:
        if getattr(args, flag):
            raise ValueError(f"--{flag} is not supported by {args.modelname}")
    resolve_num_classes(args)
    dn_config = build_dn_config(args)
    model = entry.build(args, dn_config)

    weight_dict = build_weight_dict(args, model.transformer.decoder.num_layers, denoising=dn_config is not None,
                                    dn_class_loss_coef=resolve(entry.dn_class_loss_coef, args), aux_loss=args.aux_loss,
                                    encoder_losses=entry.encoder_losses)
    matcher = build_matcher(args, resolve(entry.matcher_focal_alpha, args))
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, focal_alpha=args.focal_alpha,
                             log_xy_hw=entry.log_xy_hw)
    return model, criterion, {"bbox": PostProcess(resolve(entry.num_select, args))}
