"""Equivalence of the ``dn_dab_detr`` model, criterion and post-processor with the naive spec oracle.

The oracle (tests/spec_oracle.py) is a literal transcription of the spec written without reading models/.
Model and oracle share one randomised state dict.  All cases but one run the model in float64, where the
forward passes agree to ~1e-15; the criterion, matcher and post-processor compute in float32 whatever the
model dtype, so losses, gradients and detections are compared at float32 precision.  The float32 case uses
the default noise scales and also checks the DN noise random-number order of Appendix B.  Target boxes are
float32 everywhere (the project's interface; the matcher rejects float64 target boxes).
"""
import functools

import pytest
import torch

from engine import weighted_loss
from cli import get_args_parser
from tests import spec_oracle as oracle
from tests.oracle_utils import (assert_close, check_detections, check_dn_meta, check_eval_mode_losses, check_gradients,
                                check_noise_rng_order, check_outputs, run_against_oracle, tol)

TINY = ["--no_pretrained_backbone", "--backbone", "resnet18", "--hidden_dim", "64", "--dim_feedforward", "96",
        "--enc_layers", "2", "--dec_layers", "3", "--num_queries", "12", "--nheads", "4", "--num_classes", "11",
        "--num_select", "40"]
pytestmark = pytest.mark.usefixtures("single_thread")

NO_NOISE = ["--label_noise_scale", "0", "--box_noise_scale", "0"]

# name -> (flags, seed, GT count per image, image sizes (H, W))
CASES = {
    "dn_prelu_aux_emptyimage": (["--use_dn", "--scalar", "3"] + NO_NOISE, 0, [3, 0, 2],
                                [(70, 100), (100, 64), (96, 96)]),
    "dn_prelu_aux_seed1": (["--use_dn"] + NO_NOISE, 1, [1, 4], [(64, 64), (90, 120)]),
    "dn_relu_noaux_patterns2": (["--use_dn", "--scalar", "2", "--num_patterns", "2", "--transformer_activation",
                                 "relu", "--no_aux_loss"] + NO_NOISE, 2, [2, 0, 3],
                                [(80, 64), (64, 100), (50, 70)]),
    "dn_patterns1": (["--use_dn", "--scalar", "2", "--num_patterns", "1"] + NO_NOISE, 3, [2, 2],
                     [(64, 96), (96, 64)]),
    "dn_all_empty_batch": (["--use_dn", "--num_patterns", "2"] + NO_NOISE, 4, [0, 0], [(64, 80), (72, 64)]),
    "no_dn_patterns2": (["--num_patterns", "2"], 5, [2, 1], [(64, 100), (100, 64)]),
    "dn_prenorm_unequal_pe_temperatures": (["--use_dn", "--scalar", "2", "--pre_norm", "--pe_temperatureH", "10",
                                            "--pe_temperatureW", "30"] + NO_NOISE, 7, [1, 2],
                                           [(96, 64), (64, 96)]),
}
CORNER_BOX_CASE = "dn_prelu_aux_seed1"  # gets CORNER_BOX as an extra GT of image 1
F32_NOISE_CASE = (["--use_dn", "--scalar", "4"], 6, [3, 1, 2], [(70, 90), (96, 64), (64, 64)])

ALL = list(CASES) + ["f32_noise"]


@functools.lru_cache(maxsize=None)
def run_case(name):
    """Run model and oracle (eval forward, train forward, losses, backward, post-process) for one case."""
    flags, seed, counts, sizes = F32_NOISE_CASE if name == "f32_noise" else CASES[name]
    args = get_args_parser().parse_args(["-m", "dn_dab_detr"] + TINY + flags)
    return run_against_oracle(
        oracle, args, seed, counts, sizes, torch.float32 if name == "f32_noise" else torch.float64,
        oracle_postprocess=lambda out, sizes, cfg: oracle.oracle_postprocess(out, sizes, cfg.num_select),
        corner_box=name == CORNER_BOX_CASE, oracle_noise=name == "f32_noise")


@pytest.mark.parametrize("name", ALL)
def test_eval_outputs_match_oracle(name):
    r = run_case(name)
    assert r["m_eval"].get("dn_meta") is None, "eval forward must carry no DN meta (spec §2.3 step 9)"
    check_outputs(r["m_eval"], r["o_eval"], tol(r), "eval", "§2.3 step 9")


@pytest.mark.parametrize("name", ALL)
def test_postprocessed_detections_match_oracle(name):
    check_detections(run_case(name))


@pytest.mark.parametrize("name", ALL)
def test_training_outputs_match_oracle(name):
    r = run_case(name)
    check_outputs(r["m_train"], r["o_train"], tol(r), "train", "§2.3 step 9")


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
        assert not torch.as_tensor(m[key]).requires_grad, f"{key} must carry no gradient (spec §5.2 / §3.6)"
    weights = oracle.oracle_weight_dict(r["cfg"])
    assert dict(r["criterion"].weight_dict) == weights, "weight dict differs from spec §5.4"
    assert_close(weighted_loss(m, weights), oracle.oracle_total_loss(o, r["cfg"]), "weighted total",
                 tol(r, "loss"))


@pytest.mark.parametrize("name", ALL)
def test_eval_mode_criterion_matches_oracle(name):
    check_eval_mode_losses(run_case(name))


@pytest.mark.parametrize("name", [n for n in ALL if n != "no_dn_patterns2"])
def test_eval_mode_criterion_ignores_dn_predictions(name):
    """§3.6: DN losses only when the criterion is in training mode; otherwise constant zeros."""
    r = run_case(name)
    criterion = r["criterion"]
    criterion.eval()
    try:
        with torch.no_grad():
            losses = criterion(r["m_train"], r["targets"])
    finally:
        criterion.train()
    expected = oracle.oracle_losses(r["o_train"], r["targets"], r["cfg"], training=False)
    assert set(losses) == set(expected)
    for key in sorted(expected):
        assert_close(losses[key], expected[key], f"eval-mode criterion on training outputs: {key}", tol(r, "loss"))


GRAD_NAMES = ["refpoint_embed.weight", "label_enc.weight", "transformer.decoder.bbox_embed.layers.0.weight",
              "backbone.0.body.layer4.1.conv2.weight"]


@pytest.mark.parametrize("name", ALL)
def test_gradients_match_oracle(name):
    check_gradients(run_case(name), GRAD_NAMES)


def test_dn_noise_follows_appendix_b_rng_order():
    """Seeded default-noise forward: the model's noised labels/boxes equal the Appendix-B draws."""
    check_noise_rng_order(run_case("f32_noise"))
