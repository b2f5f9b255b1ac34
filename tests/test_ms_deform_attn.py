"""Multi-scale deformable attention: the core against a naive loop reference and against the previous per-level
grid_sample formulation (values and gradients), gradcheck, low precision, and the module."""
import math

import pytest
import torch

from models.ops import MSDeformAttn, ms_deform_attn_core
from tests.msda_reference import grid_sample_msda

LEVEL_SHAPES = [(3, 5), (1, 4), (4, 1), (2, 3), (1, 1)]


def naive_bilinear(level_value: torch.Tensor, x: float, y: float, height: int, width: int) -> torch.Tensor:
    """Sample ``level_value [H*W, d]`` at normalised ``(x, y)``: pixel coordinates ``x*W - 0.5``, ``y*H - 0.5``;
    each of the 4 neighbours outside the map contributes zero."""
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    fx, fy = px - x0, py - y0
    sample = torch.zeros(level_value.shape[-1], dtype=level_value.dtype)
    for row, col, weight in ((y0, x0, (1 - fy) * (1 - fx)), (y0, x0 + 1, (1 - fy) * fx),
                             (y0 + 1, x0, fy * (1 - fx)), (y0 + 1, x0 + 1, fy * fx)):
        if 0 <= row < height and 0 <= col < width:
            sample += weight * level_value[row * width + col]
    return sample


def naive_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """Explicit loops over batch, query, head, level and point."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    starts = [0]
    for height, width in spatial_shapes:
        starts.append(starts[-1] + height * width)
    out = torch.zeros(batch, queries, heads, dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for j in range(heads):
                for lvl, (height, width) in enumerate(spatial_shapes):
                    level_value = value[b, starts[lvl]:starts[lvl + 1], j]
                    for k in range(points):
                        x, y = sampling_locations[b, q, j, lvl, k].tolist()
                        sample = naive_bilinear(level_value, x, y, height, width)
                        out[b, q, j] += attention_weights[b, q, j, lvl, k] * sample
    return out.reshape(batch, queries, heads * dim)


def random_inputs(batch, queries, heads, dim, shapes, points, generator, dtype=torch.float64):
    num_values = sum(h * w for h, w in shapes)
    value = torch.randn(batch, num_values, heads, dim, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator, dtype=dtype) * 1.6 - 0.3
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator, dtype=dtype)
    return value, locations, weights / weights.sum((-1, -2), keepdim=True)


def border_coordinates(size: int):
    """Normalised coordinates on the map border, pixel centres, pixel edges and just/far outside the map."""
    return [0.0, 1.0, 0.5 / size, (size - 0.5) / size, -0.5 / size, 1 + 0.5 / size, 1 / size, -1.0, 2.0,
            (size - 1) / size]


def with_border_points(locations: torch.Tensor, shapes, generator) -> torch.Tensor:
    """Replace about half of the sampling coordinates with border/edge cases of their level."""
    locations = locations.clone()
    for lvl, (height, width) in enumerate(shapes):
        for axis, size in ((0, width), (1, height)):
            special = torch.tensor(border_coordinates(size), dtype=locations.dtype)
            target = locations[..., lvl, :, axis]
            pick = torch.randint(len(special), target.shape, generator=generator)
            replace = torch.rand(target.shape, generator=generator) < 0.5
            locations[..., lvl, :, axis] = torch.where(replace, special[pick], target)
    return locations


def test_core_matches_naive_reference_including_borders_and_outside_points():
    generator = torch.Generator().manual_seed(0)
    value, locations, weights = random_inputs(2, 6, 2, 3, LEVEL_SHAPES, 3, generator)
    locations = with_border_points(locations, LEVEL_SHAPES, generator)
    assert (locations < 0).any() and (locations > 1).any() and (locations == 0).any() and (locations == 1).any()

    expected = naive_msda(value, LEVEL_SHAPES, locations, weights)
    actual = ms_deform_attn_core(value, torch.tensor(LEVEL_SHAPES), locations, weights)
    assert actual.shape == (2, 6, 6)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    assert expected.abs().sum() > 0


def test_core_accepts_python_shapes_and_tensor_shapes_alike():
    generator = torch.Generator().manual_seed(1)
    value, locations, weights = random_inputs(1, 4, 2, 2, LEVEL_SHAPES, 2, generator)
    from_list = ms_deform_attn_core(value, LEVEL_SHAPES, locations, weights)
    from_tensor = ms_deform_attn_core(value, torch.tensor(LEVEL_SHAPES, dtype=torch.int64), locations, weights)
    torch.testing.assert_close(from_list, from_tensor, rtol=0, atol=0)


def test_points_far_outside_every_map_give_zero():
    generator = torch.Generator().manual_seed(2)
    value, locations, weights = random_inputs(1, 3, 2, 2, LEVEL_SHAPES, 2, generator)
    outside = torch.where(locations < 0.5, locations - 2.0, locations + 2.0)
    assert ms_deform_attn_core(value, LEVEL_SHAPES, outside, weights).abs().max() == 0


def test_core_gradcheck_on_value_locations_and_weights():
    generator = torch.Generator().manual_seed(3)
    shapes = [(2, 3), (3, 1), (1, 2)]
    value, locations, weights = random_inputs(1, 2, 2, 2, shapes, 2, generator)
    assert uses_scatter_backward(1, 2, 2, shapes, 2)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_core(v, shapes, loc, w), inputs,
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


def test_batched_queries_equal_per_sample_and_per_query_calls():
    generator = torch.Generator().manual_seed(4)
    value, locations, weights = random_inputs(3, 5, 2, 3, LEVEL_SHAPES, 2, generator)
    batched = ms_deform_attn_core(value, LEVEL_SHAPES, locations, weights)
    for b in range(3):
        single = ms_deform_attn_core(value[b:b + 1], LEVEL_SHAPES, locations[b:b + 1], weights[b:b + 1])
        torch.testing.assert_close(batched[b:b + 1], single, rtol=1e-12, atol=1e-12)
        for q in range(5):
            one_query = ms_deform_attn_core(value[b:b + 1], LEVEL_SHAPES, locations[b:b + 1, q:q + 1],
                                            weights[b:b + 1, q:q + 1])
            torch.testing.assert_close(batched[b:b + 1, q:q + 1], one_query, rtol=1e-12, atol=1e-12)


def uses_scatter_backward(batch, queries, heads, shapes, points):
    """The value gradient is scattered when there are no more sampling points than rows of the framed value
    table (every level with a one-pixel zero border, per batch and head), else gathered over sorted points."""
    num_points = batch * queries * heads * len(shapes) * points
    return num_points <= batch * heads * sum((h + 2) * (w + 2) for h, w in shapes)


def assert_matches_grid_sample(value, shapes, locations, weights, generator, tolerance=1e-12, rtol=0.0):
    """Output and gradients (value, locations, weights) equal the per-level grid_sample formulation's."""
    inputs = [tensor.clone().requires_grad_(True) for tensor in (value, locations, weights)]
    reference_inputs = [tensor.clone().requires_grad_(True) for tensor in (value, locations, weights)]
    output = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
    expected = grid_sample_msda(reference_inputs[0], shapes, reference_inputs[1], reference_inputs[2])
    torch.testing.assert_close(output, expected, rtol=rtol, atol=tolerance)
    grad_output = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    output.backward(grad_output)
    expected.backward(grad_output)
    for name, actual, reference in zip(("value", "locations", "weights"), inputs, reference_inputs):
        torch.testing.assert_close(actual.grad, reference.grad, rtol=rtol, atol=tolerance, msg=name)
    assert all(tensor.grad.abs().sum() > 0 for tensor in inputs)


@pytest.mark.parametrize("queries", [2, 40])  # value gradient by scatter (few points) / over sorted points
def test_core_values_and_gradients_equal_grid_sample_formulation(queries):
    generator = torch.Generator().manual_seed(20)
    value, locations, weights = random_inputs(2, queries, 3, 4, LEVEL_SHAPES, 2, generator)
    assert uses_scatter_backward(2, queries, 3, LEVEL_SHAPES, 2) == (queries == 2)
    assert_matches_grid_sample(value, LEVEL_SHAPES, locations, weights, generator)


@pytest.mark.parametrize("queries", [2, 40])
def test_core_equals_grid_sample_on_borders_pixel_centres_and_outside(queries):
    """Points exactly on pixel centres and map borders are kinks of the bilinear interpolation: the one-sided
    location gradient there must be grid_sample's too (the pixel coordinate is rounded as grid_sample does)."""
    generator = torch.Generator().manual_seed(21)
    value, locations, weights = random_inputs(2, queries, 3, 4, LEVEL_SHAPES, 2, generator)
    locations = with_border_points(locations, LEVEL_SHAPES, generator)
    assert_matches_grid_sample(value, LEVEL_SHAPES, locations, weights, generator)


def test_core_equals_grid_sample_on_odd_sizes_single_pixels_and_large_maps():
    generator = torch.Generator().manual_seed(22)
    shapes = [(13, 17), (7, 9), (1, 1), (1, 6), (5, 1)]
    value, locations, weights = random_inputs(1, 30, 2, 3, shapes, 4, generator)
    assert_matches_grid_sample(value, shapes, locations, weights, generator)


def test_core_equals_grid_sample_in_float32():
    generator = torch.Generator().manual_seed(23)
    shapes = [(16, 20), (8, 10), (4, 5), (2, 3)]
    value, locations, weights = random_inputs(2, 50, 4, 8, shapes, 4, generator, dtype=torch.float32)
    # location gradients are scaled by the map size (up to 20 pixels per unit here): float32 rounding of ~1e-5
    assert_matches_grid_sample(value, shapes, locations, weights, generator, tolerance=1e-4, rtol=1e-5)


def test_non_finite_locations_give_nan_like_grid_sample_and_far_points_give_zero():
    value = torch.randn(1, 6, 1, 2, dtype=torch.float64)
    nan, inf = float("nan"), float("inf")
    locations = torch.tensor([[nan, 0.5], [inf, 0.2], [1e30, 0.4], [-1e30, 0.5]], dtype=torch.float64)
    locations = locations.view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    output = ms_deform_attn_core(value, [(2, 3)], locations, weights)
    expected = grid_sample_msda(value, [(2, 3)], locations, weights)
    assert output[0, :2].isnan().all() and expected[0, :2].isnan().all()
    assert output[0, 2:].eq(0).all() and expected[0, 2:].eq(0).all()


def test_core_gradcheck_with_the_sorted_points_value_gradient():
    generator = torch.Generator().manual_seed(24)
    shapes = [(1, 2), (2, 1)]
    value, locations, weights = random_inputs(1, 8, 1, 2, shapes, 2, generator)
    assert not uses_scatter_backward(1, 8, 1, shapes, 2)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(lambda v, loc, w: ms_deform_attn_core(v, shapes, loc, w), inputs,
                                    eps=1e-6, atol=1e-5, rtol=1e-4)


def test_core_under_bfloat16_autocast_gathers_in_bfloat16_within_a_few_ulps_of_float32():
    """Under bfloat16 autocast the values are gathered and summed in bfloat16 (positions and gradients stay in
    float32): output and gradients within 1% of the largest magnitude of the float32 op on the same inputs
    (bfloat16 keeps 8 significant bits: one rounding is up to 0.4%)."""
    generator = torch.Generator().manual_seed(26)
    shapes = [(24, 30), (12, 15), (6, 8), (3, 4)]
    value, locations, weights = random_inputs(2, 60, 4, 16, shapes, 4, generator, dtype=torch.float32)
    value = value.bfloat16().float()  # the values as a bfloat16 projection would produce them
    weights = torch.randn(weights.shape, generator=generator).flatten(-2).softmax(-1).view(weights.shape)
    grad_output = torch.randn(2, 60, 64, generator=generator)

    def run(autocast: bool):
        inputs = [tensor.clone().requires_grad_(True) for tensor in (value, locations, weights)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            output = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
        output.float().backward(grad_output)
        return output, [tensor.grad for tensor in inputs]

    full, full_grads = run(False)
    low, low_grads = run(True)
    assert full.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert all(grad.dtype == torch.float32 for grad in low_grads)
    for name, actual, expected in [("output", low, full)] + list(zip(("value", "locations", "weights"),
                                                                     low_grads, full_grads)):
        error = (actual.float() - expected).abs().max() / expected.abs().max()
        assert 0 < error < 1e-2, f"{name}: bfloat16 error {error:.2e} of the largest magnitude"


def test_core_rejects_inconsistent_shapes():
    generator = torch.Generator().manual_seed(5)
    value, locations, weights = random_inputs(1, 2, 2, 2, LEVEL_SHAPES, 2, generator)
    with pytest.raises(ValueError, match="sum to"):
        ms_deform_attn_core(value[:, 1:], LEVEL_SHAPES, locations, weights)
    with pytest.raises(ValueError, match="levels"):
        ms_deform_attn_core(value, LEVEL_SHAPES[:-1], locations, weights)


def test_core_mixed_low_precision_value_runs_in_location_precision():
    generator = torch.Generator().manual_seed(6)
    value, locations, weights = random_inputs(1, 4, 2, 4, LEVEL_SHAPES, 2, generator, dtype=torch.float32)
    mixed = ms_deform_attn_core(value.bfloat16(), LEVEL_SHAPES, locations, weights.bfloat16())
    assert mixed.dtype == torch.float32
    reference = ms_deform_attn_core(value.bfloat16().float(), LEVEL_SHAPES, locations, weights.bfloat16().float())
    torch.testing.assert_close(mixed, reference, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------- module

def compass_direction(head: int, heads: int):
    theta = 2 * math.pi * head / heads
    c, s = math.cos(theta), math.sin(theta)
    scale = max(abs(c), abs(s))
    return c / scale, s / scale


def small_module_inputs(module: MSDeformAttn, shapes, batch, queries, generator, dtype=torch.float64):
    num_values = sum(h * w for h, w in shapes)
    query = torch.randn(batch, queries, module.d_model, generator=generator, dtype=dtype)
    memory = torch.randn(batch, num_values, module.d_model, generator=generator, dtype=dtype)
    points = torch.rand(batch, queries, module.n_levels, 2, generator=generator, dtype=dtype)
    return query, memory, points


def level_start_index(shapes):
    sizes = torch.tensor([h * w for h, w in shapes])
    return torch.cumsum(sizes, 0) - sizes


def test_init_offsets_point_at_compass_directions_and_weights_are_uniform():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=4)
    assert list(dict(module.named_children())) == ["sampling_offsets", "attention_weights", "value_proj",
                                                    "output_proj"]
    assert module.sampling_offsets.weight.abs().max() == 0
    bias = module.sampling_offsets.bias.view(8, 3, 4, 2)  # layout ((j*L + l)*P + k)*2 + c
    for head in range(8):
        dx, dy = compass_direction(head, 8)
        for k in range(4):
            expected = torch.tensor([(k + 1) * dx, (k + 1) * dy]).expand(3, 2)
            torch.testing.assert_close(bias[head, :, k], expected, rtol=1e-6, atol=1e-6)  # float32 init
    assert module.attention_weights.weight.abs().max() == 0 and module.attention_weights.bias.abs().max() == 0
    assert module.value_proj.bias.abs().max() == 0 and module.output_proj.bias.abs().max() == 0
    bound = math.sqrt(6 / (16 + 16))  # Xavier-uniform
    assert module.value_proj.weight.abs().max() <= bound and module.value_proj.weight.std() > bound / 4


def test_init_forward_samples_compass_points_with_uniform_weights():
    """At init every query samples ``ref + (k+1) * d_j / (W_l, H_l)`` with weight ``1 / (L*P)``."""
    generator = torch.Generator().manual_seed(7)
    shapes = [(4, 6), (2, 3), (1, 2)]
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=2).double()
    query, memory, points = small_module_inputs(module, shapes, 2, 3, generator)
    output = module(query, points, memory, shapes, level_start_index(shapes), None)

    locations = torch.empty(2, 3, 8, 3, 2, 2, dtype=torch.float64)
    for head in range(8):
        dx, dy = compass_direction(head, 8)
        for lvl, (height, width) in enumerate(shapes):
            for k in range(2):
                locations[:, :, head, lvl, k, 0] = points[:, :, lvl, 0] + (k + 1) * dx / width
                locations[:, :, head, lvl, k, 1] = points[:, :, lvl, 1] + (k + 1) * dy / height
    uniform = torch.full((2, 3, 8, 3, 2), 1 / 6, dtype=torch.float64)
    value = module.value_proj(memory).view(2, -1, 8, 2)
    expected = module.output_proj(naive_msda(value, shapes, locations, uniform))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)  # the init bias is float32-rounded


def randomise(module: MSDeformAttn, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)
    return module


def test_trained_module_with_box_references_matches_spec_layout_and_formula():
    generator = torch.Generator().manual_seed(8)
    shapes = [(3, 4), (2, 2), (1, 3)]
    heads, levels, points = 2, 3, 2
    module = randomise(MSDeformAttn(d_model=8, n_levels=levels, n_heads=heads, n_points=points).double(), generator)
    query, memory, _ = small_module_inputs(module, shapes, 2, 3, generator)
    boxes = torch.rand(2, 3, levels, 4, generator=generator, dtype=torch.float64) * 0.6 + 0.2
    output = module(query, boxes, memory, shapes, level_start_index(shapes), None)

    raw_offsets = module.sampling_offsets(query)  # [B, Lq, h*L*P*2]
    raw_logits = module.attention_weights(query)  # [B, Lq, h*L*P]
    locations = torch.empty(2, 3, heads, levels, points, 2, dtype=torch.float64)
    weights = torch.empty(2, 3, heads, levels, points, dtype=torch.float64)
    for j in range(heads):
        head_logits = raw_logits[..., j * levels * points:(j + 1) * levels * points].softmax(-1)
        for lvl in range(levels):
            for k in range(points):
                weights[:, :, j, lvl, k] = head_logits[..., lvl * points + k]
                for c in range(2):
                    offset = raw_offsets[..., ((j * levels + lvl) * points + k) * 2 + c]
                    half_size = boxes[:, :, lvl, 2 + c] * 0.5
                    locations[:, :, j, lvl, k, c] = boxes[:, :, lvl, c] + offset / points * half_size
    value = module.value_proj(memory).view(2, -1, heads, 4)
    expected = module.output_proj(naive_msda(value, shapes, locations, weights))
    torch.testing.assert_close(output, expected, rtol=1e-7, atol=1e-9)


def test_point_and_box_references_agree_when_box_size_is_two_p_pixels():
    """``ref + off / (W, H)`` equals ``ref + off / P * wh / 2`` exactly when ``wh = 2P / (W, H)``."""
    generator = torch.Generator().manual_seed(9)
    shapes = [(5, 7), (3, 4), (1, 2), (2, 1)]
    module = randomise(MSDeformAttn(d_model=8, n_levels=4, n_heads=2, n_points=3).double(), generator)
    query, memory, points = small_module_inputs(module, shapes, 2, 4, generator)
    sizes_wh = torch.tensor([[2 * 3 / w, 2 * 3 / h] for h, w in shapes], dtype=torch.float64)
    boxes = torch.cat([points, sizes_wh.expand(2, 4, 4, 2)], -1)
    from_points = module(query, points, memory, shapes, level_start_index(shapes), None)
    from_boxes = module(query, boxes, memory, torch.tensor(shapes), level_start_index(shapes), None)
    torch.testing.assert_close(from_points, from_boxes, rtol=1e-10, atol=1e-12)
    from_points_tensor_shapes = module(query, points, memory, torch.tensor(shapes), level_start_index(shapes), None)
    torch.testing.assert_close(from_points_tensor_shapes, from_points, rtol=0, atol=0)
    wider_boxes = torch.cat([points, 2 * sizes_wh.expand(2, 4, 4, 2)], -1)
    assert not torch.allclose(from_points, module(query, wider_boxes, memory, shapes, None, None))


def test_padded_positions_contribute_nothing():
    generator = torch.Generator().manual_seed(10)
    shapes = [(4, 5), (2, 3)]
    module = randomise(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=4).double(), generator)
    query, memory, points = small_module_inputs(module, shapes, 2, 6, generator)
    padding = torch.rand(2, memory.shape[1], generator=generator) < 0.4
    output = module(query, points, memory, shapes, level_start_index(shapes), padding)

    perturbed = torch.where(padding[..., None], memory + 10 * torch.randn(memory.shape, generator=generator,
                                                                           dtype=memory.dtype), memory)
    torch.testing.assert_close(module(query, points, perturbed, shapes, None, padding), output, rtol=0, atol=1e-12)
    assert not torch.allclose(module(query, points, perturbed, shapes, None, None), output)
    unpadded_change = torch.where(padding[..., None], memory, memory + 1.0)
    assert not torch.allclose(module(query, points, unpadded_change, shapes, None, padding), output)


def test_module_gradients_reach_every_parameter_and_inputs():
    generator = torch.Generator().manual_seed(11)
    shapes = [(3, 3), (2, 2)]
    module = randomise(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double(), generator)
    query, memory, points = small_module_inputs(module, shapes, 1, 3, generator)
    query.requires_grad_(True)
    memory.requires_grad_(True)
    module(query, points, memory, shapes, None, None).square().sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and memory.grad.abs().sum() > 0


def test_module_runs_under_bfloat16_autocast_close_to_float32():
    generator = torch.Generator().manual_seed(12)
    shapes = [(6, 8), (3, 4)]
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    query, memory, points = small_module_inputs(module, shapes, 2, 5, generator, dtype=torch.float32)
    full = module(query, points, memory, shapes, None, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(query, points, memory, shapes, None, None)
    assert torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05)


def test_module_shape_errors_are_explicit():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    shapes = [(2, 2), (1, 3)]
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2)
    query, memory = torch.randn(1, 3, 8), torch.randn(1, 7, 8)
    with pytest.raises(ValueError, match="2 \\(points\\) or 4 \\(boxes\\)"):
        module(query, torch.rand(1, 3, 2, 3), memory, shapes, None, None)
    with pytest.raises(ValueError, match="reference_points must be"):
        module(query, torch.rand(1, 3, 3, 2), memory, shapes, None, None)
    with pytest.raises(ValueError, match="batch"):
        module(query, torch.rand(1, 3, 2, 2), memory.expand(2, -1, -1), shapes, None, None)
    with pytest.raises(ValueError, match="channels"):
        module(torch.randn(1, 3, 6), torch.rand(1, 3, 2, 2), memory, shapes, None, None)
    with pytest.raises(ValueError, match="input_padding_mask"):
        module(query, torch.rand(1, 3, 2, 2), memory, shapes, None, torch.zeros(1, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="sum to"):
        module(query, torch.rand(1, 3, 2, 2), memory[:, :6], shapes, None, None)


@pytest.mark.parametrize("reference_kind", ["points", "boxes"])
def test_module_with_padding_equals_the_grid_sample_formulation(monkeypatch, reference_kind):
    """The whole module (projections, padding mask, both kinds of references), values and every gradient."""
    import models.ops.ms_deform_attn as msda_module

    generator = torch.Generator().manual_seed(25)
    shapes = [(5, 7), (3, 4), (2, 2), (1, 1)]
    module = randomise(MSDeformAttn(d_model=8, n_levels=4, n_heads=2, n_points=3).double(), generator)
    query, memory, points = small_module_inputs(module, shapes, 2, 9, generator)
    references = points if reference_kind == "points" else torch.cat(
        [points, torch.rand(2, 9, 4, 2, generator=generator, dtype=torch.float64) * 0.5], -1)
    padding = torch.zeros(2, memory.shape[1], dtype=torch.bool)
    padding[1, 20:35] = True  # the right part of the first level of the second image, as after batching

    def run():
        module.zero_grad()
        inputs = [query.clone().requires_grad_(True), memory.clone().requires_grad_(True)]
        output = module(inputs[0], references, inputs[1], shapes, level_start_index(shapes), padding)
        output.backward(torch.ones_like(output))
        return [output] + [tensor.grad for tensor in inputs] + [p.grad.clone() for p in module.parameters()]

    current = run()
    monkeypatch.setattr(msda_module, "ms_deform_attn_core", grid_sample_msda)
    reference = run()
    for actual, expected in zip(current, reference):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_custom_op_registration_passes_opcheck():
    """Schema, fake (meta) implementation and autograd link of the op torch.compile sees."""
    from models.ops.ms_deform_attn import _msda_gather

    generator = torch.Generator().manual_seed(27)
    shapes = [(2, 3), (1, 2)]
    value, locations, weights = random_inputs(2, 5, 2, 3, shapes, 2, generator)
    arguments = (value.requires_grad_(True), locations.requires_grad_(True), weights.requires_grad_(True),
                 [2, 3, 1, 2])
    results = torch.library.opcheck(_msda_gather, arguments)
    assert set(results.values()) == {"SUCCESS"}, results
