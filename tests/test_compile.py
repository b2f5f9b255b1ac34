"""torch.compile (inductor, CPU) of the attention layers and of both tiny models: same numbers as eager.

Compiling a whole tiny model with its backward takes one to three minutes per model on a 2-core CPU (mostly
C++ compilation of the generated kernels): those tests are marked ``slow`` and run only with
``RUN_SLOW_TESTS=1`` in the environment. The attention test (about 15 s) runs by default.
"""
import json
import logging
import math

import pytest
import torch
import torch._dynamo
import torch._inductor.config as inductor_config

from cli import get_args_parser
from main import main
from models import build_model
from models.attention import MultiheadAttentionNoInProj
from tests.model_utils import random_images, random_targets, tiny_args, tiny_main_flags
from util.compile import compile_model, unwrap_compiled
from util.config import parse_args

MODELS = ["dn_dab_detr", "dn_dab_deformable_detr"]


def flat_tensors(tree, prefix=""):
    """``{path: tensor}`` of every tensor in nested dicts, lists, tuples and plain objects (e.g. dn_meta)."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif hasattr(tree, "__dict__"):
        items = vars(tree).items()
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(flat_tensors(value, f"{prefix}.{key}"))
    return found


def assert_trees_close(actual, expected, atol):
    actual, expected = flat_tensors(actual), flat_tensors(expected)
    assert set(actual) == set(expected)
    for path in expected:
        torch.testing.assert_close(actual[path], expected[path], rtol=0, atol=atol, msg=path)


def test_compiled_attention_with_masks_trains_like_eager():
    """Self-attention with an [L, L] mask and cross-attention with a [B, S] padding mask, forward and backward.

    Inductor used to rewrite this attention wrongly when the heads were split off the [L, B, E] layout
    directly (a shape error while compiling the training graph)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    attention = MultiheadAttentionNoInProj(32, 4)
    queries, keys = torch.randn(27, 2, 64), torch.randn(16, 2, 64)
    values, self_values = torch.randn(16, 2, 32), torch.randn(27, 2, 32)
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    blocked = torch.rand(27, 27) < 0.2
    blocked.fill_diagonal_(False)

    def step(module):
        inputs = [tensor.clone().requires_grad_(True) for tensor in (queries, keys, values, self_values)]
        cross = module(inputs[0], inputs[1], inputs[2], key_padding_mask=padding)
        self_attended = module(inputs[0], inputs[0], inputs[3], attn_mask=blocked)
        (cross.square().sum() + self_attended.square().sum()).backward()
        return [cross, self_attended] + [tensor.grad for tensor in inputs]

    expected = step(attention)
    actual = step(torch.compile(attention))
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("modelname", MODELS)
def test_compiled_model_outputs_losses_and_gradients_equal_eager(modelname):
    """A training forward with denoising, the losses and the backward of the compiled model against eager on
    one fixed batch. Inductor draws random numbers its own way unless ``fallback_random`` is set; with it the
    denoising noise is the same as in eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(modelname, "--use_dn"))
    model.train()
    criterion.train()
    generator = torch.Generator().manual_seed(0)
    targets = random_targets([3, 1], generator=generator)
    images = random_images([(96, 128), (128, 80)], generator=generator)

    def step(module):
        module.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        outputs = module(images, targets)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        total.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return outputs, losses, gradients

    eager_outputs, eager_losses, eager_gradients = step(model)
    with inductor_config.patch(fallback_random=True):
        compiled_outputs, compiled_losses, compiled_gradients = step(torch.compile(model))
    assert_trees_close(compiled_outputs, eager_outputs, atol=1e-4)
    assert_trees_close(compiled_losses, eager_losses, atol=1e-4)
    # Gradients: compiled kernels sum in another order; through the backbone's long reductions float32
    # rounding reaches a few 1e-4 of a gradient's norm. Gradients that are zero in exact arithmetic (biases
    # of the attention keys) differ by rounding noise only, hence the absolute floor.
    assert set(compiled_gradients) == set(eager_gradients)
    for name, gradient in eager_gradients.items():
        error = (compiled_gradients[name] - gradient).norm().item()
        assert error <= 2e-3 * gradient.norm().item() + 1e-6, f"{name}: |difference| {error:.2e}"


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_a_graph_that_fails_to_compile_runs_eagerly(monkeypatch, caplog):
    """--compile's fallback: the compiler error is reported and the model computes what it computes eagerly."""
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # restored after the test
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args("dn_dab_detr"))
    model.eval()
    images = random_images([(64, 80)], generator=torch.Generator().manual_seed(0))
    compiled = compile_model(model, logging.getLogger("test"), backend=failing_backend)
    assert unwrap_compiled(compiled) is model
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        outputs = compiled(images)
        expected = model(images)
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
    assert "this backend cannot compile anything" in caplog.text
    torch._dynamo.reset()


@pytest.mark.slow
def test_main_trains_and_evaluates_with_compile(synthetic_coco, tmp_path, monkeypatch):
    """main.py --compile: one epoch of a tiny model and its evaluation, compiled (minutes on a small CPU)."""
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)
    torch._dynamo.reset()
    out = tmp_path / "run"
    main(parse_args(get_args_parser(), tiny_main_flags(synthetic_coco, out, "--epochs", "1", "--compile")))
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert len(logged["test_coco_eval_bbox"]) == 12 and math.isfinite(logged["train_loss"])
    torch._dynamo.reset()
