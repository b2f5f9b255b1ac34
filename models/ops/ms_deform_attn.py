"""Multi-scale deformable attention (MSDA) in pure PyTorch (spec §4.1, §4.2, §4.4).

No compiled extension: the sampling is ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``),
whose autograd backward is the exact gradient of the quantity the official CUDA kernel computes. Runs on any
device (CPU, CUDA, MPS) and in any floating dtype (float64 for gradcheck, float32, bfloat16/float16 or autocast).

Spatial shapes may be given either as an int64 tensor ``[L, 2]`` of ``(H_l, W_l)`` or as a Python sequence of
``(H_l, W_l)`` pairs. The sampling needs the sizes as Python ints (tensor views), so a tensor on an accelerator
costs one device-to-host sync per call (``.tolist()``); passing the Python list, which the caller usually has
anyway (``src.shape[-2:]``), avoids that sync entirely.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

SpatialShapes = Union[torch.Tensor, Sequence[Sequence[int]]]


def _side(size) -> int:
    """A level's height or width as a Python int; a symbolic size (a model exported for any image size)
    stays symbolic instead of being frozen to the example's value."""
    return size if isinstance(size, torch.SymInt) else int(size)


def spatial_shapes_as_list(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    """``(H_l, W_l)`` per level as Python ints; a tensor is read back once (a host sync on accelerators)."""
    if isinstance(spatial_shapes, torch.Tensor):
        if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
            raise ValueError(f"spatial_shapes must have shape [L, 2] (H, W per level), "
                             f"got {tuple(spatial_shapes.shape)}")
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(_side(height), _side(width)) for height, width in spatial_shapes]
    for level, (height, width) in enumerate(shapes):
        if height <= 0 or width <= 0:
            raise ValueError(f"spatial_shapes level {level} is ({height}, {width}); sizes must be positive")
    return shapes


def ms_deform_attn_core(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                        attention_weights: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample every level at the given locations and sum with the attention weights.

    Args:
        value: ``[B, S, h, d]`` per-head values, levels concatenated along ``S = sum_l H_l * W_l``, each level
            flattened row-major.
        spatial_shapes: ``[L, 2]`` int tensor or sequence of ``(H_l, W_l)`` (see the module docstring on syncs).
        sampling_locations: ``[B, Lq, h, L, P, 2]`` normalised ``(x, y)``; ``(0, 0)`` is the top-left corner of
            the map and pixel ``(i, j)`` has its centre at ``((j + 0.5) / W_l, (i + 0.5) / H_l)``. Neighbours
            outside the map contribute zero.
        attention_weights: ``[B, Lq, h, L, P]`` (normally softmax-normalised over ``L * P``).

    Returns:
        ``[B, Lq, h * d]`` with head-major channels (head ``j`` owns channels ``j*d .. j*d + d - 1``).

    The computation runs in the promoted dtype of ``value`` and ``sampling_locations`` (``grid_sample`` needs
    both in one dtype, and low-precision locations would misplace samples by up to a pixel on large maps).
    """
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = spatial_shapes_as_list(spatial_shapes)
    if len(shapes) != num_levels:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels but sampling_locations has {num_levels}")
    level_sizes = [height * width for height, width in shapes]
    if sum(level_sizes) != num_values:
        raise ValueError(f"value has S={num_values} positions but spatial_shapes {shapes} sum to {sum(level_sizes)}")

    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    # [B, S, h, d] -> [B, h, d, S] -> [B*h, d, S] (one copy), then per-level views [B*h, d, H_l, W_l]
    value_per_head = value.to(compute_dtype).permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, num_values)
    value_levels = value_per_head.split(level_sizes, dim=-1)
    # grid_sample's grid lives in [-1, 1]: [B, Lq, h, L, P, 2] -> [B, h, Lq, L, P, 2] -> [B*h, Lq, L, P, 2]
    grids = (2 * sampling_locations.to(compute_dtype) - 1).transpose(1, 2).flatten(0, 1)
    # [B, Lq, h, L, P] -> [B, h, Lq, L, P] -> [B*h, 1, Lq, L, P] (broadcast over the d channels)
    weights = attention_weights.to(compute_dtype).transpose(1, 2).reshape(
        batch * num_heads, 1, num_queries, num_levels, num_points)

    output = None
    for level, (height, width) in enumerate(shapes):
        level_value = value_levels[level].view(batch * num_heads, head_dim, height, width)
        samples = F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # [B*h, d, Lq, P]
        weighted = (samples * weights[..., level, :]).sum(-1)  # [B*h, d, Lq]
        output = weighted if output is None else output + weighted
    # [B*h, d, Lq] -> [B, h*d, Lq] -> [B, Lq, h*d]
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (spec §4.1, §4.4).

    Each query attends, per head, to ``n_points`` sampled positions on each of ``n_levels`` feature maps around
    its reference point (or inside its reference box). Submodule names and registration order are checkpoint
    keys: ``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``.

    Output-channel layouts: ``sampling_offsets`` index ``((j*L + l)*P + k)*2 + c`` (head ``j``, level ``l``,
    point ``k``, ``c`` in ``(x, y)``); ``attention_weights`` index ``(j*L + l)*P + k``.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if n_heads <= 0 or d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if n_levels <= 0 or n_points <= 0:
            raise ValueError(f"MSDeformAttn: n_levels ({n_levels}) and n_points ({n_points}) must be positive")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Spec §4.2 item 1: zero offset weights and a bias that points head ``j`` at compass direction
        ``theta_j = 2*pi*j / n_heads`` (scaled to the unit square's border), point ``k`` at ``k + 1`` times that,
        identically on every level; zero attention logits (uniform softmax); Xavier projections, zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # [h, 2]
        directions = directions / directions.abs().max(-1, keepdim=True).values
        point_scales = torch.arange(1, self.n_points + 1, dtype=torch.float32)  # [P]
        # [h, 1, 1, 2] * [1, 1, P, 1] -> [h, L, P, 2], flattened in the output-channel order of the layer
        bias = (directions[:, None, None, :] * point_scales[None, None, :, None]).expand(
            self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                input_spatial_shapes: SpatialShapes, input_level_start_index: Optional[torch.Tensor] = None,
                input_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attend from ``query`` to the flattened multi-scale ``input_flatten``.

        Args:
            query: ``[B, Lq, C]``.
            reference_points: ``[B, Lq, L, 2]`` normalised ``(x, y)`` points, or ``[B, Lq, L, 4]`` normalised
                ``(cx, cy, w, h)`` boxes, per level.
            input_flatten: ``[B, S, C]`` levels concatenated, each flattened row-major.
            input_spatial_shapes: ``[L, 2]`` int tensor or sequence of ``(H_l, W_l)``; a Python sequence
                avoids a host sync on accelerators.
            input_level_start_index: ``[L]`` level offsets into ``S``. Accepted for interface compatibility
                with the official op; it is implied by the spatial shapes (levels are contiguous) and unused.
            input_padding_mask: ``[B, S]`` bool, True at padded positions (their values are zeroed), or None.

        Returns:
            ``[B, Lq, C]``.
        """
        batch, num_queries, channels = query.shape
        _, num_values, _ = input_flatten.shape
        if input_flatten.shape[0] != batch:
            raise ValueError(f"query batch {batch} differs from input_flatten batch {input_flatten.shape[0]}")
        if channels != self.d_model or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"MSDeformAttn expects {self.d_model} channels, got query {tuple(query.shape)} "
                             f"and input_flatten {tuple(input_flatten.shape)}")
        if reference_points.dim() != 4 or reference_points.shape[:3] != (batch, num_queries, self.n_levels):
            raise ValueError(f"reference_points must be [B={batch}, Lq={num_queries}, L={self.n_levels}, 2 or 4], "
                             f"got {tuple(reference_points.shape)}")
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points last dimension must be 2 (points) or 4 (boxes), "
                             f"got {reference_points.shape[-1]}")
        if input_padding_mask is not None and input_padding_mask.shape != (batch, num_values):
            raise ValueError(f"input_padding_mask must be [B={batch}, S={num_values}], "
                             f"got {tuple(input_padding_mask.shape)}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)  # [B, S, h, d]

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2)  # [B, Lq, h, L, P, 2]
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)

        if reference_points.shape[-1] == 2:
            level_sizes_xy = self._level_sizes_xy(input_spatial_shapes, reference_points, offsets.dtype)  # [L, 2]
            # [B, Lq, 1, L, 1, 2] + [B, Lq, h, L, P, 2] / [1, 1, 1, L, 1, 2]
            sampling_locations = (reference_points[:, :, None, :, None, :]
                                  + offsets / level_sizes_xy[None, None, None, :, None, :])
        else:
            # box references: [B, Lq, 1, L, 1, 2] + [B, Lq, h, L, P, 2] / P * [B, Lq, 1, L, 1, 2] (w, h) / 2
            sampling_locations = (reference_points[:, :, None, :, None, :2]
                                  + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)

        output = ms_deform_attn_core(value, input_spatial_shapes, sampling_locations, weights)  # [B, Lq, C]
        return self.output_proj(output)

    @staticmethod
    def _level_sizes_xy(spatial_shapes: SpatialShapes, reference_points: torch.Tensor,
                        offsets_dtype: torch.dtype) -> torch.Tensor:
        """``(W_l, H_l)`` per level ``[L, 2]`` on the reference points' device, without a host sync.

        Kept in the promoted dtype of offsets and references so that large sizes stay exact under bfloat16.
        """
        dtype = torch.promote_types(offsets_dtype, reference_points.dtype)
        if isinstance(spatial_shapes, torch.Tensor):
            return spatial_shapes.to(device=reference_points.device, dtype=dtype, non_blocking=True).flip(-1)
        sizes_xy = torch.tensor([[width, height] for height, width in spatial_shapes], dtype=dtype)
        return sizes_xy.to(reference_points.device, non_blocking=True)
