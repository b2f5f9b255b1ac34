"""--checkpoint_encoder / --checkpoint_decoder / --checkpoint_backbone recompute activations in the backward
pass: the loss and every gradient stay what they are without checkpointing."""
import pytest
import torch

from engine import weighted_loss
from models import build_model
from tests.model_utils import random_images, random_targets, tiny_args

MODELS = ["dn_dab_detr", "dn_dab_deformable_detr", "dn_dab_deformable_detr_deformable_encoder_only"]


def loss_and_gradients(modelname, *flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(modelname, "--use_dn", "--label_noise_scale", "0",
                                                "--box_noise_scale", "0.4", *flags))
    generator = torch.Generator().manual_seed(1)
    images, targets = random_images([(64, 80), (72, 64)], generator), random_targets([3, 1], generator=generator)
    calls = []
    for module in (model.transformer.encoder.layers[0], model.transformer.decoder.layers[0],
                   model.backbone[0].body.layer2):
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    torch.manual_seed(2)  # the same box noise in both runs
    model.train()
    loss = weighted_loss(criterion(model(images, targets), targets), criterion.weight_dict)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


@pytest.mark.parametrize("modelname", MODELS)
def test_checkpointed_layers_give_the_same_loss_and_gradients(modelname):
    loss, grads, calls = loss_and_gradients(modelname)
    checkpointed_loss, checkpointed_grads, recomputed_calls = loss_and_gradients(
        modelname, "--checkpoint_encoder", "--checkpoint_decoder", "--checkpoint_backbone")
    # The first encoder and decoder layers and the backbone's layer2 run again in the backward pass.
    assert (calls, recomputed_calls) == (3, 6)
    assert torch.equal(loss, checkpointed_loss)
    assert set(grads) == set(checkpointed_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-7, msg=name)


def test_backbone_checkpointing_refuses_batch_norm_with_running_statistics():
    with pytest.raises(ValueError, match="--checkpoint_backbone needs --batch_norm_type FrozenBatchNorm2d"):
        build_model(tiny_args("dn_dab_detr", "--checkpoint_backbone", "--batch_norm_type", "BatchNorm2d"))
