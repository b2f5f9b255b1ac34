"""Forward/backward of tiny models on CPU, with and without denoising, for every architecture."""
import re
from pathlib import Path

import pytest
import torch

from cli import get_args_parser
from models import build_model
from models.builder import adopt_state_dict_flags, flags_from_state_dict
from tests.model_utils import TINY_MODEL_FLAGS, random_images, random_targets, tiny_args

MODELS = ["dn_dab_detr", "dn_dab_deformable_detr", "dn_dab_deformable_detr_deformable_encoder_only",
          "dn_dab_dino_deformable_detr"]
SIZES = [(96, 128), (128, 80)]


def train_step(modelname, counts, *flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(modelname, *flags))
    model.train()
    criterion.train()
    targets = random_targets(counts)
    outputs = model(random_images(SIZES), targets)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    total.backward()
    return model, criterion, outputs, losses, total


@pytest.mark.parametrize("modelname", MODELS)
def test_dn_training_step_produces_all_losses_and_gradients(modelname):
    model, criterion, outputs, losses, total = train_step(modelname, [3, 1], "--use_dn")
    assert outputs["pred_logits"].shape == (2, 12, 11) and outputs["pred_boxes"].shape == (2, 12, 4)
    assert len(outputs["aux_outputs"]) == 2
    meta = outputs["dn_meta"]
    assert meta.pad_size == 5 * 3 and outputs["dn_outputs"].pred_logits.shape == (3, 2, 15, 11)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error",
                "tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou", "tgt_class_error"}
    for i in range(2):
        expected |= {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error",
                                          "tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou", "tgt_class_error")}
    assert expected <= set(losses)
    # The DINO-style variant weighs encoder-proposal losses (_enc) even when it has none, as the original.
    unused = {k for k in criterion.weight_dict if k.endswith("_enc")} if "dino" in modelname else set()
    assert set(criterion.weight_dict) - unused <= set(losses)
    assert torch.isfinite(total)
    assert losses["tgt_loss_bbox"] > 0
    # Denoising content reaches label_enc; the matching anchors and the box head train too.
    assert model.label_enc.weight.grad[:11].abs().sum() > 0
    assert model.refpoint_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "backbone" not in n)


@pytest.mark.parametrize("modelname", MODELS)
def test_baseline_training_has_no_denoising_terms(modelname):
    model, criterion, outputs, losses, total = train_step(modelname, [3, 1])
    assert "dn_meta" not in outputs
    assert not any(k.startswith("tgt_") for k in losses) and not any(k.startswith("tgt_") for k in criterion.weight_dict)
    assert torch.isfinite(total)


@pytest.mark.parametrize("modelname", MODELS)
def test_batch_without_objects_trains_with_zero_dn_losses(modelname):
    model, criterion, outputs, losses, total = train_step(modelname, [0, 0], "--use_dn")
    assert outputs["dn_meta"].pad_size == 0
    for key in ("tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou", "tgt_loss_ce_0"):
        assert losses[key].item() == 0
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_ce"].item() > 0  # every query is a focal negative
    assert torch.isfinite(total)


@pytest.mark.parametrize("modelname", MODELS)
def test_attention_mask_hides_the_denoising_queries_from_matching_unless_switched_off(modelname):
    """With the mask, the matching queries' outputs do not depend on the ground truth fed to the denoising
    queries; ``--no-dn_attn_mask`` (the paper's mask ablation) lets it leak into them."""
    images = random_images(SIZES, torch.Generator().manual_seed(1))
    first, second = (random_targets([3, 1], generator=torch.Generator().manual_seed(s)) for s in (2, 3))

    def matching_outputs(targets, *flags):
        torch.manual_seed(0)
        model, _, _ = build_model(tiny_args(modelname, "--use_dn", *flags))
        model.train()
        torch.manual_seed(4)  # the same noise draws for both target sets
        outputs = model(images, targets)
        return torch.cat([outputs["pred_logits"], outputs["pred_boxes"]], dim=-1)  # boxes alone: anchors at init

    assert torch.allclose(matching_outputs(first), matching_outputs(second), atol=1e-6)
    leaked = (matching_outputs(first, "--no-dn_attn_mask") - matching_outputs(second, "--no-dn_attn_mask")).abs()
    assert leaked.max() > 1e-4


@pytest.mark.parametrize("modelname", MODELS)
def test_inference_ignores_targets_and_dn(modelname):
    torch.manual_seed(0)
    model, criterion, postprocessors = build_model(tiny_args(modelname, "--use_dn"))
    model.eval()
    images = random_images(SIZES)
    with torch.no_grad():
        outputs = model(images)
        again = model(images, random_targets([2, 2]))
    assert "dn_meta" not in outputs
    assert torch.equal(outputs["pred_logits"], again["pred_logits"])
    results = postprocessors["bbox"](outputs, torch.tensor(SIZES))
    assert len(results) == 2 and results[0]["boxes"].shape[1] == 4
    assert (results[0]["boxes"][:, 2:] >= results[0]["boxes"][:, :2]).all()


@pytest.mark.parametrize("modelname", MODELS)
def test_dn_model_without_targets_in_training_is_a_clear_error(modelname):
    model, _, _ = build_model(tiny_args(modelname, "--use_dn"))
    model.train()
    with pytest.raises(ValueError, match="needs the targets"):
        model(random_images(SIZES))


def test_weights_move_between_dn_and_baseline_models():
    dn_model, _, _ = build_model(tiny_args("dn_dab_detr", "--use_dn"))
    baseline, _, _ = build_model(tiny_args("dn_dab_detr"))
    baseline.load_state_dict(dn_model.state_dict(), strict=True)
    dn_model.eval()
    baseline.eval()
    images = random_images(SIZES)
    with torch.no_grad():
        assert torch.equal(dn_model(images)["pred_boxes"], baseline(images)["pred_boxes"])


def test_patterns_multiply_the_matching_queries():
    _, _, outputs, losses, total = train_step("dn_dab_detr", [2, 1], "--use_dn", "--num_patterns", "2")
    assert outputs["pred_logits"].shape == (2, 24, 11)
    assert torch.isfinite(total)


def test_no_aux_loss_keeps_only_last_layer_keys():
    _, criterion, outputs, losses, _ = train_step("dn_dab_detr", [2, 1], "--use_dn", "--no_aux_loss")
    assert "aux_outputs" not in outputs
    assert not any(re.search(r"_\d$", k) for k in losses)
    assert not any(re.search(r"_\d$", k) for k in criterion.weight_dict)


def test_unsupported_flags_are_clear_errors():
    with pytest.raises(ValueError, match="--two_stage"):
        build_model(tiny_args("dn_dab_deformable_detr", "--two_stage"))
    with pytest.raises(ValueError, match="--num_patterns"):
        build_model(tiny_args("dn_dab_deformable_detr", "--num_patterns", "3"))
    with pytest.raises(ValueError, match="--num_feature_levels"):
        build_model(tiny_args("dn_dab_deformable_detr", "--num_feature_levels", "2"))
    with pytest.raises(ValueError, match="--dilation"):
        build_model(tiny_args("dn_dab_detr", "--dilation"))
    with pytest.raises(ValueError, match="--contrastive"):
        build_model(tiny_args("dn_dab_deformable_detr", "--use_dn", "--contrastive"))


def test_models_never_name_a_device():
    """Models follow the device of their inputs: no hard-coded CUDA anywhere in models/."""
    offending = [f"{path}:{i}" for path in Path(__file__).parents[1].joinpath("models").rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"\.cuda\(|[\"']cuda[\"']", line)]
    assert offending == []


def test_dino_two_stage_checkpoint_reveals_two_stage_and_its_patterns():
    """--eval --resume / inference.py of a two-stage DINO-style checkpoint without recorded args: --two_stage
    from transformer.enc_output.*, --num_patterns from the top-level patterns_embed."""
    model, _, _ = build_model(tiny_args("dn_dab_dino_deformable_detr", "--two_stage", "--num_patterns", "2"))
    flags = {flag: value for flag, (value, _) in flags_from_state_dict(model.state_dict()).items()}
    assert flags == {"num_classes": 11, "num_patterns": 2, "transformer_activation": "relu", "two_stage": True}
    parser = get_args_parser()
    args = parser.parse_args(["-m", "dn_dab_dino_deformable_detr", *TINY_MODEL_FLAGS])
    adopt_state_dict_flags(args, model.state_dict(), parser, "ckpt.pth")
    assert (args.num_classes, args.num_patterns, args.two_stage) == (11, 2, True)
    rebuilt, _, _ = build_model(args)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    plain, _, _ = build_model(tiny_args("dn_dab_dino_deformable_detr"))
    assert flags_from_state_dict(plain.state_dict())["two_stage"][0] is False
