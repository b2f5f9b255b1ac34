"""DN-DAB-Deformable-DETR (``-m dn_dab_deformable_detr``): multi-scale, deformable attention."""
from typing import Optional, Tuple

import torch
from torch import nn

from .backbone import Joiner, build_backbone
from .deformable_transformer import DeformableTransformer, build_deformable_transformer
from .detector import DNDetector, EncoderMemory, box_head, class_head, multiscale_input_proj, per_layer
from .dn_components import DNConfig


class DNDABDeformableDETR(DNDetector):
    """Backbone levels (+ extra strided levels) projected to ``hidden_dim``, a deformable transformer and
    one class head and one box head per decoder layer. Matching queries take their content from
    ``tgt_embed`` (indicator 0)."""

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_config: Optional[DNConfig] = None,
                 random_refpoints_xy: bool = False):
        super().__init__(num_classes, num_queries, aux_loss, dn_config)
        hidden_dim = transformer.d_model
        num_layers = transformer.decoder.num_layers
        self.register_in_order(
            transformer=transformer,
            class_embed=lambda: per_layer(class_head(hidden_dim, num_classes), num_layers),
            bbox_embed=lambda: per_layer(box_head(hidden_dim), num_layers),
            label_enc=self.label_embedding,
            tgt_embed=lambda: nn.Embedding(num_queries, hidden_dim - 1),
            refpoint_embed=lambda: nn.Embedding(num_queries, 4),
            input_proj=lambda: multiscale_input_proj(backbone.num_channels, num_feature_levels, hidden_dim,
                                                     xavier_init=True),
            backbone=backbone,
        )
        # The first layer's boxes start small (a quirk of the original initialisation, kept for parity).
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        if random_refpoints_xy:
            self.randomise_anchor_xy()

    def matching_queries(self, memory: EncoderMemory) -> Tuple[torch.Tensor, torch.Tensor]:
        """Content ``[nq, D]`` (``tgt_embed`` + indicator 0) and anchor logits ``[nq, 4]``."""
        content = torch.cat([self.tgt_embed.weight, self.tgt_embed.weight.new_zeros(self.num_queries, 1)], dim=1)
        # A numerically null term that keeps label_enc in the graph when a batch has no objects, so
        # distributed training never sees it as an unused parameter.
        content = content + self.label_enc.weight[0, 0] * 0
        return content, self.refpoint_embed.weight


def deformable_backbone(args) -> Joiner:
    """The backbone of the multi-scale deformable models: C3-C5 (or C5 alone with one feature level)."""
    if args.num_feature_levels == 2 or args.num_feature_levels < 1:
        raise ValueError(f"--num_feature_levels must be 1 (C5 only) or >= 3 (C3-C5 plus extra strided levels), "
                         f"got {args.num_feature_levels}")
    return_layers = ["layer4"] if args.num_feature_levels == 1 else ["layer2", "layer3", "layer4"]
    return build_backbone(args, return_layers=return_layers, deformable=True)


def build(args, dn_config: Optional[DNConfig]) -> DNDABDeformableDETR:
    return DNDABDeformableDETR(deformable_backbone(args), build_deformable_transformer(args),
                               num_classes=args.num_classes, num_queries=args.num_queries,
                               num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                               dn_config=dn_config, random_refpoints_xy=args.random_refpoints_xy)
