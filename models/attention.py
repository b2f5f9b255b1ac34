"""Multi-head attention over already-projected queries, keys and values (conditional DETR style)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def attention_allowed_mask(attn_mask: Optional[torch.Tensor], key_padding_mask: Optional[torch.Tensor]):
    """Combine ``attn_mask [L, S]`` and ``key_padding_mask [B, S]`` (True = blocked) into the boolean
    "may attend" mask that ``F.scaled_dot_product_attention`` expects, broadcastable to ``[B, h, L, S]``."""
    blocked = None
    if attn_mask is not None:
        blocked = attn_mask[None, None]  # [1, 1, L, S]
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, None, :]  # [B, 1, 1, S]
        blocked = padding if blocked is None else blocked | padding
    return None if blocked is None else ~blocked


def multihead_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                        attn_mask: Optional[torch.Tensor] = None, key_padding_mask: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention of already-projected ``query [L, B, E]``, ``key [S, B, E]`` and
    ``value [S, B, Ev]`` split into ``num_heads`` heads -> ``[L, B, Ev]`` (head-major channels, no output
    projection). Queries are scaled by ``(E / num_heads) ** -0.5``."""
    num_queries, batch, qk_dim = query.shape
    num_keys = key.shape[0]
    head_dim = qk_dim // num_heads
    # [L, B, E] -> [B, L, E] (a copy) -> [B, L, h, E / h] -> [B, h, L, E / h] (a view). Same values as the
    # direct [L, B, h, E / h].permute(1, 2, 0, 3), but torch.compile's inductor rewrites the decomposed
    # attention of that view wrongly (its fused-attention pattern assumes heads came from [B, L, h, E / h]
    # through a swap of dims 1 and 2, and rebuilds the call with dims in the wrong order), so training a
    # compiled model failed; this layout is the one the pattern expects.
    q = query.transpose(0, 1).reshape(batch, num_queries, num_heads, head_dim).transpose(1, 2)
    k = key.transpose(0, 1).reshape(batch, num_keys, num_heads, head_dim).transpose(1, 2)
    v = value.transpose(0, 1).reshape(batch, num_keys, num_heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=attention_allowed_mask(attn_mask, key_padding_mask),
        dropout_p=dropout_p,
        scale=head_dim ** -0.5,
    )  # [B, h, L, Ev / h]
    return out.permute(2, 0, 1, 3).reshape(num_queries, batch, -1)  # [L, B, Ev], head-major channels


class MultiheadAttentionNoInProj(nn.Module):
    """:func:`multihead_attention` followed by an output projection; no input projections.

    Query/key width ``E`` may differ from the value width ``embed_dim`` (the conditional cross-attention
    concatenates content and positional halves per head: ``E = 2 * embed_dim``). Only ``out_proj`` holds
    weights.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``query [L, B, E]``, ``key [S, B, E]``, ``value [S, B, Ev]`` -> ``[L, B, Ev]``."""
        out = multihead_attention(query, key, value, self.num_heads, attn_mask, key_padding_mask,
                                  self.dropout if self.training else 0.0)
        return self.out_proj(out)
