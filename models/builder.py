"""Build a detector, its criterion and post-processor from the command-line arguments."""
import logging
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from util.checkpoint import CheckpointError
from util.config import given_flags
from util.coco_categories import COCO_NUM_CLASSES

from .criterion import SetCriterion, build_weight_dict
from .dn_components import DNConfig
from .matcher import build_matcher
from .postprocess import PostProcess
from .registry import MODELS, resolve


def resolve_num_classes(args, dataset_max_category_id: Optional[int] = None, dataset_name: Optional[str] = None) -> int:
    """Set and return ``args.num_classes``, the number of classification logits.

    ``--num_classes`` when given (or read from a checkpoint by :func:`adopt_state_dict_flags`); otherwise
    the dataset's largest category id + 1, else COCO's 91. A value too small for the dataset's ids is
    an error naming ``dataset_name`` (default: ``args.coco_path``).
    """
    if args.num_classes is None:
        args.num_classes = COCO_NUM_CLASSES if dataset_max_category_id is None else dataset_max_category_id + 1
    if dataset_max_category_id is not None and args.num_classes <= dataset_max_category_id:
        raise ValueError(f"--num_classes {args.num_classes} is too small for {dataset_name or args.coco_path}: "
                         f"its category ids go up to {dataset_max_category_id}, so at least "
                         f"{dataset_max_category_id + 1} classification logits are needed")
    return args.num_classes


def build_dn_config(args) -> Optional[DNConfig]:
    """The denoising settings of ``args`` (None without ``--use_dn``), with the ones the model fixes."""
    if not args.use_dn:
        return None
    return DNConfig.from_args(args, **MODELS[args.modelname].dn_options)


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
    model.transformer.encoder.checkpoint_layers = args.checkpoint_encoder
    model.transformer.decoder.checkpoint_layers = args.checkpoint_decoder

    weight_dict = build_weight_dict(args, model.transformer.decoder.num_layers, denoising=dn_config is not None,
                                    dn_class_loss_coef=resolve(entry.dn_class_loss_coef, args), aux_loss=args.aux_loss,
                                    encoder_losses=entry.encoder_losses)
    matcher = build_matcher(args, resolve(entry.matcher_focal_alpha, args))
    criterion = SetCriterion(args.num_classes, matcher, weight_dict, focal_alpha=args.focal_alpha,
                             log_xy_hw=entry.log_xy_hw)
    return model, criterion, {"bbox": PostProcess(resolve(entry.num_select, args))}


def flags_from_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, Tuple[Any, str]]:
    """The network flags a state dict reveals, each with the key that reveals it.

    ``num_classes`` from the rows of the denoising class embedding (or, without one, of the class head),
    ``num_patterns`` from the pattern embeddings (none: 0), the activation from the per-layer PReLU
    slopes (none: ReLU, the choice of the released models that have no slopes) and ``two_stage`` from
    the encoder-proposal projection.
    """
    flags = {}
    class_head = next((key for key in ("class_embed.weight", "class_embed.0.weight") if key in state_dict), None)
    if "label_enc.weight" in state_dict:  # [num_classes + 1, D - 1]
        flags["num_classes"] = (state_dict["label_enc.weight"].shape[0] - 1, "label_enc.weight")
    elif class_head is not None:  # [num_classes, D]
        flags["num_classes"] = (state_dict[class_head].shape[0], class_head)
    # The DINO-style variant keeps its (unused) pattern embeddings at the top level.
    patterns_key = "patterns_embed.weight" if "patterns_embed.weight" in state_dict else "transformer.patterns.weight"
    patterns = state_dict.get(patterns_key)
    flags["num_patterns"] = (0 if patterns is None else patterns.shape[0], patterns_key)
    flags["two_stage"] = ("transformer.enc_output.weight" in state_dict, "transformer.enc_output.weight")
    slopes = [key for key in state_dict if key.endswith(".activation.weight")]
    flags["transformer_activation"] = ("prelu", slopes[0]) if slopes else ("relu", "*.activation.weight")
    return flags


def adopt_state_dict_flags(args, state_dict: Dict[str, torch.Tensor], defaults, source: str, logger=None) -> None:
    """Set the network flags of ``args`` that a checkpoint's state dict reveals (:func:`flags_from_state_dict`)
    where neither the command line nor a config gave them (:func:`util.config.given_flags`; ``defaults`` is the
    parser); a flag given with another value is an error naming the flag, the key and ``source`` (the file)."""
    logger = logger or logging.getLogger(__name__)
    given = given_flags(args, defaults)
    for flag, (found, key) in flags_from_state_dict(state_dict).items():
        value = getattr(args, flag)
        if value == found:
            continue
        if flag in given:
            if flag == "transformer_activation" and found == "relu" and value != "prelu":
                continue  # no slopes: any activation without weights fits the keys
            presence = "has" if found not in (0, "relu") else "has no"
            fine_tune = (" (to train it on data with another class count, load it with --pretrain_model_path "
                         "instead of --resume)" if flag == "num_classes" else "")
            raise CheckpointError(f"{source}: --{flag} {value!r} does not fit the checkpoint, which {presence} "
                                  f"{key} ({flag} {found!r}); drop the flag or give {found!r}{fine_tune}")
        logger.info(f"--{flag} {found!r} read from {source} ({key})")
        setattr(args, flag, found)
