"""DN-DAB-DETR (``-m dn_dab_detr``): single-scale DAB-DETR trained with query denoising (spec §2)."""
import math
from typing import Dict, List, Optional

import torch
from torch import nn

from util.misc import inverse_sigmoid, to_nested_tensor

from .backbone import Joiner
from .dab_transformer import Transformer
from .dn_components import DNConfig, prepare_for_dn, split_dn_outputs
from .layers import MLP


class DNDABDETR(nn.Module):
    """Backbone + one projected feature map + DAB transformer with a shared class head and box head.

    Matching queries all carry the content ``[label_enc[num_classes] || 0]`` (the "unknown class"
    embedding with indicator 0), with or without denoising, so weights move between DN runs and
    baselines. Submodule registration order fixes the state-dict and optimizer order (spec §2.1).
    """

    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, dn_config: Optional[DNConfig] = None, random_refpoints_xy: bool = False):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.dn_config = dn_config
        self.num_pattern_blocks = max(transformer.num_patterns, 1)

        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1)  # one channel left for the DN indicator
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.refpoint_embed = nn.Embedding(num_queries, 4)  # anchors (x, y, w, h) in logit space
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

        prior_prob = 0.01
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)
        if random_refpoints_xy:
            # Initialisation only: like the reference, the x, y anchors keep training.
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])
        # The same box head refines anchors inside the decoder (a second state-dict path, spec §2.1).
        self.transformer.decoder.bbox_embed = self.bbox_embed

    def matching_queries(self):
        """Content ``[np * nq, D]`` and anchor logits ``[np * nq, 4]`` of the matching queries."""
        unknown = self.label_enc.weight[self.num_classes]
        content = torch.cat([unknown, unknown.new_zeros(1)])  # indicator 0
        num_rows = self.num_queries * self.num_pattern_blocks
        return content.expand(num_rows, -1), self.refpoint_embed.weight.repeat(self.num_pattern_blocks, 1)

    def forward(self, samples, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        """``samples``: NestedTensor or list of ``[3, H, W]`` images; ``targets`` feed the denoising
        queries when training with denoising (normalised cxcywh ``boxes`` and ``labels``).

        Returns ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``, ``aux_outputs`` (one dict per
        earlier decoder layer) and, when denoising, ``dn_meta`` with the denoising predictions.
        """
        samples = to_nested_tensor(samples)
        use_dn = self.training and self.dn_config is not None
        if use_dn and targets is None:
            raise ValueError("a model built with --use_dn needs the targets in training mode: model(samples, targets)")

        features, pos = self.backbone(samples)
        src, mask = features[-1].decompose()
        batch_size = src.shape[0]
        content, anchors = self.matching_queries()
        queries = prepare_for_dn(targets if use_dn else None, self.dn_config if use_dn else None, self.label_enc,
                                 content, anchors, self.num_classes, batch_size)
        num_dn = 0 if queries.dn_meta is None else queries.dn_meta.pad_size
        hs, references = self.transformer(
            self.input_proj(src), mask, pos[-1],
            queries.content.transpose(0, 1), queries.anchors.transpose(0, 1),  # [B, Q, *] -> [Q, B, *]
            queries.attn_mask, num_dn,
        )  # hs [L, B, Q, D], references [L, B, Q, 4]
        outputs_coord = (self.bbox_embed(hs) + inverse_sigmoid(references)).sigmoid()
        outputs_class = self.class_embed(hs)
        outputs_class, outputs_coord, dn_meta = split_dn_outputs(outputs_class, outputs_coord, queries.dn_meta)
        return make_outputs(outputs_class, outputs_coord, self.aux_loss, dn_meta)


def make_outputs(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, aux_loss: bool, dn_meta) -> Dict:
    """Output dict from per-layer predictions ``[L, B, Q, *]``."""
    out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
    if dn_meta is not None:
        out["dn_meta"] = dn_meta
    return out
