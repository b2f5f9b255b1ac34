"""Multi-scale deformable attention (MSDA) in pure PyTorch.

No compiled extension. Bilinear sampling of every level, head, query and point followed by the weighted sum
over levels and points is one sparse-times-dense product: each (batch, query, head) output row is a weighted
sum of ``L * P * 4`` value rows (the four bilinear neighbours of every sampling point), with the attention
weight times the bilinear weight as coefficient. The forward is a single ``F.embedding_bag`` over all levels,
heads and queries (gather and weighted sum fused: no ``[.., L * P, d]`` tensor of sampled values is built).
The backward computes the exact gradients of the same bilinear formula (zero padding, ``align_corners=False``:
``F.grid_sample``'s convention and the official CUDA kernel's) from one dot product per point and neighbour
(output gradient . value row) and the transposed product for the values; it keeps about 16 bytes per sampling
point (plus a zero-framed copy of the values) instead of the ``d`` sampled channels per point.

Runs on any device and in any floating dtype (float64 for gradcheck, float32, bfloat16/float16 or autocast).

Spatial shapes may be given either as an int64 tensor ``[L, 2]`` of ``(H_l, W_l)`` or as a Python sequence of
``(H_l, W_l)`` pairs. The layout of the gather needs the sizes as Python ints, so a tensor on an accelerator
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


# The gather reads its value rows from a "framed" table: every level's [B, H, W, h, d] values surrounded by one
# row and one column of zeros on each side, [B, H + 2, W + 2, h, d], flattened to rows of d channels and the
# levels stacked (rows ordered level, batch, framed y, framed x, head). A sampling point whose upper-left
# neighbour (x0, y0) lies in [-1, W - 1] x [-1, H - 1] has its four neighbours inside its frame, where those
# outside the map read zeros, so no neighbour needs a mask; they sit at the fixed row offsets 0, h, (W + 2) h
# and (W + 3) h from the upper-left one. A point further out touches no pixel of its map: it gets weight 0.


def _framed_table(value: torch.Tensor, shapes: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``value [B, S, h, d]`` -> the framed table ``[sum_l B * (H_l + 2) * (W_l + 2) * h, d]`` (see above)."""
    batch, _, num_heads, head_dim = value.shape
    channels = num_heads * head_dim
    table = value.new_empty(sum(batch * (h + 2) * (w + 2) * num_heads for h, w in shapes), head_dim)
    start, value_start = 0, 0
    for height, width in shapes:
        size = batch * (height + 2) * (width + 2) * num_heads
        block = table[start:start + size].view(batch, height + 2, width + 2, channels)
        for frame in (block[:, 0], block[:, -1], block[:, 1:-1, 0], block[:, 1:-1, -1]):
            frame.zero_()
        level = value[:, value_start:value_start + height * width].reshape(batch, height, width, channels)
        block[:, 1:-1, 1:-1].copy_(level)
        start, value_start = start + size, value_start + height * width
    return table


def _unframe(grad_table: torch.Tensor, shapes: Sequence[Tuple[int, int]], batch: int, num_heads: int
             ) -> torch.Tensor:
    """The inverse layout change of ``_framed_table`` for gradients: ``[rows, d]`` -> ``[B, S, h, d]`` (frame
    rows dropped)."""
    head_dim = grad_table.shape[1]
    channels = num_heads * head_dim
    grad_value = grad_table.new_empty(batch, sum(h * w for h, w in shapes), num_heads, head_dim)
    start, value_start = 0, 0
    for height, width in shapes:
        size = batch * (height + 2) * (width + 2) * num_heads
        block = grad_table[start:start + size].view(batch, height + 2, width + 2, channels)
        level = grad_value[:, value_start:value_start + height * width].view(batch, height, width, channels)
        level.copy_(block[:, 1:-1, 1:-1])
        start, value_start = start + size, value_start + height * width
    return grad_value


def _bilinear_corner_weights(fraction: torch.Tensor, weights: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Attention weight times bilinear weight of the neighbours (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1).

    ``fraction [..., 2]`` is ``(x - x0, y - y0)`` in pixels, ``weights [...]``; the four are stacked at ``dim``.
    """
    fx, fy = fraction.unbind(-1)
    top, bottom = weights * (1 - fy), weights * fy
    return torch.stack([top * (1 - fx), top * fx, bottom * (1 - fx), bottom * fx], dim)


# The op is registered as two opaque custom operators (forward and backward) with their autograd link, so that
# torch.compile calls them as they are instead of tracing into them: inductor would otherwise fuse the
# overlapping shifted additions of the backward into one enormous C++ kernel whose compilation takes many
# minutes. Shapes travel as a flat list [H_0, W_0, H_1, W_1, ...].


def _level_geometry(shapes: Sequence[Tuple[int, int]], batch: int, num_heads: int):
    """Per level: first table row, number of rows and the row offsets of the four neighbours."""
    level_rows = [batch * (h + 2) * (w + 2) * num_heads for h, w in shapes]
    level_starts = [sum(level_rows[:level]) for level in range(len(shapes))]
    neighbours = [(0, num_heads, (w + 2) * num_heads, (w + 3) * num_heads) for _, w in shapes]
    return level_starts, level_rows, neighbours


def _pairs(flat_shapes: Sequence[int]) -> List[Tuple[int, int]]:
    return [(int(flat_shapes[i]), int(flat_shapes[i + 1])) for i in range(0, len(flat_shapes), 2)]


@torch.library.custom_op("dn_detr::msda_gather", mutates_args=())
def _msda_gather(value: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
                 flat_shapes: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    """``out[b, q, j] = sum over (l, p, neighbour) of coefficient * table[row]``.

    The coefficient of a neighbour is the point's attention weight times the neighbour's bilinear weight.
    Returns the output ``[B, Lq, h * d]`` and what the backward needs: the framed table, and per sampling point
    the table row of its upper-left neighbour (int32), its fractional pixel position and its attention weight
    (zeroed for points that touch no pixel); the coefficients and the rows of the other neighbours are
    recomputed from these.
    """
    shapes = _pairs(flat_shapes)
    batch, _, num_heads, _ = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    device = value.device
    table = _framed_table(value, shapes)

    # Pixel coordinates (pixel (i, j) has its centre at normalised ((j + 0.5) / W, (i + 0.5) / H)), rounded
    # exactly as grid_sample's CPU kernel rounds them: x * W - 0.5 computed as ((2x - 1) + 1) * (W / 2) - 0.5.
    # Points exactly on a pixel centre or a map border then fall on the same side of the floor as there,
    # which decides the (one-sided) location gradient at those kinks of the bilinear interpolation.
    half_sizes = torch.tensor([[w / 2, h / 2] for h, w in shapes], dtype=sampling_locations.dtype, device=device)
    pixel = ((2 * sampling_locations - 1) + 1) * half_sizes[:, None, :] - 0.5  # [B, Lq, h, L, P, 2]
    corner = pixel.floor()
    fraction = pixel - corner
    # far-away, infinite and NaN points touch no pixel; the clamp keeps their corner representable
    corner = corner.nan_to_num(-2.0).clamp(-2, max(max(h, w) for h, w in shapes)).to(torch.int32)
    x0, y0 = corner.unbind(-1)  # [B, Lq, h, L, P]
    sizes = torch.tensor(shapes, dtype=torch.int32, device=device)  # [L, 2] (H, W)
    inside = (x0 >= -1) & (x0 < sizes[:, 1:]) & (y0 >= -1) & (y0 < sizes[:, :1])
    # A point that touches no pixel gets weight 0 and fraction 0 and is moved to the frame's upper-left
    # corner, a zero row: its coefficients, its output and all its gradients are then exactly 0.
    x0 = torch.where(inside, x0, -1)
    y0 = torch.where(inside, y0, -1)
    weights = torch.where(inside, attention_weights, 0)
    fraction = torch.where(inside[..., None], fraction, 0)
    # as with grid_sample, a NaN or infinite position makes the output NaN instead of silently zero
    weights = torch.where(pixel.isfinite().all(-1), weights, float("nan"))

    # row of the upper-left neighbour: level start + ((b * (H + 2) + y0 + 1) * (W + 2) + x0 + 1) * h + j
    level_starts, _, neighbours = _level_geometry(shapes, batch, num_heads)
    strides = torch.tensor([[start + (w + 3) * num_heads, (h + 2) * (w + 2) * num_heads, (w + 2) * num_heads]
                            for start, (h, w) in zip(level_starts, shapes)], dtype=torch.int32, device=device)
    batch_index = torch.arange(batch, dtype=torch.int32, device=device)[:, None, None, None, None]
    head_index = torch.arange(num_heads, dtype=torch.int32, device=device)[:, None, None]
    base = (strides[:, :1] + batch_index * strides[:, 1:2] + y0 * strides[:, 2:] + x0 * num_heads
            + head_index)  # [B, Lq, h, L, P] int32

    neighbour_offsets = torch.tensor(neighbours, dtype=torch.int32, device=device)  # [L, 4]
    rows = (base[..., None] + neighbour_offsets[:, None, :]).view(-1, num_levels * num_points * 4)
    coefficients = _bilinear_corner_weights(fraction, weights).to(table.dtype).view(rows.shape)
    output = F.embedding_bag(rows.long(), table, per_sample_weights=coefficients, mode="sum")  # [B*Lq*h, d]
    return output.view(batch, num_queries, -1), table, base, fraction, weights


@_msda_gather.register_fake
def _msda_gather_fake(value, sampling_locations, attention_weights, flat_shapes):
    shapes = _pairs(flat_shapes)
    batch, _, num_heads, head_dim = value.shape
    points = sampling_locations.shape[:-1]
    num_rows = sum(batch * (h + 2) * (w + 2) * num_heads for h, w in shapes)
    return (value.new_empty(batch, sampling_locations.shape[1], num_heads * head_dim),
            value.new_empty(num_rows, head_dim), sampling_locations.new_empty(points, dtype=torch.int32),
            sampling_locations.new_empty(sampling_locations.shape), sampling_locations.new_empty(points))


@torch.library.custom_op("dn_detr::msda_gather_backward", mutates_args=())
def _msda_gather_backward(grad_output: torch.Tensor, table: torch.Tensor, base: torch.Tensor,
                          fraction: torch.Tensor, weights: torch.Tensor, flat_shapes: List[int]
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``_msda_gather``'s output with respect to value, sampling locations and attention weights."""
    shapes = _pairs(flat_shapes)
    batch, _, num_heads, num_levels, num_points = base.shape
    num_rows, head_dim = table.shape
    device = base.device
    level_starts, level_rows, neighbours = _level_geometry(shapes, batch, num_heads)
    neighbour_offsets = torch.tensor(neighbours, dtype=torch.int32, device=device)  # [L, 4]
    # Gradients are computed and accumulated in the precision of the positions (float32 under autocast),
    # also when the values were gathered in a lower one.
    grad_rows = grad_output.reshape(-1, head_dim).to(fraction.dtype).contiguous()  # [B*Lq*h, d]

    # d output / d coefficient = grad_output row . table row, for every (point, neighbour)
    rows = (base[..., None] + neighbour_offsets[:, None, :]).view(-1)
    per_row = num_levels * num_points * 4
    row_starts = torch.arange(0, rows.numel(), per_row, dtype=torch.int32, device=device)
    row_of_entry = torch.arange(grad_rows.shape[0], dtype=torch.int32, device=device)
    row_of_entry = row_of_entry[:, None].expand(-1, per_row).reshape(-1)
    grad_coefficients = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_rows, table.to(fraction.dtype), rows, row_starts, row_of_entry, 0, -1)
    del rows, row_of_entry
    g00, g01, g10, g11 = grad_coefficients.view(*base.shape, 4).unbind(-1)
    fx, fy = fraction.unbind(-1)
    grad_weights = (1 - fy) * ((1 - fx) * g00 + fx * g01) + fy * ((1 - fx) * g10 + fx * g11)
    grad_fx = weights * ((1 - fy) * (g01 - g00) + fy * (g11 - g10))
    grad_fy = weights * ((1 - fx) * (g10 - g00) + fx * (g11 - g01))
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=fraction.dtype, device=device)
    grad_locations = torch.stack([grad_fx, grad_fy], -1) * sizes[:, None, :]

    grad_table = _transposed_gather(grad_rows, base, fraction, weights, neighbour_offsets, num_rows,
                                    list(zip(level_starts, level_rows, neighbours)))
    grad_value = _unframe(grad_table, shapes, batch, num_heads).to(table.dtype)
    return grad_value, grad_locations, grad_weights


@_msda_gather_backward.register_fake
def _msda_gather_backward_fake(grad_output, table, base, fraction, weights, flat_shapes):
    shapes = _pairs(flat_shapes)
    batch, _, num_heads = base.shape[:3]
    num_values = sum(h * w for h, w in shapes)
    return (table.new_empty(batch, num_values, num_heads, table.shape[1]), fraction.new_empty(fraction.shape),
            weights.new_empty(weights.shape))


def _msda_gather_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])
    ctx.flat_shapes = inputs[3]


def _msda_gather_autograd_backward(ctx, grad_output, *unused_grads):
    table, base, fraction, weights = ctx.saved_tensors
    grads = _msda_gather_backward(grad_output, table, base, fraction, weights, ctx.flat_shapes)
    return grads[0], grads[1], grads[2], None


_msda_gather.register_autograd(_msda_gather_autograd_backward, setup_context=_msda_gather_setup_context)


def _transposed_gather(grad_rows: torch.Tensor, base: torch.Tensor, fraction: torch.Tensor, weights: torch.Tensor,
                       neighbour_offsets: torch.Tensor, num_rows: int, levels) -> torch.Tensor:
    """Gradient of the table: every table row collects the output gradient rows times the coefficients it was
    read with, ``[num_rows, d]``. ``levels`` lists ``(first row, rows, neighbour row offsets)`` per level.

    With fewer sampling points than table rows (decoder cross-attention), each neighbour's contributions are
    added with one ``scatter_add_``. With more (encoder self-attention, where the ``[points, d]`` products would
    be large), the points are sorted by their upper-left row, which turns each neighbour's part into one
    ``embedding_bag`` over the sorted points (table row r collects the points whose upper-left row is r),
    shifted by the neighbour's offset within each level.
    """
    points_per_row = base.shape[-1] * base.shape[-2]
    num_points = base.numel()
    dtype = grad_rows.dtype
    if num_points <= num_rows:
        coefficients = _bilinear_corner_weights(fraction, weights, dim=0).to(dtype).view(4, -1)
        point_grad = grad_rows[:, None].expand(-1, points_per_row, -1).reshape(num_points, -1)  # [M, d]
        rows = (base[..., None] + neighbour_offsets[:, None, :]).view(-1, 4).long()
        grad_table = grad_rows.new_zeros(num_rows, grad_rows.shape[1])
        for neighbour in range(4):
            grad_table.scatter_add_(0, rows[:, neighbour, None].expand_as(point_grad),
                                    point_grad * coefficients[neighbour, :, None])
        return grad_table
    sorted_base, order = torch.sort(base.view(-1), stable=True)
    segment_starts = torch.searchsorted(sorted_base, torch.arange(num_rows, dtype=torch.int32,
                                                                  device=base.device))
    point_row = torch.div(order, points_per_row, rounding_mode="floor")
    coefficients = _bilinear_corner_weights(fraction.view(-1, 2).index_select(0, order),
                                            weights.view(-1).index_select(0, order), dim=0).to(dtype)  # [4, M]
    grad_table = grad_rows.new_zeros(num_rows, grad_rows.shape[1])
    for neighbour in range(4):
        collected = F.embedding_bag(point_row, grad_rows, segment_starts, mode="sum",
                                    per_sample_weights=coefficients[neighbour])  # [num_rows, d]
        for start, size, offsets in levels:
            offset = offsets[neighbour]
            grad_table[start + offset:start + size] += collected[start:start + size - offset]
    return grad_table


def grid_sample_msda(value: torch.Tensor, spatial_shapes: SpatialShapes, sampling_locations: torch.Tensor,
                     attention_weights: torch.Tensor) -> torch.Tensor:
    """Same arguments and result as :func:`ms_deform_attn_core`, computed level by level with ``F.grid_sample``
    (bilinear, zero padding, ``align_corners=False``): slower, but made of standard operators only (what an
    exported graph uses) and differentiable by autograd (a reference for the custom op's gradients)."""
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

    The computation runs in the promoted dtype of ``value`` and ``sampling_locations`` (low-precision
    locations would misplace samples by up to a pixel on large maps). Under autocast with a lower-precision
    dtype (bfloat16, float16), the gather and weighted sum run in that dtype and return it; positions,
    bilinear weights and gradients keep the promoted precision.
    """
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    shapes = spatial_shapes_as_list(spatial_shapes)
    if len(shapes) != num_levels:
        raise ValueError(f"spatial_shapes has {len(shapes)} levels but sampling_locations has {num_levels}")
    level_sizes = [height * width for height, width in shapes]
    if sum(level_sizes) != num_values:
        raise ValueError(f"value has S={num_values} positions but spatial_shapes {shapes} sum to {sum(level_sizes)}")

    if torch.compiler.is_exporting():
        # A graph exported for other runtimes (ONNX) samples with grid_sample, a standard operator, instead
        # of the custom op; the two compute the same bilinear sampling.
        return grid_sample_msda(value, shapes, sampling_locations, attention_weights)
    compute_dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    arguments = (sampling_locations.to(compute_dtype), attention_weights.to(compute_dtype),
                 [size for shape in shapes for size in shape])
    device_type = value.device.type
    if not torch.is_autocast_enabled(device_type):
        return _msda_gather(value.to(compute_dtype), *arguments)[0]
    # Under autocast with a lower precision, the values are gathered and summed in the autocast dtype (the
    # output has that dtype), while positions, bilinear weights and all gradients stay in compute_dtype.
    autocast_dtype = torch.get_autocast_dtype(device_type)
    gather_dtype = autocast_dtype if autocast_dtype.itemsize < compute_dtype.itemsize else compute_dtype
    with torch.autocast(device_type, enabled=False):
        return _msda_gather(value.to(gather_dtype), *arguments)[0]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

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
        """Zero offset weights and a bias that points head ``j`` at compass direction
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
