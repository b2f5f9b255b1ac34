"""Equivalence of the ``dn_dab_deformable_detr_deformable_encoder_only`` model, criterion and post-processor with
the spec oracle.

The oracle (tests/spec_oracle_encoder_only.py) is a transcription of the encoder-only spec written without reading
``models/``; it reuses the verified pieces of the two other oracles (MSDA encoder with explicit bilinear gathers,
DAB decoder loop, DN, criterion). Model and oracle share one randomised state dict. All cases but one run the
model in float64, where the forward passes agree to ~1e-15; the criterion, matcher and post-processor compute in
float32 whatever the model dtype, so losses, gradients and detections are compared at float32 precision. The
float32 case uses the default noise scales and the Appendix-B random-number order (spec §7) and is held to 1e-4.
Batches mix image sizes, so padding, per-level masks (extra level from the full image mask) and valid ratios
matter.

The two discriminating checks of spec §13 (items 3 and 4) run the oracle with the wrong readings — level weights
from the post-self-attention state, flavour-B image PE — and require the model to *disagree* with them by a large
margin, so these tests would catch either implementation mistake.

The first section checks the oracle itself (state-dict layout against the reference manifest, shapes, gradient
paths, power of the discriminating switches) and needs no model.
"""
import functools
from math import prod
from pathlib import Path

import pytest
import torch

from engine import weighted_loss
from cli import get_args_parser
from models import build_model
from tests import spec_oracle, spec_oracle_encoder_only as oracle
from tests.oracle_utils import (assert_close, check_detections, check_dn_meta, check_eval_mode_losses,
                                check_gradients, check_noise_rng_order, check_outputs, make_inputs, oracle_params,
                                randomise_parameters, run_against_oracle, tol)

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = "dn_dab_deformable_detr_deformable_encoder_only"
MANIFEST = Path(__file__).parent / "data" / "dn_dab_deformable_detr_encoder_only_r50.tsv"
TINY = ["--no_pretrained_backbone", "--backbone", "resnet18", "--hidden_dim", "64", "--dim_feedforward", "96",
        "--enc_layers", "2", "--dec_layers", "3", "--nheads", "4", "--num_queries", "12", "--num_classes", "11",
        "--num_select", "40"]
NO_NOISE = ["--label_noise_scale", "0", "--box_noise_scale", "0"]
RELU = ["--transformer_activation", "relu"]
PRELU = ["--transformer_activation", "prelu"]
# The project's criterion computes in float32 whatever the model dtype (see test_spec_equivalence_deformable.py).
LOSS_DTYPE = torch.float32

# name -> (flags, seed, GT count per image, image sizes (H, W))
CASES = {
    # The README configuration (3 patterns, ReLU) with an image without GT (padding DN slots); image 0's half
    # height makes the extra level's mask from the full image mask differ from one resized from the C5 mask.
    "dn_relu_patterns3_aux_empty_image": (["--use_dn", "--scalar", "3", "--num_patterns", "3"] + RELU + NO_NOISE,
                                          0, [3, 0, 2], [(48, 120), (96, 64), (96, 96)]),
    # PReLU in encoder and decoder; --focal_alpha reaches matcher and losses; --cls_loss_coef 2 must not reach
    # tgt_loss_ce's weight (fixed 1.0, §6.2); --num_select 25 reaches the post-processor; image 1 gets a corner
    # GT whose DN anchor saturates the clamped inverse sigmoid.
    "dn_prelu_noaux_alpha_cls_coef_corner_box": (["--use_dn", "--scalar", "2", "--no_aux_loss", "--focal_alpha",
                                                  "0.3", "--cls_loss_coef", "2", "--num_select", "25"]
                                                 + PRELU + NO_NOISE, 1, [1, 4], [(64, 64), (90, 120)]),
    "dn_all_empty_batch_patterns2": (["--use_dn", "--num_patterns", "2"] + RELU + NO_NOISE, 4, [0, 0],
                                     [(64, 80), (72, 64)]),
    # --use_dn off is supported as for the other models (§9.1): no DN rows, no tgt_* losses or weights.
    "no_dn_patterns2_prelu": (["--num_patterns", "2"] + PRELU, 5, [2, 1], [(64, 100), (100, 64)]),
    # Three levels (no extra level, lvl_attn 256→3), three encoder points, unequal flavour-A temperatures.
    "dn_three_levels_pe_temperatures": (["--use_dn", "--scalar", "2", "--num_feature_levels", "3", "--enc_n_points",
                                         "3", "--pe_temperatureH", "10", "--pe_temperatureW", "30"]
                                        + PRELU + NO_NOISE, 7, [1, 2], [(96, 64), (64, 96)]),
}
CORNER_BOX_CASE = "dn_prelu_noaux_alpha_cls_coef_corner_box"
F32_NOISE_CASE = (["--use_dn", "--scalar", "4", "--num_patterns", "3"] + RELU, 6, [3, 1, 2],
                  [(70, 90), (96, 64), (64, 64)])
ALL = list(CASES) + ["f32_noise"]
# torchvision ResNet halves with ceil: C3 = ceil(H/8), ...; the extra level halves C5 again with ceil.
EXPECTED_LEVELS = {"dn_relu_patterns3_aux_empty_image": [(12, 15), (6, 8), (3, 4), (2, 2)],
                   "dn_three_levels_pe_temperatures": [(12, 12), (6, 6), (3, 3)]}
# The wrong readings of §13 items 3 / 4 must move some logit or box by more than this (the spec says O(1)).
DISCRIMINATION_MARGIN = 0.1


def parse(*flags):
    try:
        return get_args_parser().parse_args(list(flags))
    except SystemExit as e:  # argparse: unknown choice for -m until the model is registered
        raise AssertionError(f"main.py does not accept {' '.join(flags)}") from e


def tiny_args(*flags):
    return parse("-m", MODEL, *TINY, *flags)


def oracle_cfg(*flags, **overrides):
    """An oracle config from the project's flags without the model (the model name only selects the builder)."""
    return oracle.config_from_args(get_args_parser().parse_args(["-m", "dn_dab_detr", *flags]), **overrides)


# ----------------------------------------------------------------------------------------------------------
# The oracle on its own (no model needed)
# ----------------------------------------------------------------------------------------------------------

REFERENCE_FLAGS = ["--use_dn", "--transformer_activation", "relu", "--num_patterns", "3", "--num_classes", "91"]


def read_manifest():
    rows = []
    for line in MANIFEST.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")), dtype))
    return rows


def parameter_counts(rows):
    """(all, trainable) parameters of a state-dict layout: FrozenBN entries are buffers, the box head is shared,
    conv1 and layer1 are frozen (main spec §1.9)."""
    params = [(k, s) for k, s, _ in rows if not k.startswith("transformer.decoder.bbox_embed.")
              and not (k.startswith("backbone.") and (".bn" in k or ".downsample.1." in k))]
    frozen = [(k, s) for k, s in params if k.startswith(("backbone.0.body.conv1.", "backbone.0.body.layer1."))]
    total = sum(prod(s) for _, s in params)
    return total, total - sum(prod(s) for _, s in frozen)


def test_oracle_layout_is_the_reference_manifest():
    """The oracle reads exactly the 627 entries of the reference manifest (names, shapes, order), §2 / App. A."""
    rows = read_manifest()
    expected = oracle.expected_state_dict_rows(oracle_cfg(*REFERENCE_FLAGS))
    assert len(rows) == 627 and expected == rows
    assert len([r for r in rows if not r[0].startswith("backbone.")]) == 362
    assert parameter_counts(rows) == (48_488_589, 48_266_189)


@pytest.mark.parametrize("flags, entries, counts", [
    (["--num_patterns", "0"], 626, (48_487_821, 48_265_421)),
    (["--transformer_activation", "prelu"], 639, (48_488_601, 48_266_201)),
    (["--backbone", "resnet101"], 882, (67_428_493, 67_206_093)),
    (["--num_feature_levels", "3"], 623, None),
    (["--num_feature_levels", "1", "--num_patterns", "0"], 602, None),
    (["--num_feature_levels", "1"], 603, None),
])
def test_oracle_layout_of_other_configurations(flags, entries, counts):
    """§2.4: entry and parameter counts of the variants (later flags override the reference ones)."""
    rows = oracle.expected_state_dict_rows(oracle_cfg(*REFERENCE_FLAGS, *flags))
    assert len(rows) == entries
    if counts is not None:
        assert parameter_counts(rows) == counts
    names = [k for k, _, _ in rows]
    if "prelu" in flags:
        for i in range(6):
            enc, dec = f"transformer.encoder.layers.{i}.", f"transformer.decoder.layers.{i}."
            at = names.index(enc + "activation.weight")
            assert names[at - 1] == enc + "linear1.bias" and names[at + 1] == enc + "linear2.weight"
            assert names[names.index(dec + "activation.weight") - 1] == dec + "norm3.bias"


TINY_ORACLE_FLAGS = [*TINY, "--use_dn", "--scalar", "3", "--num_patterns", "3", *RELU, *NO_NOISE]


def tiny_oracle_run(seed=0):
    cfg = oracle_cfg(*TINY_ORACLE_FLAGS)
    params = oracle.random_params(cfg, seed)
    images, targets = make_inputs(seed, [3, 0, 2], [(48, 120), (96, 64), (96, 96)], cfg.num_classes, torch.float64)
    return cfg, params, images, targets


def test_oracle_runs_on_the_spec_layout_with_the_expected_shapes_and_gradient_paths():
    """Shapes of §4.4 and the gradient paths of §4.5 on a tiny random parameter dict."""
    cfg, params, images, targets = tiny_oracle_run()
    Qm, C = cfg.num_queries * cfg.num_patterns, cfg.num_classes
    with torch.no_grad():
        ev = oracle.oracle_forward(params, cfg, images)
    assert ev["pred_logits"].shape == (3, Qm, C) and ev["pred_boxes"].shape == (3, Qm, 4)
    assert len(ev["aux_outputs"]) == cfg.dec_layers - 1 and "dn_pred_logits" not in ev
    assert ev["spatial_shapes"] == EXPECTED_LEVELS["dn_relu_patterns3_aux_empty_image"]
    assert float(ev["valid_ratios"].min()) < 0.8
    assert len(ev["level_weights"]) == cfg.dec_layers
    for w in ev["level_weights"]:
        assert w.shape == (Qm, 3, 4) and torch.allclose(w.sum(-1), torch.ones((), dtype=w.dtype))
        assert float(w.std()) > 0.05, "level weights should not be uniform, or §13.3 has no power"

    tr = oracle.oracle_forward(params, cfg, images, targets, training=True)
    pad = cfg.scalar * 3
    assert tr["dn"]["pad"] == pad and tr["dn_pred_logits"].shape == (cfg.dec_layers, 3, pad, C)
    assert tr["pred_logits"].shape == (3, Qm, C)
    losses = oracle.oracle_losses(tr, targets, cfg, dtype=LOSS_DTYPE)
    assert len(losses) == 7 + 6 * (cfg.dec_layers - 1) + 4 * cfg.dec_layers  # 61 at 6 layers (§6.1)
    oracle.oracle_total_loss(losses, cfg).backward()
    for name in GRAD_NAMES:
        assert params[name].grad is not None and float(params[name].grad.abs().max()) > 0, name
    assert float(params["label_enc.weight"].grad[cfg.num_classes].abs().max()) > 0, "row 91 feeds every query"
    assert params["bbox_embed.layers.0.weight"].grad is None, "the heads are read under the decoder's name"


def max_output_difference(a, b):
    """Largest |difference| over every layer's logits and boxes."""
    return max(float((x - y).abs().max()) for key in ("all_logits", "all_boxes") for x, y in zip(a[key], b[key]))


@pytest.mark.parametrize("switch", [{"level_weight_source": "post_self_attention"}, {"pe_flavour": "B"}])
def test_oracle_wrong_readings_change_the_outputs(switch):
    """The switches of the discriminating tests move the oracle's outputs by a clear margin."""
    cfg, params, images, _ = tiny_oracle_run()
    wrong = oracle_cfg(*TINY_ORACLE_FLAGS, **switch)
    with torch.no_grad():
        diff = max_output_difference(oracle.oracle_forward(params, cfg, images),
                                     oracle.oracle_forward(params, wrong, images))
    assert diff > DISCRIMINATION_MARGIN, f"{switch}: the wrong reading moves the outputs by only {diff:.3g}"


def test_oracle_weight_dict():
    """§6.2: tgt_loss_ce fixed at 1.0; 36 entries at 6 layers with aux loss, 6 without; no tgt_* without DN."""
    cfg = oracle_cfg(*REFERENCE_FLAGS, "--cls_loss_coef", "2")
    weights = oracle.oracle_weight_dict(cfg)
    assert len(weights) == 36 and weights["loss_ce"] == 2 and weights["loss_ce_3"] == 2
    assert weights["tgt_loss_ce"] == 1.0 and weights["tgt_loss_ce_4"] == 1.0
    assert weights["tgt_loss_bbox_0"] == 5 and weights["tgt_loss_giou"] == 2
    assert list(oracle.oracle_weight_dict(oracle_cfg(*REFERENCE_FLAGS, "--no_aux_loss"))) == [
        "loss_ce", "loss_bbox", "loss_giou", "tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou"]
    assert not any(k.startswith("tgt_") for k in oracle.oracle_weight_dict(oracle_cfg("--num_classes", "91")))


# ----------------------------------------------------------------------------------------------------------
# Model against oracle
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def run_case(name):
    """Run model and oracle (eval forward, train forward, losses, backward, post-process) for one case."""
    flags, seed, counts, sizes = F32_NOISE_CASE if name == "f32_noise" else CASES[name]
    return run_against_oracle(
        oracle, tiny_args(*flags), seed, counts, sizes, torch.float32 if name == "f32_noise" else torch.float64,
        oracle_postprocess=lambda out, sizes, cfg: oracle.oracle_postprocess(out, sizes, cfg.num_select),
        loss_kwargs={"dtype": LOSS_DTYPE}, corner_box=name == CORNER_BOX_CASE, oracle_noise=name == "f32_noise")


def case_inputs(name, dtype):
    flags, seed, counts, sizes = F32_NOISE_CASE if name == "f32_noise" else CASES[name]
    return make_inputs(seed, counts, sizes, run_case(name)["cfg"].num_classes, dtype,
                       corner_box=name == CORNER_BOX_CASE)


def test_cases_exercise_padding_and_level_layouts():
    """The cases are only meaningful if padding gives valid ratios < 1 and the level counts are as intended."""
    for name, shapes in EXPECTED_LEVELS.items():
        assert run_case(name)["o_eval"]["spatial_shapes"] == shapes, name
    r = run_case("dn_relu_patterns3_aux_empty_image")
    assert float(r["o_eval"]["valid_ratios"].min()) < 0.8, "mixed image sizes should give valid ratios < 1"
    sizes = CASES["dn_relu_patterns3_aux_empty_image"][3]
    _, img_mask = spec_oracle.pad_images([torch.zeros(3, h, w) for h, w in sizes])
    c5_shape, extra_shape = r["o_eval"]["spatial_shapes"][2:4]
    from_image = oracle.deformable.resize_mask(img_mask, extra_shape)
    from_c5 = oracle.deformable.resize_mask(oracle.deformable.resize_mask(img_mask, c5_shape), extra_shape)
    assert not torch.equal(from_image, from_c5), "the extra level's mask source is not exercised"


@pytest.mark.parametrize("name", ALL)
def test_eval_outputs_match_oracle(name):
    r = run_case(name)
    assert r["m_eval"].get("dn_meta") is None, "eval forward must carry no DN meta (spec §4.4)"
    check_outputs(r["m_eval"], r["o_eval"], tol(r), "eval", "§4.4")  # every decoder layer via aux_outputs


@pytest.mark.parametrize("name", ALL)
def test_postprocessed_detections_match_oracle(name):
    r = run_case(name)
    check_detections(r, num_select=r["cfg"].num_select)


@pytest.mark.parametrize("name", ALL)
def test_training_outputs_match_oracle(name):
    r = run_case(name)
    check_outputs(r["m_train"], r["o_train"], tol(r), "train", "§4.4")


@pytest.mark.parametrize("name", ALL)
def test_dn_meta_matches_oracle(name):
    check_dn_meta(run_case(name))


@pytest.mark.parametrize("name", ALL)
def test_every_loss_term_and_total_match_oracle(name):
    r = run_case(name)
    m, o = r["m_losses"], r["o_losses"]
    assert set(m) == set(o), f"loss keys: extra {sorted(set(m) - set(o))}, missing {sorted(set(o) - set(m))}"
    for key in sorted(o):
        assert_close(m[key], o[key], f"loss {key}", tol(r, "loss"))
    logging_only = [k for k in m if k.startswith(("loss_xy", "loss_hw", "cardinality_error", "class_error",
                                                   "tgt_class_error"))]
    if r["o_train"]["dn"]["pad"] == 0:
        logging_only += [k for k in m if k.startswith("tgt_")]
    for key in logging_only:
        assert not torch.as_tensor(m[key]).requires_grad, f"{key} must carry no gradient (main spec §5.2 / §3.6)"
    weights = oracle.oracle_weight_dict(r["cfg"])
    assert dict(r["criterion"].weight_dict) == weights, "weight dict differs from spec §6.2"
    assert_close(weighted_loss(m, r["criterion"].weight_dict), oracle.oracle_total_loss(o, r["cfg"]),
                 "weighted total", tol(r, "loss"))


@pytest.mark.parametrize("name", ALL)
def test_eval_mode_criterion_matches_oracle(name):
    check_eval_mode_losses(run_case(name))


GRAD_NAMES = ["refpoint_embed.weight", "label_enc.weight", "transformer.level_embed", "transformer.patterns.weight",
              "transformer.encoder.layers.0.self_attn.sampling_offsets.weight",
              "transformer.encoder.layers.1.linear1.weight",
              "transformer.decoder.layers.0.ca_qpos_proj.weight", "transformer.decoder.layers.0.sa_qpos_proj.weight",
              "transformer.decoder.layers.1.lvl_attn.weight", "transformer.decoder.layers.2.ca_out_v_proj.bias",
              "transformer.decoder.layers.1.ca_kpos_proj.weight", "transformer.decoder.ref_anchor_head.layers.1.weight",
              "transformer.decoder.bbox_embed.layers.0.weight", "input_proj.3.0.weight",
              "backbone.0.body.layer2.0.conv1.weight", "backbone.0.body.layer4.1.conv2.weight"]


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_oracle(name):
    r = run_case(name)
    check_gradients(r, [n for n in GRAD_NAMES if n in r["o_grads"]])


@pytest.mark.parametrize("name", ALL)
def test_label_enc_row_91_is_always_in_the_graph(name):
    """§4.5: row C of label_enc is the content of every matching query (no null term needed)."""
    r = run_case(name)
    grad = r["m_grads"]["label_enc.weight"]
    C = r["cfg"].num_classes
    assert grad is not None and float(grad[C].abs().max()) > 0
    if r["o_train"]["dn"]["pad"] == 0:
        assert float(grad[:C].abs().max()) == 0.0, "without DN rows only row C is used"


def test_heads_are_shared_across_layers_and_with_the_decoder():
    """§2.1: one class head, one box head, the latter also registered as transformer.decoder.bbox_embed."""
    state = run_case("dn_relu_patterns3_aux_empty_image")["model"].state_dict()
    assert "class_embed.weight" in state and "class_embed.0.weight" not in state
    for name, tensor in state.items():
        if name.startswith("bbox_embed."):
            assert tensor.data_ptr() == state["transformer.decoder." + name].data_ptr(), f"{name} is not shared"


def test_dn_noise_follows_appendix_b_rng_order():
    """§7: a seeded default-noise forward gives the Appendix-B draws ..."""
    check_noise_rng_order(run_case("f32_noise"))


def test_noisy_training_forward_consumes_exactly_the_appendix_b_draws():
    """... and leaves the generator exactly where those three draws leave it (nothing else is drawn)."""
    r = run_case("f32_noise")
    images, targets = case_inputs("f32_noise", torch.float32)
    r["model"].train()
    torch.manual_seed(123)
    with torch.no_grad():
        r["model"](images, targets)
    after_model = torch.get_rng_state()
    torch.manual_seed(123)
    oracle.oracle_dn_noise(targets, r["cfg"])
    assert torch.equal(after_model, torch.get_rng_state()), "the forward draws more or other random numbers (§7)"


@pytest.mark.parametrize("name", ["dn_relu_patterns3_aux_empty_image", "dn_prelu_noaux_alpha_cls_coef_corner_box"])
def test_zero_noise_training_forward_leaves_the_rng_untouched(name):
    r = run_case(name)
    images, targets = case_inputs(name, torch.float64)
    r["model"].train()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with torch.no_grad():
        r["model"](images, targets)
    assert torch.equal(state, torch.get_rng_state()), "a training forward with both noise scales 0 drew numbers"


# ----------------------------------------------------------------------------------------------------------
# §13 items 3 and 4: the model disagrees with the wrong readings
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def discrimination_run():
    """The README configuration in tiny: model eval outputs and the oracle's under the spec and both wrong
    readings, on one randomised state dict."""
    args = tiny_args("--use_dn", "--num_patterns", "3", *RELU)
    seed, sizes = 11, [(64, 96), (96, 80)]
    torch.manual_seed(seed)
    model = build_model(args)[0]
    randomise_parameters(model, seed)
    model.to(torch.float64).eval()
    params = oracle_params(model, torch.float64)
    images, _ = make_inputs(seed, [1, 1], sizes, args.num_classes, torch.float64)
    with torch.no_grad():
        m = model(images)
        model_out = {"all_logits": [a["pred_logits"] for a in m["aux_outputs"]] + [m["pred_logits"]],
                     "all_boxes": [a["pred_boxes"] for a in m["aux_outputs"]] + [m["pred_boxes"]]}
        outputs = {}
        for label, switch in (("spec", {}), ("post_self_attention", {"level_weight_source": "post_self_attention"}),
                              ("flavour_b", {"pe_flavour": "B"})):
            outputs[label] = oracle.oracle_forward(params, oracle.config_from_args(args, **switch), images)
    return model_out, outputs


@pytest.mark.parametrize("wrong", ["post_self_attention", "flavour_b"])
def test_model_disagrees_with_the_wrong_reading(wrong):
    """§13.3 (level weights from q_sa, not from the post-self-attention state) and §13.4 (flavour-A PE): the
    model agrees with the spec oracle and differs from the wrong reading by far more than any tolerance."""
    model_out, outputs = discrimination_run()
    assert max_output_difference(model_out, outputs["spec"]) < 1e-7, "model and spec oracle disagree"
    diff = max_output_difference(model_out, outputs[wrong])
    assert diff > DISCRIMINATION_MARGIN, f"the model is as close to the {wrong} reading as to the spec ({diff:.3g})"
