"""The backbone's frozen batch norm and its channels-last mode change speed, never the float32 result."""
import json
import math

import pytest
import torch
from torchvision.ops import misc

from cli import get_args_parser
from engine import weighted_loss
from main import main
from models import build_model
from models.backbone import FrozenBatchNorm2d
from tests.model_utils import random_images, random_targets, tiny_args, tiny_main_flags
from util.config import parse_args


def frozen_norms():
    ours, torchvision_norm = FrozenBatchNorm2d(16), misc.FrozenBatchNorm2d(16)
    generator = torch.Generator().manual_seed(0)
    state = {"weight": torch.randn(16, generator=generator), "bias": torch.randn(16, generator=generator),
             "running_mean": torch.randn(16, generator=generator),
             "running_var": torch.rand(16, generator=generator) + 0.1}
    ours.load_state_dict(state)
    torchvision_norm.load_state_dict(state)
    return ours, torchvision_norm


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_frozen_batch_norm_equals_torchvisions_in_float32(memory_format):
    ours, torchvision_norm = frozen_norms()
    x = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=memory_format)
    assert torch.equal(ours(x), torchvision_norm(x))


def test_frozen_batch_norm_keeps_bfloat16_and_promotes_float16():
    ours, torchvision_norm = frozen_norms()
    x = torch.randn(2, 16, 7, 9, generator=torch.Generator().manual_seed(1))
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16  # torchvision's would be float32
    torch.testing.assert_close(out.float(), torchvision_norm(x.bfloat16()), rtol=1e-2, atol=2e-2)
    assert ours(x.half()).dtype == torch.float32 == torchvision_norm(x.half()).dtype


def test_frozen_batch_norm_loads_imagenet_style_state_dicts():
    ours, _ = frozen_norms()
    state = {**ours.state_dict(), "num_batches_tracked": torch.tensor(3)}
    FrozenBatchNorm2d(16).load_state_dict(state)  # the counter of trainable batch norm is dropped, as torchvision does


def loss_gradients_and_state(*flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("dn_dab_deformable_detr", "--use_dn", *flags))
    generator = torch.Generator().manual_seed(1)
    images, targets = random_images([(64, 80), (72, 64)], generator), random_targets([3, 1], generator=generator)
    torch.manual_seed(2)
    model.train()
    loss = weighted_loss(criterion(model(images, targets), targets), criterion.weight_dict)
    loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    return model, loss.detach(), grads


def test_channels_last_backbone_gives_the_same_loss_gradients_and_state_dict():
    model, loss, grads = loss_gradients_and_state()
    channels_last, channels_last_loss, channels_last_grads = loss_gradients_and_state("--channels_last")
    conv = channels_last.backbone[0].body.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(channels_last_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(channels_last_grads) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(channels_last_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Same keys and shapes: checkpoints move between the two layouts, strictly.
    model.load_state_dict(channels_last.state_dict(), strict=True)
    channels_last.load_state_dict(model.state_dict(), strict=True)
    assert conv.is_contiguous(memory_format=torch.channels_last)  # loading keeps the parameter's layout


def test_main_trains_with_every_speed_and_memory_flag(synthetic_coco, tmp_path):
    """One epoch of main.py with bfloat16 autocast, the channels-last backbone and checkpointing everywhere."""
    out = tmp_path / "run"
    main(parse_args(get_args_parser(), tiny_main_flags(
        synthetic_coco, out, "--epochs", "1", "--amp", "--channels_last", "--checkpoint_backbone",
        "--checkpoint_encoder", "--checkpoint_decoder")))
    logged = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(logged["train_loss"]) and len(logged["test_coco_eval_bbox"]) == 12
    saved_args = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert saved_args["channels_last"] and saved_args["checkpoint_backbone"]
