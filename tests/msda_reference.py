"""The previous multi-scale deformable attention core, one ``F.grid_sample`` per level, kept as a reference.

``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) is PyTorch's own bilinear sampler; its
autograd gives the exact gradients of the quantity the official CUDA kernel computes. The op in
``models/ops/ms_deform_attn.py`` must agree with this function (values and gradients).
"""
import torch
import torch.nn.functional as F

from models.ops import spatial_shapes_as_list


def grid_sample_msda(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as ``models.ops.ms_deform_attn_core``, computed level by level."""
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = spatial_shapes_as_list(spatial_shapes)
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    # [B, S, h, d] -> [B*h, d, S], then per-level views [B*h, d, H_l, W_l]
    value_per_head = value.to(compute_dtype).permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, num_values)
    value_levels = value_per_head.split([height * width for height, width in shapes], dim=-1)
    # grid_sample's grid lives in [-1, 1]: [B, Lq, h, L, P, 2] -> [B*h, Lq, L, P, 2]
    grids = (2 * sampling_locations.to(compute_dtype) - 1).transpose(1, 2).flatten(0, 1)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels, num_points)
    output = None
    for level, (height, width) in enumerate(shapes):
        level_value = value_levels[level].view(batch * num_heads, head_dim, height, width)
        samples = F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [B*h, d, Lq, P]
        weighted = (samples * weights[..., level, :]).sum(-1)  # [B*h, d, Lq]
        output = weighted if output is None else output + weighted
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()
