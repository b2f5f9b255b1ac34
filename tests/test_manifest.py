"""State dicts are identical to the official releases (names, shapes, dtypes, order), so they load strictly.

The manifests in tests/data/ were read off the original implementation (see REFERENCE_README.md).
"""
from pathlib import Path

import pytest
import torch

from cli import get_args_parser
from models import build_model
from util.checkpoint import CHECKPOINT_FLAGS
from util.config import parse_args

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def read_manifest(name):
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")), dtype))
    return rows


def model_rows(model):
    return [(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in model.state_dict().items()]


def build(*flags):
    args = get_args_parser().parse_args(list(flags) + ["--no_pretrained_backbone"])
    return build_model(args)[0]


def assert_loads_strictly(model, rows):
    """A state dict with exactly the manifest's keys and shapes loads with strict=True, value for value."""
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) for key, shape, _ in rows}
    # A shared head is one module under two names: an official checkpoint holds equal copies.
    for key in state:
        if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            state[key] = state[key[len("transformer.decoder."):]]
    model.load_state_dict(state, strict=True)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_dn_dab_detr_r50_matches_manifest_in_order():
    rows = read_manifest("dn_dab_detr_r50.tsv")
    model = build("-m", "dn_dab_detr", "--use_dn")
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 43_694_977
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 43_472_577
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 362  # the positional layout of the official optimizer state
    assert trainable[0] == "transformer.encoder.layers.0.self_attn.in_proj_weight"
    assert next(n for n in trainable if "backbone" in n) == "backbone.0.body.layer2.0.conv1.weight"
    assert_loads_strictly(model, rows)


def test_baseline_without_dn_has_the_same_state_dict():
    assert model_rows(build("-m", "dn_dab_detr")) == read_manifest("dn_dab_detr_r50.tsv")


def test_three_patterns_add_one_entry_after_the_decoder():
    rows = read_manifest("dn_dab_detr_r50.tsv")
    insert_at = [i for i, (key, _, _) in enumerate(rows) if key.startswith("transformer.decoder.")][-1] + 1
    expected = rows[:insert_at] + [("transformer.patterns.weight", (3, 256), "float32")] + rows[insert_at:]
    model = build("-m", "dn_dab_detr", "--use_dn", "--num_patterns", "3")
    assert model_rows(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 43_695_745


def test_dc5_changes_no_names_or_shapes():
    model = build("-m", "dn_dab_detr", "--use_dn", "--dilation")
    assert model_rows(model) == read_manifest("dn_dab_detr_r50.tsv")
    layer4 = model.backbone[0].body.layer4
    assert layer4[0].conv2.stride == (1, 1) and layer4[1].conv2.dilation == (2, 2)
    assert model.backbone.strides == [16]


def test_resnet101_adds_layer3_blocks_6_to_22():
    rows = read_manifest("dn_dab_detr_r50.tsv")
    model = build("-m", "dn_dab_detr", "--use_dn", "--backbone", "resnet101")
    got = model_rows(model)
    extra = [key for key, _, _ in got if key not in {k for k, _, _ in rows}]
    assert len(got) == 846 and len(extra) == 255
    assert {key.split(".")[4] for key in extra} == {str(i) for i in range(6, 23)}
    assert all(key.startswith("backbone.0.body.layer3.") for key in extra)
    assert sum(p.numel() for p in model.parameters()) == 62_634_881


def test_relu_drops_the_twelve_activation_slopes():
    rows = [r for r in read_manifest("dn_dab_detr_r50.tsv") if not r[0].endswith("activation.weight")]
    assert len(rows) == 579
    assert model_rows(build("-m", "dn_dab_detr", "--transformer_activation", "relu")) == rows


@pytest.mark.parametrize("use_dn", [True, False])
def test_dn_dab_deformable_detr_r50_matches_manifest_in_order(use_dn):
    rows = read_manifest("dn_dab_deformable_detr_r50.tsv")
    flags = ["-m", "dn_dab_deformable_detr", "--transformer_activation", "relu"] + (["--use_dn"] if use_dn else [])
    model = build(*flags)
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 47_429_154
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 47_206_754
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 346 and trainable[0] == "transformer.level_embed"
    assert_loads_strictly(model, rows)


ENCODER_ONLY = "dn_dab_deformable_detr_deformable_encoder_only"
ENCODER_ONLY_MANIFEST = "dn_dab_deformable_detr_encoder_only_r50.tsv"
# The model flags of the README's 48.6 AP row (encoder-only spec §1).
ENCODER_ONLY_REFERENCE = ["-m", ENCODER_ONLY, "--use_dn", "--transformer_activation", "relu", "--num_patterns", "3"]


def test_encoder_only_r50_matches_manifest_in_order():
    rows = read_manifest(ENCODER_ONLY_MANIFEST)
    assert len(rows) == 627
    model = build(*ENCODER_ONLY_REFERENCE)
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 48_488_589
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 48_266_189
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 398 and trainable[0] == "transformer.level_embed"  # official optimizer layout (§2.3)
    assert len([n for n in trainable if "backbone" not in n]) == 356
    assert next(n for n in trainable if "backbone" in n) == "backbone.0.body.layer2.0.conv1.weight"
    assert_loads_strictly(model, rows)


def test_encoder_only_without_dn_or_with_dc5_has_the_same_state_dict():
    rows = read_manifest(ENCODER_ONLY_MANIFEST)
    assert model_rows(build(*[f for f in ENCODER_ONLY_REFERENCE if f != "--use_dn"])) == rows
    assert model_rows(build(*ENCODER_ONLY_REFERENCE, "--dilation")) == rows


def test_encoder_only_without_patterns_drops_the_pattern_entry():
    rows = [r for r in read_manifest(ENCODER_ONLY_MANIFEST) if r[0] != "transformer.patterns.weight"]
    assert len(rows) == 626
    model = build("-m", ENCODER_ONLY, "--use_dn", "--transformer_activation", "relu")
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 48_487_821


def test_encoder_only_prelu_adds_twelve_activation_slopes():
    """The main.py default activation (prelu): one slope per encoder layer between linear1.bias and
    linear2.weight, one per decoder layer after norm3.bias (spec §2.4)."""
    expected = []
    for row in read_manifest(ENCODER_ONLY_MANIFEST):
        key = row[0]
        if key.startswith("transformer.encoder.layers.") and key.endswith(".linear2.weight"):
            expected.append((key.replace("linear2.weight", "activation.weight"), (1,), "float32"))
        expected.append(row)
        if key.startswith("transformer.decoder.layers.") and key.endswith(".norm3.bias"):
            expected.append((key.replace("norm3.bias", "activation.weight"), (1,), "float32"))
    assert len(expected) == 639
    model = build("-m", ENCODER_ONLY, "--use_dn", "--num_patterns", "3")
    assert model_rows(model) == expected
    assert sum(p.numel() for p in model.parameters()) == 48_488_601


def test_encoder_only_resnet101_adds_layer3_blocks_6_to_22():
    rows = read_manifest(ENCODER_ONLY_MANIFEST)
    model = build(*ENCODER_ONLY_REFERENCE, "--backbone", "resnet101")
    got = model_rows(model)
    extra = [key for key, _, _ in got if key not in {k for k, _, _ in rows}]
    assert len(got) == 882 and len(extra) == 255
    assert {key.split(".")[4] for key in extra} == {str(i) for i in range(6, 23)}
    assert all(key.startswith("backbone.0.body.layer3.") for key in extra)
    assert [r for r in got if r[0] not in extra] == rows
    assert sum(p.numel() for p in model.parameters()) == 67_428_493
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 67_206_093


DINO = "dn_dab_dino_deformable_detr"
# The manifest's flags (DN-DINO-VARIANT-SPEC.md §0): --use_mqs / --use_lft are accepted and implied.
DINO_REFERENCE = ["-m", DINO, "--use_dn", "--contrastive", "--use_mqs", "--use_lft", "--two_stage",
                  "--transformer_activation", "relu"]


def test_dn_dab_dino_deformable_detr_r50_matches_manifest_in_order():
    rows = read_manifest("dn_dab_dino_deformable_detr_r50.tsv")
    assert len(rows) == 636
    model = build(*DINO_REFERENCE)
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 47_650_557
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 47_428_157
    named = [(name, p.requires_grad) for name, p in model.named_parameters()]
    trainable = [name for name, grad in named if grad]
    assert len(named) == 368 and len(trainable) == 357  # the positional layout of the official optimizer state
    # Shared heads are listed once, under their first path transformer.decoder.* (spec §2.2).
    expected = [key for key, _, _ in rows if not key.startswith(("backbone.", "class_embed.", "bbox_embed."))]
    assert [name for name in trainable if not name.startswith("backbone.")] == expected
    assert trainable[0] == "transformer.level_embed"
    assert next(n for n in trainable if "backbone" in n) == "backbone.0.body.layer2.0.conv1.weight"
    assert_loads_strictly(model, rows)


def test_dino_reference_config_has_the_manifest_flags():
    config = parse_args(get_args_parser(), ["--config", str(ROOT / "configs" / "dn_dab_dino_deformable_detr_r50.py")])
    reference = get_args_parser().parse_args(DINO_REFERENCE)
    for flag in CHECKPOINT_FLAGS + ("use_dn", "contrastive", "cdn_split_per_image", "scalar"):
        assert getattr(config, flag) == getattr(reference, flag), flag
    assert config.epochs == 36


@pytest.mark.parametrize("flags", [["--use_dn", "--contrastive"], ["--use_dn", "--contrastive", "--use_mqs", "--use_lft"],
                                   ["--use_dn"], []])
def test_dino_without_two_stage_has_the_deformable_state_dict(flags):
    rows = read_manifest("dn_dab_deformable_detr_r50.tsv")
    model = build("-m", DINO, "--transformer_activation", "relu", *flags)
    assert model_rows(model) == rows
    assert sum(p.numel() for p in model.parameters()) == 47_429_154
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 47_206_754
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 346 and trainable[0] == "transformer.level_embed"


def test_dino_three_patterns_add_patterns_embed_after_label_enc():
    rows = read_manifest("dn_dab_dino_deformable_detr_r50.tsv")
    insert_at = [key for key, _, _ in rows].index("label_enc.weight") + 1
    expected = rows[:insert_at] + [("patterns_embed.weight", (3, 256), "float32")] + rows[insert_at:]
    model = build(*DINO_REFERENCE, "--num_patterns", "3")
    assert model_rows(model) == expected and len(expected) == 637
    assert sum(p.numel() for p in model.parameters()) == 47_651_325


def test_dino_resnet101_adds_layer3_blocks_6_to_22():
    rows = read_manifest("dn_dab_dino_deformable_detr_r50.tsv")
    got = model_rows(build(*DINO_REFERENCE, "--backbone", "resnet101"))
    extra = [key for key, _, _ in got if key not in {k for k, _, _ in rows}]
    assert len(got) == 891 and len(extra) == 255
    assert all(key.startswith("backbone.0.body.layer3.") for key in extra)
    assert [r for r in got if r[0] not in extra] == rows
    model = build(*DINO_REFERENCE, "--backbone", "resnet101")
    assert sum(p.numel() for p in model.parameters()) == 66_590_461


def test_dino_head_count_follows_dec_layers():
    model = build(*DINO_REFERENCE, "--dec_layers", "3")
    keys = [key for key, _, _ in model_rows(model)]
    assert len(keys) == 522
    assert sum(p.numel() for p in model.parameters()) == 42_544_992
    for head in ("class_embed", "bbox_embed", "transformer.decoder.class_embed", "transformer.decoder.bbox_embed"):
        assert {k[len(head) + 1:].split(".")[0] for k in keys if k.startswith(head + ".")} == {"0", "1", "2", "3"}
