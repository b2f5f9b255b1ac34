"""The single-scale DAB-DETR transformer of ``dn_dab_detr``.

Its public interface (``encode`` / ``decode``) is batch-first like every transformer of the project;
inside, everything is sequence-first (``[L, B, D]``). The decoder refines 4-D anchor boxes layer by
layer with the detector's shared box head, which the detector attaches as ``decoder.bbox_embed``.
"""
from typing import Optional

import torch
from torch import nn

from util.misc import inverse_sigmoid

from .attention import MultiheadAttentionNoInProj
from .detector import EncoderMemory, FeatureLevels
from .layers import MLP, LayerStack, build_activation, transformer_size
from .position_encoding import anchor_sine_embedding


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention + FFN layer; the positional encoding is added to queries and keys."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def forward(self, src, src_key_padding_mask, pos):
        q = k = src + pos
        attended = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(attended))
        src = self.norm2(src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src))))))
        return src


class TransformerEncoder(LayerStack):
    """Encoder whose positional encoding is rescaled by an MLP of the current state at every layer."""

    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, d_model: int, final_norm: bool):
        super().__init__(layer, num_layers)
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model) if final_norm else None

    def forward(self, src, src_key_padding_mask, pos):
        output = src
        for layer in self.layers:
            output = self.run_layer(layer, output, src_key_padding_mask, pos * self.query_scale(output))
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoderLayer(nn.Module):
    """DAB/conditional decoder layer: self-attention over queries, conditional cross-attention, FFN.

    ``ca_qpos_proj`` (adding the positional query to the cross-attention query) exists only in the
    first layer; later layers rely on the sine query ``query_sine_embed`` alone.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str):
        super().__init__()
        self.nhead = nhead
        self.sa_qcontent_proj = nn.Linear(d_model, d_model)
        self.sa_qpos_proj = nn.Linear(d_model, d_model)
        self.sa_kcontent_proj = nn.Linear(d_model, d_model)
        self.sa_kpos_proj = nn.Linear(d_model, d_model)
        self.sa_v_proj = nn.Linear(d_model, d_model)
        self.self_attn = MultiheadAttentionNoInProj(d_model, nhead, dropout=dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)

        self.ca_qcontent_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_proj = nn.Linear(d_model, d_model)
        self.ca_kcontent_proj = nn.Linear(d_model, d_model)
        self.ca_kpos_proj = nn.Linear(d_model, d_model)
        self.ca_v_proj = nn.Linear(d_model, d_model)
        self.ca_qpos_sine_proj = nn.Linear(d_model, d_model)
        self.build_memory_attention(d_model, nhead, dropout)

        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = build_activation(activation)

    def build_memory_attention(self, d_model: int, nhead: int, dropout: float) -> None:
        """Register the attention over the memory (called from ``__init__`` at its place in the checkpoint's
        key order)."""
        self.cross_attn = MultiheadAttentionNoInProj(d_model, nhead, dropout=dropout)

    def attend_memory(self, query, key, value, memory_key_padding_mask, sa_query, level_sizes):
        """One softmax over all memory keys (``sa_query`` and ``level_sizes`` serve multi-level layers)."""
        return self.cross_attn(query, key, value, key_padding_mask=memory_key_padding_mask)

    def forward(self, tgt, memory, tgt_mask, memory_key_padding_mask, pos, query_pos, query_sine_embed,
                level_sizes=None):
        """``tgt [Q, B, D]``, ``memory``/``pos [S, B, D]``; ``level_sizes``: memory tokens per feature level."""
        # Self-attention between queries (DN groups isolated by ``tgt_mask``).
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        attended = self.self_attn(q, k, self.sa_v_proj(tgt), attn_mask=tgt_mask)
        sa_query = q
        tgt = self.norm1(tgt + self.dropout1(attended))

        # Conditional cross-attention: per head, [content || positional] for queries and keys.
        q_content = self.ca_qcontent_proj(tgt)
        k_content = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.ca_qpos_proj is not None:
            q_content = q_content + self.ca_qpos_proj(query_pos)
            k_content = k_content + k_pos
        num_queries, batch, d_model = q_content.shape
        num_keys = k_content.shape[0]
        head_dim = d_model // self.nhead
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        # [L, B, D] -> [L, B, h, D/h], concatenated per head -> [L, B, 2D] (head-major)
        q = torch.cat([q_content.view(num_queries, batch, self.nhead, head_dim),
                       q_sine.view(num_queries, batch, self.nhead, head_dim)], dim=3).view(num_queries, batch, -1)
        k = torch.cat([k_content.view(num_keys, batch, self.nhead, head_dim),
                       k_pos.view(num_keys, batch, self.nhead, head_dim)], dim=3).view(num_keys, batch, -1)
        attended = self.attend_memory(q, k, self.ca_v_proj(memory), memory_key_padding_mask, sa_query, level_sizes)
        tgt = self.norm2(tgt + self.dropout2(attended))

        tgt = self.norm3(tgt + self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(tgt))))))
        return tgt


class TransformerDecoder(LayerStack):
    """Decoder that refines anchor boxes ``(x, y, w, h)`` after every layer."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, d_model: int):
        super().__init__(layer, num_layers)
        for later_layer in self.layers[1:]:
            later_layer.ca_qpos_proj = None
        self.norm = nn.LayerNorm(d_model)
        # Scales the query position of layers 1.. only: a single-layer decoder has none (an unused
        # parameter would make DDP fail at the second step).
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2)
        self.bbox_embed: Optional[nn.Module] = None  # the detector's shared box head, attached later

    def forward(self, tgt, memory, tgt_mask, memory_key_padding_mask, pos, refpoints_logit, level_sizes=None):
        """Returns normalised layer outputs ``[L, Q, B, D]`` and per-layer references ``[L, Q, B, 4]``.

        Reference ``l`` is the box layer ``l``'s predictions refine: the initial anchors for layer 0,
        then layer ``l-1``'s refined boxes *with* their graph (the next layer itself sees a detached copy).
        """
        d_model = tgt.shape[-1]
        half = d_model // 2
        output = tgt
        reference = refpoints_logit.sigmoid()  # [Q, B, 4], not detached
        references = [reference]
        intermediate = []
        for layer_id, layer in enumerate(self.layers):
            sine_embed = anchor_sine_embedding(reference, half)  # [Q, B, 2D]
            query_pos = self.ref_point_head(sine_embed)  # [Q, B, D]
            # Only the (y, x) half feeds the cross-attention, scaled by the content from layer 1 on ...
            query_sine_embed = sine_embed[..., :d_model]
            if layer_id > 0:
                query_sine_embed = query_sine_embed * self.query_scale(output)
            # ... and modulated by the ratio of a predicted size to the anchor's size.
            ref_hw = self.ref_anchor_head(output).sigmoid()  # [Q, B, 2] = (w, h) conditions
            query_sine_embed = torch.cat([
                query_sine_embed[..., :half] * (ref_hw[..., 1] / reference[..., 3]).unsqueeze(-1),
                query_sine_embed[..., half:] * (ref_hw[..., 0] / reference[..., 2]).unsqueeze(-1),
            ], dim=-1)

            output = self.run_layer(layer, output, memory, tgt_mask, memory_key_padding_mask, pos, query_pos,
                                    query_sine_embed, level_sizes)

            refined = (self.bbox_embed(output) + inverse_sigmoid(reference)).sigmoid()
            if layer_id < len(self.layers) - 1:
                references.append(refined)
            reference = refined.detach()
            intermediate.append(self.norm(output))
        return torch.stack(intermediate), torch.stack(references)


class DABDecoding:
    """``decode`` of the transformers whose ``decoder`` is the sequence-first :class:`TransformerDecoder`."""

    decoder: TransformerDecoder

    def decode(self, content: torch.Tensor, anchors: torch.Tensor, attn_mask: Optional[torch.Tensor],
               memory: EncoderMemory):
        """Decode queries ``content [B, Q, D]`` with anchor logits ``[B, Q, 4]`` under the self-attention
        ``attn_mask [Q, Q]`` (True = blocked) -> ``hs [L, B, Q, D]``, references ``[L, B, Q, 4]``."""
        level_sizes = [height * width for height, width in memory.spatial_shapes]
        hs, references = self.decoder(content.transpose(0, 1), memory.memory.transpose(0, 1), attn_mask,
                                      memory.padding_mask, memory.pos.transpose(0, 1), anchors.transpose(0, 1),
                                      level_sizes)
        return hs.transpose(1, 2), references.transpose(1, 2)


class Transformer(DABDecoding, nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.0,
                 activation: str = "prelu", encoder_final_norm: bool = False, num_patterns: int = 0):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, d_model, encoder_final_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, d_model)
        self.d_model = d_model
        self._reset_parameters()
        # Pattern embeddings, added to the matching queries by the detector. Created after the Xavier
        # pass, so they keep the default N(0, 1) embedding init.
        self.patterns = nn.Embedding(num_patterns, d_model) if num_patterns > 0 else None

    def _reset_parameters(self):
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, levels: FeatureLevels) -> EncoderMemory:
        """Encode the one projected feature map ``[B, D, H, W]`` (padding mask ``[B, H, W]``)."""
        src, mask, pos_embed = levels.srcs[0], levels.masks[0], levels.pos[0]
        spatial_shape = tuple(src.shape[-2:])
        src = src.flatten(2).permute(2, 0, 1)  # [B, D, H, W] -> [HW, B, D]
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        mask = mask.flatten(1)  # [B, HW]
        memory = self.encoder(src, mask, pos_embed)
        # Batch-first views of the sequence-first tensors; ``decode`` transposes them back.
        return EncoderMemory(memory.transpose(0, 1), mask, pos_embed.transpose(0, 1), [spatial_shape], None)


def build_dab_transformer(args) -> Transformer:
    return Transformer(**transformer_size(args), activation=args.transformer_activation,
                       encoder_final_norm=args.pre_norm, num_patterns=args.num_patterns)
