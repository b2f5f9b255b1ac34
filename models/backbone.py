"""ResNet backbone with frozen batch norm, joined with the positional encoding.

State-dict layout: ``backbone.0.body.*`` is the torchvision ResNet trunk up to ``layer4``;
``backbone.1`` is the positional encoding (no keys for the sine flavours).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import misc

from util.misc import NestedTensor

from .position_encoding import build_position_encoding

IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


class FrozenBatchNorm2d(misc.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (the same buffers, state-dict keys and float32 result), except that a
    bfloat16 input (autocast on a CPU) stays bfloat16: promoted to float32 by the float32 statistics, every
    convolution's output would make a round trip through float32 before the next convolution casts it back,
    which costs about a fifth of the backbone's bfloat16 step. float16 keeps the promotion: its narrow range
    is no place for an unnormalised scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()  # [C]
        shift = self.bias - self.running_mean * scale
        if x.dtype == torch.bfloat16:
            scale, shift = scale.to(x.dtype), shift.to(x.dtype)
        return x * scale[:, None, None] + shift[:, None, None]


NORM_LAYERS = {
    "FrozenBatchNorm2d": FrozenBatchNorm2d,
    "BatchNorm2d": nn.BatchNorm2d,
    "SyncBatchNorm": nn.SyncBatchNorm,
}


class BackboneWeightsError(RuntimeError):
    """The ImageNet weights of the backbone could not be loaded (offline, no cached file)."""


def load_imagenet_weights(name: str) -> Dict[str, torch.Tensor]:
    """torchvision's ``IMAGENET1K_V1`` weights (the legacy ``pretrained=True`` ones) of a ResNet."""
    weights = getattr(torchvision.models, IMAGENET_WEIGHTS[name]).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as err:  # network or cache problem: say what to do instead of a bare URL error
        raise BackboneWeightsError(
            f"could not load the ImageNet weights of {name} ({weights.url}): {err}. Put the file into "
            f"{torch.hub.get_dir()}/checkpoints/, or pass --no_pretrained_backbone (e.g. when a full "
            "checkpoint is loaded with --resume/--pretrain_model_path anyway)."
        ) from err


class Backbone(nn.Module):
    """A torchvision ResNet returning the requested stages with their downsampled padding masks.

    ``checkpoint_stages`` turns on activation checkpointing of the trainable stages: only a stage's input is
    kept for the backward pass, its activations are recomputed there, one stage at a time (frozen stages keep
    nothing for backward anyway). ``channels_last`` runs the trunk in channels-last memory format (weights and
    images), the layout oneDNN's CPU convolutions and tensor-core GPU convolutions are fastest in; the
    returned maps keep that layout, which later layers accept as any strided tensor.
    """

    def __init__(self, name: str, train_backbone: bool, return_layers: List[str], dilation: bool,
                 norm_layer: str = "FrozenBatchNorm2d", pretrained: bool = True):
        super().__init__()
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"--dilation (DC5) needs a bottleneck ResNet (resnet50/resnet101), not {name}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm_layer])
        if pretrained:
            # FrozenBatchNorm2d drops the ``num_batches_tracked`` entries of the ImageNet weights itself.
            resnet.load_state_dict(load_imagenet_weights(name))
        for param_name, param in resnet.named_parameters():
            trainable = train_backbone and any(stage in param_name for stage in ("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        self.body = IntermediateLayerGetter(resnet, return_layers={layer: layer for layer in return_layers})
        self.checkpoint_stages = False
        self.channels_last = False
        stage_channels = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.num_channels = [stage_channels[layer] * expansion for layer in return_layers]
        self.strides = [{"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[layer] for layer in return_layers]
        if dilation:
            self.strides[-1] //= 2

    def forward(self, tensor_list: NestedTensor) -> List[NestedTensor]:
        x, features = tensor_list.tensors, []
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for name, stage in self.body.items():  # the stem's modules, then layer1 .. layer4
            x = self.run_stage(stage, x)
            if name in self.body.return_layers:
                features.append(x)
        return [NestedTensor(x, resize_mask(tensor_list.mask, x.shape[-2:])) for x in features]

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if not (self.checkpoint_stages and torch.is_grad_enabled()
                and any(param.requires_grad for param in stage.parameters())):
            return stage(x)
        return checkpoint(stage, x, use_reentrant=False)


def resize_mask(mask: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour resize of a padding mask ``[B, H, W]`` to ``size``."""
    return F.interpolate(mask[None].float(), size=size).to(torch.bool)[0]


class Joiner(nn.Sequential):
    """``backbone.0`` = the ResNet, ``backbone.1`` = the positional encoding of each returned map."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, tensor_list: NestedTensor):
        features = self[0](tensor_list)
        pos = [self[1](feature) for feature in features]
        return features, pos


def build_backbone(args, return_layers: List[str], deformable: bool) -> Joiner:
    if args.checkpoint_backbone and args.batch_norm_type != "FrozenBatchNorm2d":
        raise ValueError(f"--checkpoint_backbone needs --batch_norm_type FrozenBatchNorm2d, not "
                         f"{args.batch_norm_type}: recomputing a block would update its running statistics twice")
    backbone = Backbone(
        args.backbone,
        train_backbone=args.lr_backbone > 0,
        return_layers=return_layers,
        dilation=args.dilation,
        norm_layer=args.batch_norm_type,
        pretrained=not args.no_pretrained_backbone,
    )
    backbone.checkpoint_stages = args.checkpoint_backbone
    if args.channels_last:
        backbone.channels_last = True
        backbone.body.to(memory_format=torch.channels_last)
    return Joiner(backbone, build_position_encoding(args, deformable))
