"""The network a checkpoint holds, built to run it: shared by ``inference.py``, ``scripts/export_onnx.py`` and
``hubconf.py`` (``main.py --eval --resume`` follows the same rules inside its training set-up)."""
import argparse
from typing import Tuple

from torch import nn

from cli import get_args_parser, warn_ignored_flags
from models import build_model
from models.builder import adopt_state_dict_flags
from util.checkpoint import adopt_checkpoint_model_args, load_checkpoint, load_weights_strictly, model_weights


def load_model_for_inference(args: argparse.Namespace, logger) -> Tuple[nn.Module, nn.Module, dict]:
    """Build the network of checkpoint ``args.resume`` and load its weights; returns (model in eval mode on
    the CPU, its post-processor, the checkpoint).

    Network flags left at their defaults take the values the checkpoint records (``args``) or reveals (its
    tensors); the weights are its ``ema_model`` when it has one, unless ``--no-ema_weights``, loaded strictly.
    The backbone's ImageNet weights are never downloaded (the checkpoint replaces every weight).

    Raises FileNotFoundError or ``util.checkpoint.CheckpointError`` naming the file.
    """
    checkpoint = load_checkpoint(args.resume)
    state_dict, key = model_weights(checkpoint, args.resume, args.ema_weights)
    adopt_checkpoint_model_args(args, checkpoint.get("args"), get_args_parser(), args.resume, logger)
    adopt_state_dict_flags(args, state_dict, get_args_parser(), args.resume, logger)
    warn_ignored_flags(args, logger)
    args.no_pretrained_backbone = True
    model, _, postprocessors = build_model(args)
    load_weights_strictly(model, state_dict, args.resume)
    logger.info(f"Loaded {args.modelname} from {args.resume} ({key}, epoch {checkpoint.get('epoch', '?')})")
    return model.eval(), postprocessors["bbox"], checkpoint
