"""DN-DAB-DETR (``-m dn_dab_detr``): single-scale DAB-DETR trained with query denoising."""
from typing import Optional, Tuple

import torch
from torch import nn

from .backbone import Joiner, build_backbone
from .dab_transformer import Transformer, build_dab_transformer
from .detector import DNDetector, EncoderMemory, box_head, class_head
from .dn_components import DNConfig


class DNDABDETR(DNDetector):
    """Backbone + one projected feature map + DAB transformer with one class head and one box head
    shared by every decoder layer.

    Matching queries all carry the content ``[label_enc[num_classes] || 0]`` (the "unknown class"
    embedding with indicator 0), with or without denoising, so weights move between denoising runs
    and baselines. With pattern embeddings the matching queries are repeated once per pattern and
    pattern ``j`` is added to the content of the ``j``-th block.
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, dn_config: Optional[DNConfig] = None, random_refpoints_xy: bool = False):
        super().__init__(num_classes, num_queries, aux_loss, dn_config)
        hidden_dim = transformer.d_model
        self.register_in_order(
            transformer=transformer,
            class_embed=lambda: class_head(hidden_dim, num_classes),
            label_enc=self.label_embedding,
            bbox_embed=lambda: box_head(hidden_dim),
            refpoint_embed=lambda: nn.Embedding(num_queries, 4),  # anchors (x, y, w, h) in logit space
            input_proj=lambda: nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1),
            backbone=backbone,
        )
        if random_refpoints_xy:
            self.randomise_anchor_xy()

    def matching_queries(self, memory: EncoderMemory) -> Tuple[torch.Tensor, torch.Tensor]:
        """Content ``[np * nq, D]`` and anchor logits ``[np * nq, 4]`` (``np`` patterns, at least 1)."""
        unknown = self.label_enc.weight[self.num_classes]
        content = torch.cat([unknown, unknown.new_zeros(1)])  # indicator 0
        patterns = self.transformer.patterns
        num_blocks = 1 if patterns is None else patterns.num_embeddings
        anchors = self.refpoint_embed.weight.repeat(num_blocks, 1)
        if patterns is None:
            return content.expand(self.num_queries, -1), anchors
        pattern_rows = patterns.weight.repeat_interleave(self.num_queries, dim=0)  # [np * nq, D]
        return content + pattern_rows, anchors

def build(args, dn_config: Optional[DNConfig]) -> DNDABDETR:
    backbone = build_backbone(args, return_layers=["layer4"], deformable=False)
    return DNDABDETR(backbone, build_dab_transformer(args), num_classes=args.num_classes,
                     num_queries=args.num_queries, aux_loss=args.aux_loss, dn_config=dn_config,
                     random_refpoints_xy=args.random_refpoints_xy)
