"""Sine positional encodings of image feature maps and of anchor boxes."""
import math

import torch
from torch import nn

from util.misc import NestedTensor


def _sine_features(coords: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """Interleaved sin/cos features of ``coords [...]`` -> ``[..., num_feats]``.

    Channel ``2m`` is ``sin(u / T^(2m / F))`` and channel ``2m + 1`` is ``cos(u / T^(2m / F))``.
    """
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = coords[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine encoding of pixel positions, ``[Y-features || X-features]`` -> ``[B, 2F, H, W]``.

    ``offset = 0`` with separate temperatures is the single-scale model's flavour ("SineHW", T = 20);
    ``offset = 0.5`` with T = 10000 on both axes is the deformable model's flavour.
    """

    def __init__(self, num_pos_feats: int = 128, temperature_h: float = 10000, temperature_w: float = 10000,
                 offset: float = 0.0, scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature_h = temperature_h
        self.temperature_w = temperature_w
        self.offset = offset
        self.scale = scale
        self.eps = eps

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        x, mask = tensor_list.decompose()
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # [B, H, W]
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        # Normalise by the valid length of each column / row (the last cumulative value).
        y_embed = (y_embed - self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = (x_embed - self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature_h)  # [B, H, W, F]
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature_w)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2).to(x.dtype)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding ``[col-embed(x) || row-embed(y)]`` for maps up to 50 x 50."""

    def __init__(self, num_pos_feats: int = 128):
        super().__init__()
        self.row_embed = nn.Embedding(50, num_pos_feats)
        self.col_embed = nn.Embedding(50, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> torch.Tensor:
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > 50 or w > 50:
            raise ValueError(f"learned position embedding supports feature maps up to 50x50, got {h}x{w}")
        x_emb = self.col_embed(torch.arange(w, device=x.device))  # [W, F]
        y_emb = self.row_embed(torch.arange(h, device=x.device))  # [H, F]
        pos = torch.cat([x_emb[None].expand(h, -1, -1), y_emb[:, None].expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1).to(x.dtype)


def anchor_sine_embedding(boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000) -> torch.Tensor:
    """Sine embedding of anchor boxes ``[..., 4]`` (x, y, w, h in [0, 1]) -> ``[..., 4F]`` ordered y, x, w, h."""
    features = _sine_features(boxes * (2 * math.pi), num_feats, temperature)  # [..., 4, F]
    x, y, w, h = features.unbind(-2)
    return torch.cat((y, x, w, h), dim=-1)


def build_position_encoding(args, deformable: bool) -> nn.Module:
    num_feats = args.hidden_dim // 2
    if args.position_embedding == "learned":
        return PositionEmbeddingLearned(num_feats)
    if deformable:
        return PositionEmbeddingSine(num_feats, 10000, 10000, offset=0.5)
    return PositionEmbeddingSine(num_feats, args.pe_temperatureH, args.pe_temperatureW, offset=0.0)
