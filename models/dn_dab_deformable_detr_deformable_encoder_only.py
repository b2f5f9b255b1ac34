"""DN-DAB-Deformable-DETR with a deformable encoder only (``-m dn_dab_deformable_detr_deformable_encoder_only``).

A hybrid of the two other models: the multi-scale backbone levels, input projections, level
embeddings and deformable encoder of ``dn_dab_deformable_detr`` (but with the single-scale model's
image positional encoding and a configurable FFN activation), followed by the DAB decoder, heads,
matching queries and patterns of ``dn_dab_detr``. The one new piece is the decoder's attention over
the memory: dense conditional attention run separately on every feature level (one softmax per
level), each result projected by one shared ``ca_out_v_proj`` and mixed with per-query level weights
``softmax(lvl_attn(q))``, where ``q`` is the layer's self-attention query (computed from the layer
input, not from the self-attention output).
"""
from typing import List, Optional

import torch
from torch import nn

from .attention import multihead_attention
from .backbone import Joiner, build_backbone
from .dab_transformer import DABDecoding, TransformerDecoder, TransformerDecoderLayer
from .deformable_transformer import DeformableEncoding, DeformableTransformerEncoder, DeformableTransformerEncoderLayer
from .detector import class_head, multiscale_input_proj
from .dn_components import DNConfig
from .dn_dab_detr import DNDABDETR
from .layers import MLP, transformer_size


class MultiLevelDecoderLayer(TransformerDecoderLayer):
    """The DAB decoder layer with its memory attention split per feature level and mixed by level weights."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str,
                 num_levels: int):
        self.num_levels = num_levels
        super().__init__(d_model, nhead, dim_feedforward, dropout, activation)

    def build_memory_attention(self, d_model: int, nhead: int, dropout: float) -> None:
        self.attention_dropout = dropout  # the per-level attentions themselves hold no weights
        self.ca_out_v_proj = nn.Linear(d_model, d_model)
        nn.init.zeros_(self.ca_out_v_proj.bias)
        self.lvl_attn = nn.Linear(d_model, self.num_levels)

    def attend_memory(self, query, key, value, memory_key_padding_mask, sa_query, level_sizes: List[int]):
        """``query [Q, B, 2D]``, ``key [S, B, 2D]``, ``value [S, B, D]``; one attention per level block of
        ``level_sizes`` tokens, mixed by ``softmax(lvl_attn(sa_query))`` -> ``[Q, B, D]``."""
        if len(level_sizes) != self.num_levels:
            raise ValueError(f"the decoder layer was built for {self.num_levels} feature levels, "
                             f"the memory has {len(level_sizes)}")
        dropout_p = self.attention_dropout if self.training else 0.0
        per_level = torch.stack([
            multihead_attention(query, level_key, level_value, self.nhead, key_padding_mask=level_mask,
                                dropout_p=dropout_p)
            for level_key, level_value, level_mask in zip(key.split(level_sizes), value.split(level_sizes),
                                                          memory_key_padding_mask.split(level_sizes, dim=1))
        ], dim=-1)  # [Q, B, D, num_levels]
        level_weights = self.lvl_attn(sa_query).softmax(-1)  # [Q, B, num_levels]
        # The weights sum to 1, so projecting the mixture equals mixing the projected levels.
        mixed = (per_level * level_weights[:, :, None, :]).sum(-1)  # [Q, B, D]
        return self.ca_out_v_proj(mixed)


class EncoderOnlyTransformer(DeformableEncoding, DABDecoding, nn.Module):
    """Deformable multi-scale encoder (batch first) + DAB decoder of :class:`MultiLevelDecoderLayer`
    (sequence first inside); ``patterns`` are added to the matching queries by the detector."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, activation: str = "prelu",
                 num_feature_levels: int = 4, enc_n_points: int = 4, num_patterns: int = 0):
        super().__init__()
        self.d_model = d_model
        # Registered first, so it is the first entry of the state dict (as in the released checkpoints).
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points, activation)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = MultiLevelDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, num_feature_levels)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, d_model)
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None
        # Initialisation of the original release: one Xavier pass over every matrix (the deformable
        # attention's offset and weight projections and the patterns included, unlike the other models),
        # then normal level embeddings.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.level_embed)


class DNDABDeformableEncoderOnlyDETR(DNDABDETR):
    """Multi-scale backbone levels and deformable encoder, DAB decoder with multi-level memory attention;
    one class head and one box head shared by every decoder layer; matching queries as in
    :class:`models.dn_dab_detr.DNDABDETR` (the "unknown class" embedding, plus pattern embeddings)."""

    def __init__(self, backbone: Joiner, transformer: EncoderOnlyTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_config: Optional[DNConfig] = None):
        super(DNDABDETR, self).__init__(num_classes, num_queries, aux_loss, dn_config)
        hidden_dim = transformer.d_model
        self.register_in_order(
            transformer=transformer,
            class_embed=lambda: class_head(hidden_dim, num_classes),
            label_enc=self.label_embedding,
            # Default initialisation: unlike the other models, the original does not zero the last layer.
            bbox_embed=lambda: MLP(hidden_dim, hidden_dim, 4, 3),
            refpoint_embed=lambda: nn.Embedding(num_queries, 4),
            input_proj=lambda: multiscale_input_proj(backbone.num_channels, num_feature_levels, hidden_dim,
                                                     xavier_init=False),
            backbone=backbone,
        )


def build(args, dn_config: Optional[DNConfig]) -> DNDABDeformableEncoderOnlyDETR:
    if args.num_feature_levels < 3:
        raise ValueError(f"--num_feature_levels must be >= 3 (C3-C5 plus extra strided levels) for "
                         f"{args.modelname}, got {args.num_feature_levels}")
    backbone = build_backbone(args, return_layers=["layer2", "layer3", "layer4"], deformable=False)
    transformer = EncoderOnlyTransformer(**transformer_size(args), activation=args.transformer_activation,
                                         num_feature_levels=args.num_feature_levels, enc_n_points=args.enc_n_points,
                                         num_patterns=args.num_patterns)
    return DNDABDeformableEncoderOnlyDETR(backbone, transformer, num_classes=args.num_classes,
                                          num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                                          aux_loss=args.aux_loss, dn_config=dn_config)
