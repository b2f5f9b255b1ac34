"""Self-tests of the DINO-variant spec oracle (tests/spec_oracle_dino.py) that need no model: the state-dict
layout it expects against the reference manifests and the spec's counts, the names it reads, output shapes,
the worked example of spec Appendix B, the group-count rule, the noise bands and draw order (§4.2, §8), the
opt-in per-image split (§10.1), look-forward-twice (values unchanged, gradients changed), the two-stage
gradient paths (§4.8), the proposal grid (§4.5) and agreement with the verified deformable oracle where the
spec says the variant is identical (eval without two-stage)."""
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from cli import get_args_parser
from tests import spec_oracle_deformable as deform
from tests import spec_oracle_dino as oracle
from tests.model_utils import TINY_FLAGS

pytestmark = pytest.mark.usefixtures("single_thread")

DATA = Path(__file__).parent / "data"
MODEL = "dn_dab_dino_deformable_detr"


def args_for(*flags, **new_flags):
    """Parsed ``main.py`` flags; what the parser does not know yet (the model name, the variant's new flags)
    is set as attributes, so the oracle can be configured before the model exists."""
    args = get_args_parser().parse_args(["--transformer_activation", "relu", *flags])
    args.modelname = MODEL
    for name, value in new_flags.items():
        setattr(args, name, value)
    return args


def reference_cfg(*flags, **new_flags):
    """The manifest's configuration (§0): --use_dn --contrastive --use_mqs --use_lft --two_stage, R50."""
    new = dict(contrastive=True, use_mqs=True, use_lft=True)
    new.update(new_flags)
    return oracle.config_from_args(args_for("--num_classes", "91", "--use_dn", "--two_stage", *flags, **new))


def tiny_cfg(*flags, two_stage=True, **overrides):
    new = {"contrastive": True, "num_results": 40}
    for key in list(overrides):
        if key in new or key == "cdn_split_per_image":
            new[key] = overrides.pop(key)
    cfg = oracle.config_from_args(args_for(*TINY_FLAGS, "--use_dn", *(["--two_stage"] if two_stage else []),
                                           *flags, **new))
    return replace(cfg, **overrides)


def manifest(name):
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape, _ = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(","))))
    return rows


def non_backbone(rows):
    return [r for r in rows if not r[0].startswith("backbone.")]


# ----------------------------------------------------------------------------------------------------------
# State-dict layout (§2, Appendix A)
# ----------------------------------------------------------------------------------------------------------

def test_expected_keys_equal_the_two_stage_manifest():
    expected = oracle.expected_state_dict_keys(reference_cfg())
    rows = manifest("dn_dab_dino_deformable_detr_r50.tsv")
    assert expected == non_backbone(rows)
    assert len(expected) == 371 and len(rows) == 636


def test_expected_keys_without_two_stage_equal_the_deformable_manifest():
    cfg = oracle.config_from_args(args_for("--num_classes", "91", "--use_dn", contrastive=True))
    assert oracle.expected_state_dict_keys(cfg) == non_backbone(manifest("dn_dab_deformable_detr_r50.tsv"))


def test_patterns_add_one_entry_after_label_enc_and_dec_layers_set_the_head_count():
    keys = oracle.expected_state_dict_keys(reference_cfg("--num_patterns", "3"))
    names = [k for k, _ in keys]
    assert len(keys) == 372
    assert names[names.index("label_enc.weight") + 1] == "patterns_embed.weight"
    assert keys[names.index("patterns_embed.weight")][1] == (3, 256)
    assert len(oracle.expected_state_dict_keys(reference_cfg("--dec_layers", "3"))) == 522 - 265
    with pytest.raises(ValueError, match="--num_patterns"):
        oracle.config_from_args(args_for("--num_classes", "91", "--use_dn", "--num_patterns", "3", contrastive=True))


def backbone_parameter_count(name):
    """Parameters (not FrozenBatchNorm2d buffers) of the ResNet trunk: the conv weights; and the frozen part
    (conv1 + layer1, M§1.9)."""
    resnet = torchvision.models.__dict__[name](weights=None, norm_layer=FrozenBatchNorm2d)
    params = {n: p.numel() for n, p in resnet.named_parameters() if not n.startswith("fc.")}
    frozen = sum(v for n, v in params.items() if n.startswith(("conv1", "layer1")))
    return sum(params.values()), frozen


@pytest.mark.parametrize("flags,two_stage,total", [
    ((), True, 47_650_557), ((), False, 47_429_154), (("--num_patterns", "3"), True, 47_651_325),
    (("--backbone", "resnet101"), True, 66_590_461), (("--dec_layers", "3"), True, 42_544_992)])
def test_parameter_counts_of_the_spec(flags, two_stage, total):
    """§0 / §2.3: counts of ``model.parameters()`` (shared heads once, FrozenBN buffers excluded)."""
    cfg = reference_cfg(*flags) if two_stage else oracle.config_from_args(args_for("--num_classes", "91", "--use_dn", *flags))
    dup = oracle.shared_duplicates(cfg)
    unique = sum(torch.Size(shape).numel() for name, shape in oracle.expected_state_dict_keys(cfg) if name not in dup)
    backbone, frozen = backbone_parameter_count(cfg.backbone)
    assert unique + backbone == total
    if not flags:
        assert frozen == 222_400
        assert unique + backbone - frozen == (47_428_157 if two_stage else 47_206_754)


# ----------------------------------------------------------------------------------------------------------
# A tiny parameter dict built from the expected names; the names the oracle reads
# ----------------------------------------------------------------------------------------------------------

class RecordingDict(dict):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def tiny_params(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = RecordingDict()
    dup = oracle.shared_duplicates(cfg)
    for name, shape in oracle.expected_state_dict_keys(cfg):
        if name in dup:
            continue
        if len(shape) >= 2:
            fan_in = torch.Size(shape[1:]).numel()
            value = torch.randn(shape, generator=g, dtype=torch.float64) * (0.6 / fan_in ** 0.5)
        elif name.endswith(".weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        else:
            value = 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)
        if name in ("label_enc.weight", "transformer.level_embed", "refpoint_embed.weight"):
            value = torch.randn(shape, generator=g, dtype=torch.float64)
        dict.__setitem__(params, name, value.requires_grad_(True))
    for top, owner in dup.items():
        dict.__setitem__(params, top, dict.__getitem__(params, owner).detach().clone().requires_grad_(True))
    resnet = torchvision.models.__dict__[cfg.backbone](weights=None, norm_layer=FrozenBatchNorm2d)
    for name, value in resnet.state_dict().items():
        if not name.startswith("fc."):
            dict.__setitem__(params, "backbone.0.body." + name, value.to(torch.float64))
    return params


def tiny_inputs(seed, counts, sizes, num_classes):
    g = torch.Generator().manual_seed(100 + seed)
    images = [torch.randn(3, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centre, size], dim=1)})
    return images, targets


SIZES = [(64, 80), (72, 64)]


@pytest.mark.parametrize("two_stage", [True, False])
def test_forward_reads_exactly_the_expected_names_and_has_the_expected_shapes(two_stage):
    cfg = tiny_cfg(two_stage=two_stage, scalar=2)
    params = tiny_params(cfg)
    images, targets = tiny_inputs(0, [2, 1], SIZES, cfg.num_classes)
    out = oracle.oracle_forward(params, cfg, images, targets, training=True)
    B, K, C, L = 2, cfg.num_queries, cfg.num_classes, cfg.dec_layers
    dn = out["dn"]
    assert (dn["group_size"], dn["num_groups"], dn["pad"]) == (4, 2, 8)
    assert out["pred_logits"].shape == (B, K, C) and out["pred_boxes"].shape == (B, K, 4)
    assert len(out["aux_outputs"]) == L - 1
    assert out["dn_pred_logits"].shape == (L, B, 8, C) and out["dn_pred_boxes"].shape == (L, B, 8, 4)
    assert out["init_reference"].shape == (B, 8 + K, 4)
    S = sum(h * w for h, w in out["spatial_shapes"])
    if two_stage:
        assert out["enc_outputs"]["pred_logits"].shape == (B, S, C)
        assert out["enc_outputs"]["pred_boxes"].shape == (B, S, 4)
        assert out["topk_indices"].shape == (B, K)
    else:
        assert "enc_outputs" not in out
    losses = oracle.oracle_losses(out, targets, cfg)
    enc_keys = {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"}
    # §5.4 at L = 3: 5 + 4·2 matching, 4 encoder (two-stage), 4 + 4·2 DN.
    assert len(losses) == (29 if two_stage else 25) and (enc_keys <= set(losses)) == two_stage
    oracle.oracle_total_loss(losses, cfg).backward()
    read = {k for k in params.read if not k.startswith("backbone.")}
    expected = {k for k, _ in oracle.expected_state_dict_keys(cfg)} - set(oracle.shared_duplicates(cfg))
    assert read == expected, (f"read but not expected: {sorted(read - expected)}; "
                              f"expected but unread: {sorted(expected - read)}")


def test_loss_and_weight_key_counts_at_the_reference_depth():
    """§5.4 / §5.5 at L = 6: 42 weights with aux (incl. the dead tgt_*_enc), 6 without; 39 weighted terms."""
    cfg = reference_cfg()
    weights = oracle.oracle_weight_dict(cfg)
    assert len(weights) == 42 and {"tgt_loss_ce_enc", "loss_giou_enc", "tgt_loss_bbox_4"} <= set(weights)
    assert len(oracle.oracle_weight_dict(replace(cfg, aux_loss=False))) == 6
    loss_keys = {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    for i in range(5):
        loss_keys |= {f"{k}_{i}" for k in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")}
    loss_keys |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc", "cardinality_error_enc"}
    for s in [""] + [f"_{i}" for i in range(5)]:
        loss_keys |= {k + s for k in ("tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou")}
    assert len(loss_keys) == 53 and len([k for k in loss_keys if k in weights]) == 39
    no_dn = oracle.oracle_weight_dict(replace(cfg, use_dn=False))
    assert len(no_dn) == 3 * 7 and not any(k.startswith("tgt_") for k in no_dn)


# ----------------------------------------------------------------------------------------------------------
# Contrastive DN construction (§4.2, Appendix B)
# ----------------------------------------------------------------------------------------------------------

def appendix_b_targets():
    return [{"labels": torch.tensor([89, 17]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
            {"labels": torch.tensor([47]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])}]


def test_worked_example_of_appendix_b():
    cfg = replace(reference_cfg(), scalar=3)
    dn = oracle.dn_entries(appendix_b_targets(), cfg)
    assert (dn["group_size"], dn["num_groups"], dn["pad"], dn["num_tgt"]) == (4, 3, 12, 9)
    group0 = dn["entries"][:6]
    # flat list [a, b, a', b', c, c']
    assert [(e["batch"], e["j_b"]) for e in group0] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert [e["label"] for e in group0] == [89, 17, 91, 91, 47, 91]
    assert [e["negative"] for e in group0] == [False, False, False, True, True, True]
    assert [e["row"] for e in dn["entries"]] == [g * 4 + j for g in range(3) for j in (0, 1, 2, 3, 0, 1)]
    labels, _ = oracle.oracle_dn_noise(appendix_b_targets(), replace(cfg, label_noise_scale=0.0, box_noise_scale=0.0))
    assert labels[:6].tolist() == [89, 17, 91, 91, 91, 91], "c is a positional negative: input label 91"
    fixed = oracle.dn_entries(appendix_b_targets(), replace(cfg, cdn_split_per_image=True))
    assert [e["negative"] for e in fixed["entries"][:6]] == [False, False, True, True, False, True]
    # Single image: the positional split is the intended one.
    single = oracle.dn_entries(appendix_b_targets()[:1], cfg)
    assert [e["negative"] for e in single["entries"][:4]] == [False, False, True, True]


@pytest.mark.parametrize("scalar,n_max,groups", [(5, 2, 5), (100, 5, 10), (100, 26, 1), (100, 3, 16), (150, 4, 18),
                                                 (5, 0, 1), (100, 0, 1)])
def test_group_count_rule(scalar, n_max, groups):
    assert oracle.dn_group_count(scalar, 2 * n_max) == groups


def test_dynamic_groups_layout():
    cfg = replace(reference_cfg(), scalar=100)
    targets = [{"labels": torch.arange(5), "boxes": torch.full((5, 4), 0.3)},
               {"labels": torch.arange(2), "boxes": torch.full((2, 4), 0.4)}]
    dn = oracle.dn_entries(targets, cfg)
    assert (dn["group_size"], dn["num_groups"], dn["pad"]) == (10, 10, 100)
    assert len(dn["entries"]) == 10 * 14 and dn["num_tgt"] == 70
    empty = oracle.dn_entries([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2, cfg)
    assert (empty["pad"], empty["num_groups"], empty["entries"]) == (0, 1, [])


def corners(boxes):
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


@pytest.mark.parametrize("split_per_image", [False, True])
def test_noise_bands_labels_and_draw_order(split_per_image):
    cfg = replace(reference_cfg(), scalar=20, label_noise_scale=0.3, cdn_split_per_image=split_per_image)
    g = torch.Generator().manual_seed(3)
    targets = [{"labels": torch.randint(0, 91, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.4 + 0.3, torch.rand(n, 2, generator=g) * 0.2 + 0.1],
                                   dim=1)} for n in (3, 0, 4)]
    dn = oracle.dn_entries(targets, cfg)
    E = len(dn["entries"])
    torch.manual_seed(11)
    labels, boxes = oracle.oracle_dn_noise(targets, cfg)
    after = torch.get_rng_state()
    # §8 order, replayed by hand.
    torch.manual_seed(11)
    p = torch.rand(E)
    torch.randint(0, 91, (int((p < 0.3).sum()),))
    sign = torch.randint(0, 2, (E, 4), dtype=torch.float32)
    torch.rand(E, 4)
    assert torch.equal(torch.get_rng_state(), after), "the draws must be exactly those of §8"
    assert set(sign.unique().tolist()) == {0.0, 1.0}
    negative = torch.tensor([e["negative"] for e in dn["entries"]])
    assert bool((labels[negative] == 91).all()) and bool((labels[~negative] < 91).all()) == split_per_image
    clean = torch.stack([e["box"] for e in dn["entries"]])
    move = (corners(boxes) - corners(clean)).abs()
    half = clean[:, 2:].repeat(1, 2) / 2 * cfg.box_noise_scale  # λ·size/2 per corner
    eps = 1e-6
    unclamped = ((corners(boxes) > 0) & (corners(boxes) < 1))
    assert bool((move[~negative] <= half[~negative] + eps).all()), "positives move by < λ/2 of the size"
    assert bool(((move[negative] >= half[negative] - eps) | ~unclamped[negative]).all()), "negatives >= λ/2"
    assert bool((move[negative] <= 2 * half[negative] + eps).all()), "negatives move by < λ of the size"


def test_non_contrastive_path_draws_one_uniform_per_coordinate():
    cfg = replace(reference_cfg(), contrastive=False, scalar=4)
    targets = appendix_b_targets()
    dn = oracle.dn_entries(targets, cfg)
    assert (dn["group_size"], dn["pad"], dn["num_tgt"], len(dn["entries"])) == (2, 8, 12, 12)
    assert not any(e["negative"] for e in dn["entries"])
    torch.manual_seed(5)
    labels, boxes = oracle.oracle_dn_noise(targets, cfg)
    after = torch.get_rng_state()
    torch.manual_seed(5)
    p = torch.rand(12)
    torch.randint(0, 91, (int((p < cfg.label_noise_scale).sum()),))
    u = torch.rand(12, 4) * 2 - 1
    assert torch.equal(torch.get_rng_state(), after)
    clean = torch.stack([e["box"] for e in dn["entries"]])
    expected = corners(clean) + u * clean[:, 2:].repeat(1, 2) / 2 * cfg.box_noise_scale
    assert torch.allclose(corners(boxes), expected.clamp(0, 1), atol=1e-6)


def test_contrastive_without_box_noise_draws_no_box_noise():
    """§10.4: the official code crashes; here the split exists independently of the box-noise branch."""
    cfg = replace(reference_cfg(), box_noise_scale=0.0, label_noise_scale=0.0)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    labels, boxes = oracle.oracle_dn_noise(appendix_b_targets(), cfg)
    assert torch.equal(torch.get_rng_state(), before)
    dn = oracle.dn_entries(appendix_b_targets(), cfg)
    assert torch.equal(boxes, torch.stack([e["box"] for e in dn["entries"]]))
    assert labels.tolist() == [91 if e["negative"] else e["label"] for e in dn["entries"]]


# ----------------------------------------------------------------------------------------------------------
# Forward / gradient properties
# ----------------------------------------------------------------------------------------------------------

def run_oracle(cfg, counts=(2, 0, 1), sizes=((64, 80), (72, 64), (64, 64)), seed=0, noise_seed=1, params=None):
    params = params if params is not None else tiny_params(cfg, seed)
    images, targets = tiny_inputs(seed, list(counts), list(sizes), cfg.num_classes)
    torch.manual_seed(noise_seed)
    noised = oracle.oracle_dn_noise(targets, cfg)
    out = oracle.oracle_forward(params, cfg, images, targets, training=True, noised=noised)
    losses = oracle.oracle_losses(out, targets, cfg, dtype=torch.float64)
    return params, out, losses


def grads_of(params, scalar):
    names = [n for n, p in params.items() if isinstance(p, torch.Tensor) and p.requires_grad]
    grads = torch.autograd.grad(scalar, [dict.__getitem__(params, n) for n in names], allow_unused=True,
                                retain_graph=True)
    return {n: (torch.zeros_like(dict.__getitem__(params, n)) if g is None else g) for n, g in zip(names, grads)}


@pytest.mark.parametrize("two_stage", [True, False])
def test_look_forward_twice_changes_gradients_only(two_stage):
    cfg = tiny_cfg(two_stage=two_stage, scalar=2)
    params, on, losses_on = run_oracle(cfg)
    _, off, losses_off = run_oracle(replace(cfg, lft=False), params=params)
    for key in ("all_logits", "all_boxes"):
        for a, b in zip(on[key], off[key]):
            assert torch.equal(a, b)
    assert torch.equal(on["dn_pred_boxes"], off["dn_pred_boxes"])
    for key in losses_on:
        assert torch.equal(torch.as_tensor(losses_on[key]), torch.as_tensor(losses_off[key])), key
    g_on = grads_of(params, oracle.oracle_total_loss(losses_on, cfg))
    g_off = grads_of(params, oracle.oracle_total_loss(losses_off, cfg))
    L = cfg.dec_layers
    prev_head = f"transformer.decoder.bbox_embed.{L - 2}.layers.2.weight"
    assert not torch.allclose(g_on[prev_head], g_off[prev_head])
    # §4.8: the last layer's boxes reach bbox_embed[L−2] only with LFT.
    g_on = grads_of(params, on["pred_boxes"].sum())
    g_off = grads_of(params, off["pred_boxes"].sum())
    assert float(g_on[prev_head].abs().max()) > 0 and float(g_off[prev_head].abs().max()) == 0
    last = f"transformer.decoder.bbox_embed.{L - 1}.layers.2.weight"
    assert torch.allclose(g_on[last], g_off[last], rtol=0, atol=1e-12)


def test_two_stage_gradient_paths():
    """§4.8: the selection is detached: layer-0 boxes do not reach the encoder heads / enc_output; the
    ``_enc`` losses do."""
    cfg = tiny_cfg(scalar=2)
    params, out, losses = run_oracle(cfg)
    L = cfg.dec_layers
    enc_names = [f"transformer.decoder.bbox_embed.{L}.layers.0.weight", f"transformer.decoder.class_embed.{L}.weight",
                 "transformer.enc_output.weight", "transformer.enc_output_norm.weight"]
    g = grads_of(params, out["all_boxes"][0].sum() + out["all_logits"][-1].sum())
    for n in enc_names:
        assert float(g[n].abs().max()) == 0, n
    g = grads_of(params, losses["loss_bbox_enc"] + losses["loss_ce_enc"])
    for n in enc_names:
        assert float(g[n].abs().max()) > 0, n
    assert float(g["transformer.tgt_embed.weight"].abs().max()) == 0


def test_per_image_split_changes_the_losses():
    """§10.1: with two non-empty images the two splits differ, and so do the DN losses."""
    cfg = tiny_cfg(scalar=2)
    params, out, losses = run_oracle(cfg)
    _, fixed_out, fixed = run_oracle(replace(cfg, cdn_split_per_image=True), params=params)
    neg = [e["negative"] for e in out["dn"]["entries"]]
    fixed_neg = [e["negative"] for e in fixed_out["dn"]["entries"]]
    assert neg != fixed_neg and fixed_neg == [e["copy"] for e in fixed_out["dn"]["entries"]]
    assert not torch.allclose(losses["tgt_loss_bbox"], fixed["tgt_loss_bbox"])
    # Matching losses and outputs on the matching queries are affected only through the DN rows' inputs.
    assert out["pred_logits"].shape == fixed_out["pred_logits"].shape


def test_without_two_stage_equals_the_deformable_oracle_at_eval_and_without_dn():
    """§0: without --two_stage the variant's eval outputs equal dn_dab_deformable_detr's (same weights)."""
    cfg = tiny_cfg(two_stage=False, scalar=2)
    params = tiny_params(cfg)
    dcfg = deform.DeformableOracleConfig(**{k: v for k, v in vars(cfg).items()
                                            if k in deform.DeformableOracleConfig.__dataclass_fields__})
    images, targets = tiny_inputs(0, [2, 1], SIZES, cfg.num_classes)
    ours = oracle.oracle_forward(params, cfg, images)
    theirs = deform.oracle_forward(params, dcfg, images)
    for a, b in zip(ours["all_logits"] + ours["all_boxes"], theirs["all_logits"] + theirs["all_boxes"]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    ours = oracle.oracle_forward(params, replace(cfg, use_dn=False), images, targets, training=True)
    theirs = deform.oracle_forward(params, replace(dcfg, use_dn=False), images, targets, training=True)
    assert torch.allclose(ours["pred_boxes"], theirs["pred_boxes"], rtol=0, atol=1e-12)


def test_proposal_grid_validity_and_logits():
    """§4.5 steps 1-3 on hand-made level masks: grid normalised by valid counts, sizes 0.05·2^l, invalid when
    padded or outside (0.01, 0.99), logits +∞ there."""
    m0 = torch.zeros(2, 3, 60, dtype=torch.bool)
    m0[1, :, 40:] = True  # image 1: 40 valid columns
    m0[1, 2:, :] = True  # and 2 valid rows
    m1 = torch.zeros(2, 2, 2, dtype=torch.bool)
    m4 = torch.zeros(2, 1, 1, dtype=torch.bool)  # level index 2 here: size 0.2
    prop, valid, logits = oracle.encoder_proposals([m0, m1, m4])
    assert prop.dtype == torch.float32 and prop.shape == (2, 180 + 4 + 1, 4)
    # Image 0, level 0: VW = 60, so column 0 has cx = 0.5/60 < 0.01 (invalid), column 1 valid.
    assert not bool(valid[0, 0]) and bool(valid[0, 1])
    assert abs(float(prop[0, 1, 0]) - 1.5 / 60) < 1e-7 and abs(float(prop[0, 60, 1]) - 1.5 / 3) < 1e-7
    assert abs(float(prop[1, 1, 0]) - 1.5 / 40) < 1e-7 and abs(float(prop[1, 60, 1]) - 1.5 / 2) < 1e-7
    assert not bool(valid[1, 45]) and not bool(valid[1, 2 * 60 + 5]), "padded tokens are invalid"
    assert torch.allclose(prop[:, 180:184, 2], torch.full((2, 4), 0.1))
    assert torch.allclose(prop[:, 184, 3], torch.full((2,), 0.2))
    assert bool(torch.isinf(logits[~valid]).all()) and bool(torch.isfinite(logits[valid]).all())
    ok = valid[0, 1]
    assert ok and torch.allclose(logits[0, 1], torch.logit(prop[0, 1]))


def test_two_stage_needs_enough_tokens():
    cfg = tiny_cfg()
    params = tiny_params(cfg)
    images, _ = tiny_inputs(0, [0], [(16, 16)], cfg.num_classes)
    with pytest.raises(ValueError, match="num_queries"):
        oracle.oracle_forward(params, cfg, images)
