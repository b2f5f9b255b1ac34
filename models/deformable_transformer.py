"""The multi-scale DAB-Deformable-DETR transformer of ``dn_dab_deformable_detr``.

Batch-first throughout (``[B, L, D]``). Encoder and decoder cross-attention are multi-scale
deformable attention; the decoder refines 4-D anchors with per-layer box heads that the detector
attaches as ``decoder.bbox_embed``.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from util.misc import inverse_sigmoid

from .detector import EncoderMemory, FeatureLevels
from .layers import MLP, LayerStack, build_activation, transformer_size
from .ops import MSDeformAttn
from .position_encoding import anchor_sine_embedding


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int,
                 activation: str = "relu"):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = build_activation(activation)  # a PReLU's slope sits between linear1 and linear2
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, padding_mask):
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, input_padding_mask=padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        src = self.norm2(src + self.dropout3(self.linear2(self.dropout2(self.activation(self.linear1(src))))))
        return src


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, memory_padding_mask, self_attn_mask):
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                   input_padding_mask=memory_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        tgt = self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))
        return tgt


class DeformableTransformerEncoder(LayerStack):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int):
        super().__init__(layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by the valid (unpadded) size -> ``[B, S, L, 2]`` (x, y)."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            # 0.5, 1.5, ... as arange + 0.5 (the values of linspace(0.5, n - 0.5, n)), whose length may stay
            # symbolic when the model is exported with a dynamic image size
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                torch.arange(width, dtype=torch.float32, device=valid_ratios.device) + 0.5,
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)  # [B, H*W]
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)  # [B, S, 2]
        return reference_points[:, :, None] * valid_ratios[:, None]  # [B, S, L, 2]

    def forward(self, src, spatial_shapes, valid_ratios, pos, padding_mask):
        reference_points = self.reference_points(spatial_shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = self.run_layer(layer, output, pos, reference_points, spatial_shapes, padding_mask)
        return output


class DeformableTransformerDecoder(LayerStack):
    """Anchor-refining decoder; every layer's references are detached before the next layer.

    With ``look_forward_twice`` the references returned for the heads of layer ``l >= 1`` are the refined
    boxes of layer ``l - 1`` before that detach (same values): a layer's box loss then also trains the
    previous layer's box head.
    """

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int, d_model: int,
                 look_forward_twice: bool = False):
        super().__init__(layer, num_layers)
        self.look_forward_twice = look_forward_twice
        # Scales the query position of layers 1.. only: a single-layer decoder has none (an unused
        # parameter would make DDP fail at the second step).
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.bbox_embed: Optional[nn.ModuleList] = None  # the detector's per-layer box heads, attached later
        self.class_embed: Optional[nn.ModuleList] = None  # two-stage only: the detector's class heads, attached later

    def forward(self, tgt, reference_points, memory, spatial_shapes, valid_ratios, memory_padding_mask,
                self_attn_mask):
        """``tgt [B, Q, D]``, ``reference_points [B, Q, 4]`` (sigmoid space) -> layer outputs ``[L, B, Q, D]``
        and the references each layer's heads refine ``[L, B, Q, 4]`` (the first is the input)."""
        d_model = tgt.shape[-1]
        output = tgt
        intermediate, references = [], [reference_points]
        for layer_id, layer in enumerate(self.layers):
            # [B, Q, 4] -> [B, Q, L, 4]: x, w scaled by each level's valid width ratio, y, h by its height ratio
            reference_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            raw_query_pos = self.ref_point_head(anchor_sine_embedding(reference_input[:, :, 0, :], d_model // 2))
            query_pos = raw_query_pos if layer_id == 0 else self.query_scale(output) * raw_query_pos

            output = self.run_layer(layer, output, query_pos, reference_input, memory, spatial_shapes,
                                    memory_padding_mask, self_attn_mask)

            refined = (self.bbox_embed[layer_id](output) + inverse_sigmoid(reference_points)).sigmoid()
            reference_points = refined.detach()
            intermediate.append(output)
            references.append(refined if self.look_forward_twice else reference_points)
        return torch.stack(intermediate), torch.stack(references[:-1])


class DeformableEncoding:
    """``encode`` of the transformers whose ``encoder`` is the multi-scale :class:`DeformableTransformerEncoder`
    with one learned ``level_embed [num_levels, D]`` row per feature level."""

    encoder: DeformableTransformerEncoder
    level_embed: nn.Parameter

    @staticmethod
    def valid_ratios(mask: torch.Tensor) -> torch.Tensor:
        """Unpadded fraction ``(w, h)`` of a level from its first row and column: ``[B, H, W]`` -> ``[B, 2]``."""
        _, height, width = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)

    def encode(self, levels: FeatureLevels) -> EncoderMemory:
        """Flatten the levels (``[B, D, H_l, W_l]`` each), add the level embeddings to their positional
        encodings and run the deformable encoder over all of them."""
        spatial_shapes = [tuple(src.shape[-2:]) for src in levels.srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in levels.srcs], 1)  # [B, S, D]
        mask_flatten = torch.cat([mask.flatten(1) for mask in levels.masks], 1)  # [B, S]
        lvl_pos_embed_flatten = torch.cat([
            pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
            for level, pos in enumerate(levels.pos)
        ], 1)  # [B, S, D]
        valid_ratios = torch.stack([self.valid_ratios(mask) for mask in levels.masks], 1)  # [B, L, 2]
        memory = self.encoder(src_flatten, spatial_shapes, valid_ratios, lvl_pos_embed_flatten, mask_flatten)
        return EncoderMemory(memory, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, valid_ratios)


PROPOSAL_BASE_SIZE = 0.05  # side of the encoder proposals at the finest level, doubled per level
PROPOSAL_VALID_RANGE = (0.01, 0.99)  # proposals with a coordinate outside (exclusive) are not selectable


def encoder_proposals(memory: EncoderMemory) -> Tuple[torch.Tensor, torch.Tensor]:
    """A box proposal per encoder token: centred on its pixel, normalised by the image's unpadded size,
    ``PROPOSAL_BASE_SIZE * 2**level`` wide and high.

    Returns the proposals' logits ``[B, S, 4]`` (float32, unclamped; ``+inf`` on invalid tokens) and the
    validity ``[B, S]``: every coordinate strictly inside ``PROPOSAL_VALID_RANGE`` and the token unpadded.
    """
    proposals, start = [], 0
    for level, (height, width) in enumerate(memory.spatial_shapes):
        mask = memory.padding_mask[:, start:start + height * width].view(-1, height, width)
        start += height * width
        valid_h = (~mask[:, :, 0]).sum(1).float()[:, None, None]  # [B, 1, 1] unpadded rows
        valid_w = (~mask[:, 0, :]).sum(1).float()[:, None, None]
        rows = torch.arange(height, dtype=torch.float32, device=mask.device)[None, :, None]
        cols = torch.arange(width, dtype=torch.float32, device=mask.device)[None, None, :]
        cx = ((cols + 0.5) / valid_w).expand(-1, height, -1)  # [B, H, W]
        cy = ((rows + 0.5) / valid_h).expand(-1, -1, width)
        size = torch.full_like(cx, PROPOSAL_BASE_SIZE * 2.0 ** level)
        proposals.append(torch.stack([cx, cy, size, size], -1).flatten(1, 2))
    proposals = torch.cat(proposals, 1)  # [B, S, 4]
    low, high = PROPOSAL_VALID_RANGE
    valid = ((proposals > low) & (proposals < high)).all(-1) & ~memory.padding_mask
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return logits, valid


class DeformableTransformer(DeformableEncoding, nn.Module):
    """With ``num_selected_queries > 0`` (two-stage), the matching queries are selected from the encoder
    proposals (:meth:`select_queries`): ``enc_output`` / ``enc_output_norm`` project the encoder memory
    for the proposal heads and ``tgt_embed`` holds the queries' learned content."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 look_forward_twice: bool = False, num_selected_queries: int = 0):
        super().__init__()
        self.d_model = d_model
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers, d_model, look_forward_twice)
        self.num_selected_queries = num_selected_queries
        if num_selected_queries > 0:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.tgt_embed = nn.Embedding(num_selected_queries, d_model)
            nn.init.normal_(self.tgt_embed.weight)  # drawn twice, as the original does (seeded parity only)
        self._reset_parameters()

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        nn.init.normal_(self.level_embed)

    def decode(self, content: torch.Tensor, anchors: torch.Tensor, attn_mask: Optional[torch.Tensor],
               memory: EncoderMemory):
        """Decode queries ``content [B, Q, D]`` with anchor logits ``[B, Q, 4]`` under the self-attention
        ``attn_mask [Q, Q]`` (True = blocked) -> ``hs [L, B, Q, D]``, references ``[L, B, Q, 4]``."""
        return self.decoder(content, anchors.sigmoid(), memory.memory, memory.spatial_shapes, memory.valid_ratios,
                            memory.padding_mask, attn_mask)

    def select_queries(self, memory: EncoderMemory) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
        """Two-stage matching queries: score and refine every encoder proposal with the last pair of the
        decoder's heads (``decoder.class_embed[-1]``, ``decoder.bbox_embed[-1]``, not used by any decoder
        layer) and keep the ``num_selected_queries`` best as anchors, without gradient. The content is
        ``tgt_embed``, the same for every image.

        Returns content ``[K, D]``, anchor logits ``[B, K, 4]`` and the proposals' predictions for the
        encoder losses: ``pred_logits [B, S, C]``, ``pred_boxes [B, S, 4]`` (1.0 on invalid tokens).
        """
        num_tokens = memory.memory.shape[1]
        if num_tokens < self.num_selected_queries:
            raise ValueError(f"--two_stage selects --num_queries {self.num_selected_queries} encoder proposals, but "
                             f"these images give only {num_tokens} encoder tokens: use larger images or fewer queries")
        proposal_logits, valid = encoder_proposals(memory)
        features = self.enc_output_norm(self.enc_output(memory.memory.masked_fill(~valid[..., None], 0.0)))
        enc_logits = self.decoder.class_embed[-1](features)  # [B, S, C]
        enc_box_logits = self.decoder.bbox_embed[-1](features) + proposal_logits.to(features.dtype)  # [B, S, 4]
        # The original ranks the proposals by the logit of class 0, not by their best class.
        topk = torch.topk(enc_logits[..., 0], self.num_selected_queries, dim=1).indices  # [B, K]
        anchors = torch.gather(enc_box_logits, 1, topk[..., None].expand(-1, -1, 4)).detach()
        # A numerically null term that keeps tgt_embed in the graph of the anchors (as the original).
        anchors = anchors + self.tgt_embed.weight[0, 0] * 0
        return self.tgt_embed.weight, anchors, {"pred_logits": enc_logits, "pred_boxes": enc_box_logits.sigmoid()}


def build_deformable_transformer(args, **options) -> DeformableTransformer:
    return DeformableTransformer(**transformer_size(args), num_feature_levels=args.num_feature_levels,
                                 dec_n_points=args.dec_n_points, enc_n_points=args.enc_n_points, **options)
