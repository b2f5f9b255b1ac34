"""DN-DAB-Deformable-DETR (``-m dn_dab_deformable_detr``): multi-scale, deformable attention (spec §4)."""
import copy
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from util.misc import NestedTensor, inverse_sigmoid, to_nested_tensor

from .backbone import Joiner, resize_mask
from .deformable_transformer import DeformableTransformer
from .dn_components import DNConfig, prepare_for_dn, split_dn_outputs
from .dn_dab_detr import make_outputs
from .layers import MLP


class DNDABDeformableDETR(nn.Module):
    """Backbone levels (+ extra strided levels) projected to ``hidden_dim``, a deformable transformer and
    per-decoder-layer class and box heads. Matching queries take their content from ``tgt_embed``."""

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_config: Optional[DNConfig] = None,
                 random_refpoints_xy: bool = False):
        super().__init__()
        hidden_dim = transformer.d_model
        num_layers = len(transformer.decoder.layers)
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.dn_config = dn_config

        self.transformer = transformer
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_layers))
        nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)  # one channel left for the DN indicator
        self.tgt_embed = nn.Embedding(num_queries, hidden_dim - 1)
        self.refpoint_embed = nn.Embedding(num_queries, 4)
        self.input_proj = self._build_input_proj(backbone.num_channels, num_feature_levels, hidden_dim)
        self.backbone = backbone

        if random_refpoints_xy:
            # Initialisation only: like the reference, the x, y anchors keep training.
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])
        self.transformer.decoder.bbox_embed = self.bbox_embed

    @staticmethod
    def _build_input_proj(in_channels: List[int], num_feature_levels: int, hidden_dim: int) -> nn.ModuleList:
        """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 conv + GroupNorm per extra level."""
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for c in in_channels]
        extra_in = in_channels[-1]
        for _ in range(num_feature_levels - len(in_channels)):
            projections.append(nn.Sequential(nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            extra_in = hidden_dim
        for proj in projections:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        return nn.ModuleList(projections)

    def matching_queries(self):
        """Content ``[nq, D]`` (``tgt_embed`` + indicator 0) and anchor logits ``[nq, 4]`` of the matching queries."""
        content = torch.cat([self.tgt_embed.weight, self.tgt_embed.weight.new_zeros(self.num_queries, 1)], dim=1)
        # A numerically null term that keeps label_enc in the graph when a batch has no objects, so
        # distributed training never sees it as an unused parameter (spec §3.7).
        content = content + self.label_enc.weight[0, 0] * 0
        return content, self.refpoint_embed.weight

    def feature_levels(self, samples: NestedTensor):
        """Projected feature levels with their masks and positional encodings."""
        features, pos = self.backbone(samples)
        srcs, masks = [], []
        for feature, proj in zip(features, self.input_proj):
            src, mask = feature.decompose()
            srcs.append(proj(src))
            masks.append(mask)
        for level in range(len(features), len(self.input_proj)):
            # The first extra level convolves the raw last backbone map; later ones the previous level.
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = resize_mask(samples.mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, pos

    def forward(self, samples, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        """Same interface as :class:`models.dn_dab_detr.DNDABDETR`."""
        samples = to_nested_tensor(samples)
        use_dn = self.training and self.dn_config is not None
        if use_dn and targets is None:
            raise ValueError("a model built with --use_dn needs the targets in training mode: model(samples, targets)")

        srcs, masks, pos = self.feature_levels(samples)
        content, anchors = self.matching_queries()
        queries = prepare_for_dn(targets if use_dn else None, self.dn_config if use_dn else None, self.label_enc,
                                 content, anchors, self.num_classes, srcs[0].shape[0])
        query_embeds = torch.cat([queries.content, queries.anchors], dim=2)  # [B, Q, D + 4]
        hs, references = self.transformer(srcs, masks, pos, query_embeds, queries.attn_mask)

        outputs_class = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])  # [L, B, Q, C]
        outputs_coord = torch.stack([
            (head(h) + inverse_sigmoid(ref)).sigmoid() for head, h, ref in zip(self.bbox_embed, hs, references)
        ])  # [L, B, Q, 4]
        outputs_class, outputs_coord, dn_meta = split_dn_outputs(outputs_class, outputs_coord, queries.dn_meta)
        return make_outputs(outputs_class, outputs_coord, self.aux_loss, dn_meta)
