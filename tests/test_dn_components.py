"""The denoising module: noise, query placement, attention mask, output split and losses."""
import argparse
import itertools

import pytest
import torch
from torch import nn

from models.criterion import dn_losses
from models.dn_components import (DNConfig, add_box_noise, add_corner_noise, add_label_noise, dn_attention_mask,
                                   prepare_for_dn, split_dn_outputs)
from tests import spec_oracle_dino
from tests.model_utils import random_targets
from util.box_ops import box_cxcywh_to_xyxy

D, NUM_CLASSES = 8, 11


def paper_mask(num_groups: int, group_size: int, num_matching: int) -> torch.Tensor:
    """The mask as DN-DETR defines it, element by element: a_ij = 1 (blocked) if
    (j < P and floor(i / M) != floor(j / M)) or (i >= P and j < P), with P = G * M."""
    pad = num_groups * group_size
    size = pad + num_matching
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i, j in itertools.product(range(size), range(size)):
        if j < pad and i < pad and i // group_size != j // group_size:
            mask[i, j] = True
        if i >= pad and j < pad:
            mask[i, j] = True
    return mask


@pytest.mark.parametrize("num_groups,group_size,num_matching", [(1, 1, 1), (3, 2, 3), (5, 4, 7), (2, 7, 1), (4, 3, 0)])
def test_attention_mask_equals_paper_formula(num_groups, group_size, num_matching):
    mask = dn_attention_mask(num_groups * group_size, group_size, num_matching)
    assert torch.equal(mask, paper_mask(num_groups, group_size, num_matching))


def test_attention_mask_picture_from_spec():
    expected = torch.tensor([
        [0, 0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(dn_attention_mask(6, 2, 3), expected)


def test_box_noise_stays_within_bounds():
    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(4000, 2) * 0.5 + 0.25, torch.rand(4000, 2) * 0.2 + 0.05], dim=1)
    scale = 0.4
    noised = add_box_noise(boxes, scale)
    w, h = boxes[:, 2], boxes[:, 3]
    eps = 1e-6
    assert ((noised[:, 0] - boxes[:, 0]).abs() <= scale * w / 2 + eps).all()
    assert ((noised[:, 1] - boxes[:, 1]).abs() <= scale * h / 2 + eps).all()
    assert ((noised[:, 2] - w).abs() <= scale * w + eps).all()
    assert ((noised[:, 3] - h).abs() <= scale * h + eps).all()
    # The noise uses its whole range, not a fraction of it.
    assert ((noised[:, 0] - boxes[:, 0]).abs() / (scale * w / 2)).max() > 0.99
    assert ((noised[:, 2] - w).abs() / (scale * w)).max() > 0.99


def test_box_noise_is_clamped_to_the_image():
    torch.manual_seed(1)
    boxes = torch.tensor([[0.02, 0.98, 0.9, 0.9]]).repeat(500, 1)
    noised = add_box_noise(boxes, 1.0)
    assert noised.min() >= 0 and noised.max() <= 1
    assert (noised == 0).any() and (noised == 1).any()


def test_zero_noise_is_identity():
    labels = torch.arange(10)
    boxes = torch.rand(10, 4)
    assert torch.equal(add_label_noise(labels, 0.0, NUM_CLASSES), labels)
    assert torch.equal(add_box_noise(boxes, 0.0), boxes)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_label_noise_flips_at_requested_rate(rate):
    torch.manual_seed(2)
    n = 40000
    labels = torch.full((n,), 3)
    noised = add_label_noise(labels, rate, NUM_CLASSES)
    assert noised.min() >= 0 and noised.max() < NUM_CLASSES
    # A flipped label is redrawn uniformly, so it stays 3 with probability 1/C.
    expected_changed = rate * (1 - 1 / NUM_CLASSES)
    changed = (noised != labels).float().mean().item()
    assert abs(changed - expected_changed) < 4 * (expected_changed * (1 - expected_changed) / n) ** 0.5
    counts = torch.bincount(noised[noised != 3], minlength=NUM_CLASSES).float()
    counts = counts[torch.arange(NUM_CLASSES) != 3]
    assert counts.min() > 0.8 * counts.mean()  # every other class is reachable, roughly uniformly


def _prepare(targets, config, num_matching=5, batch_size=None):
    torch.manual_seed(0)
    label_enc = nn.Embedding(NUM_CLASSES + 1, D - 1)
    content = torch.randn(num_matching, D)
    anchors = torch.randn(num_matching, 4)
    batch = len(targets) if batch_size is None else batch_size
    return prepare_for_dn(targets, config, label_enc, content, anchors, NUM_CLASSES, batch), label_enc, content, anchors


def test_query_placement_follows_group_then_image_then_object():
    targets = random_targets([2, 1])
    config = DNConfig(3, 0.0, 0.0)
    queries, label_enc, content, anchors = _prepare(targets, config)
    meta = queries.dn_meta
    assert (meta.pad_size, meta.group_size) == (6, 2)
    assert meta.query_idx.tolist() == [0, 1, 0, 2, 3, 2, 4, 5, 4]
    assert meta.batch_idx.tolist() == [0, 0, 1] * 3
    assert queries.content.shape == (2, 6 + 5, D)
    assert queries.anchors.shape == (2, 6 + 5, 4)
    # Denoising content: label embedding of the (here clean) label, then the indicator 1.
    for entry, (b, q) in enumerate(zip(meta.batch_idx.tolist(), meta.query_idx.tolist())):
        label = meta.labels[entry]
        assert torch.equal(queries.content[b, q, :-1], label_enc.weight[label])
        assert queries.content[b, q, -1] == 1
        expected_anchor = torch.logit(meta.boxes[entry].clamp(1e-3, 1 - 1e-3))
        assert torch.allclose(queries.anchors[b, q], expected_anchor, atol=1e-5)
    # Image 1 has one object: its second slot of each group is a padding query (all zeros).
    for q in (1, 3, 5):
        assert not queries.content[1, q].any() and not queries.anchors[1, q].any()
    # The matching part follows, unchanged, for every image.
    assert torch.equal(queries.content[:, 6:], content.expand(2, -1, -1))
    assert torch.equal(queries.anchors[:, 6:], anchors.expand(2, -1, -1))
    assert torch.equal(queries.attn_mask, dn_attention_mask(6, 2, 5))


def test_clean_targets_are_kept_and_noise_applies_to_inputs_only():
    targets = random_targets([3, 2, 4])
    queries, *_ = _prepare(targets, DNConfig(4, 0.5, 0.4))
    meta = queries.dn_meta
    clean_labels = torch.cat([t["labels"] for t in targets])
    clean_boxes = torch.cat([t["boxes"] for t in targets])
    assert torch.equal(meta.labels, clean_labels.repeat(4))
    assert torch.equal(meta.boxes, clean_boxes.repeat(4, 1))
    assert not torch.equal(meta.noised_boxes, meta.boxes)


def test_image_without_objects_gets_only_padding_queries():
    targets = random_targets([0, 3])
    queries, *_ = _prepare(targets, DNConfig(2, 0.2, 0.4))
    meta = queries.dn_meta
    assert meta.pad_size == 6 and (meta.batch_idx == 1).all()
    assert not queries.content[0, :6].any() and not queries.anchors[0, :6].any()


def test_batch_without_objects_has_no_denoising_queries():
    targets = random_targets([0, 0])
    queries, _, content, _ = _prepare(targets, DNConfig(5, 0.2, 0.4))
    assert queries.dn_meta.pad_size == 0 and queries.attn_mask is None
    assert torch.equal(queries.content, content.expand(2, -1, -1))
    logits, boxes = torch.randn(3, 2, 5, NUM_CLASSES), torch.rand(3, 2, 5, 4)
    split_logits, split_boxes, predictions = split_dn_outputs(logits, boxes, queries.dn_meta)
    assert split_logits is logits and split_boxes is boxes and predictions is None
    losses = dn_losses(queries.dn_meta, predictions, 3, 0.25, "cpu")
    assert len(losses) == 3 * 4
    assert all(v.item() == 0 and not v.requires_grad for v in losses.values())


def test_without_the_attention_mask_nothing_is_blocked():
    targets = random_targets([2, 1])
    masked, *_ = _prepare(targets, DNConfig(3))
    unmasked, *_ = _prepare(targets, DNConfig(3, attention_mask=False))
    assert masked.attn_mask.any() and masked.attn_mask.shape == unmasked.attn_mask.shape == (11, 11)
    assert not unmasked.attn_mask.any()
    assert torch.equal(masked.content, unmasked.content) and torch.equal(masked.anchors, unmasked.anchors)
    args = argparse.Namespace(scalar=3, label_noise_scale=0.2, box_noise_scale=0.4, dn_attn_mask=False)
    assert DNConfig.from_args(args).attention_mask is False


def test_without_config_only_matching_queries():
    queries, _, content, anchors = _prepare(random_targets([2]), None, batch_size=3)
    assert queries.dn_meta is None and queries.attn_mask is None
    assert torch.equal(queries.content, content.expand(3, -1, -1))
    assert torch.equal(queries.anchors, anchors.expand(3, -1, -1))


def test_split_and_losses_reconstruct_perfect_predictions():
    targets = random_targets([2, 3])
    queries, *_ = _prepare(targets, DNConfig(2, 0.0, 0.0))
    meta = queries.dn_meta
    num_layers, num_matching = 2, 5
    logits = torch.full((num_layers, 2, meta.pad_size + num_matching, NUM_CLASSES), -20.0)
    boxes = torch.full((num_layers, 2, meta.pad_size + num_matching, 4), 0.5)
    logits[:, meta.batch_idx, meta.query_idx, meta.labels] = 20.0
    boxes[:, meta.batch_idx, meta.query_idx] = meta.boxes
    matching_logits, matching_boxes, predictions = split_dn_outputs(logits, boxes, meta)
    assert matching_logits.shape == (num_layers, 2, num_matching, NUM_CLASSES)
    assert matching_boxes.shape == (num_layers, 2, num_matching, 4)
    losses = dn_losses(meta, predictions, num_layers, 0.25, "cpu")
    assert set(losses) == {"tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou",
                           "tgt_loss_ce_0", "tgt_class_error_0", "tgt_loss_bbox_0", "tgt_loss_giou_0"}
    assert losses["tgt_loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    # Not exactly 0: the original's +1e-6 in the IoU denominator leaves ~1e-6 / area.
    assert losses["tgt_loss_giou"].item() == pytest.approx(0, abs=1e-3)
    assert losses["tgt_loss_ce"].item() < 1e-6
    assert losses["tgt_class_error"].item() == 0


def test_dn_loss_normaliser_is_the_local_entry_count():
    targets = random_targets([2, 1])
    queries, *_ = _prepare(targets, DNConfig(3, 0.0, 0.0))
    meta = queries.dn_meta
    logits = torch.zeros(1, 2, meta.pad_size, NUM_CLASSES)
    boxes = torch.full((1, 2, meta.pad_size, 4), 0.5)
    _, _, predictions = split_dn_outputs(logits, boxes, meta)
    losses = dn_losses(meta, predictions, 1, 0.25, "cpu")
    expected_l1 = (torch.full_like(meta.boxes, 0.5) - meta.boxes).abs().sum() / 9
    assert torch.allclose(losses["tgt_loss_bbox"], expected_l1)
    # Focal loss of zero logits: p = 0.5 everywhere, sum over 9 entries x C classes / 9.
    p, ce = 0.5, torch.log(torch.tensor(2.0))
    per_entry = 0.25 * ce * (1 - p) ** 2 + (NUM_CLASSES - 1) * 0.75 * ce * p ** 2
    assert torch.allclose(losses["tgt_loss_ce"], per_entry, atol=1e-6)
    assert set(losses) == {"tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou"}


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="--scalar"):
        DNConfig(0, 0.2, 0.4)
    with pytest.raises(ValueError, match="--label_noise_scale"):
        DNConfig(5, 1.5, 0.4)
    with pytest.raises(ValueError, match="--box_noise_scale"):
        DNConfig(5, 0.2, -1)


def contrastive_config(scalar, per_image=False, label_noise=0.0, box_noise=0.0):
    return DNConfig(scalar, label_noise, box_noise, contrastive=True, negatives_per_image=per_image, corner_noise=True,
                    dynamic_groups_from=100)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("scalar,counts", [(100, [0, 1, 9]), (100, [9, 0, 1]), (100, [0, 26, 2]), (150, [0, 13]),
                                           (100, [0, 0]), (3, [2, 0, 1])])
def test_contrastive_layout_matches_the_dino_oracle(scalar, counts, per_image):
    """Dynamic groups (--scalar >= 100: groups = scalar // (2 * n_max), at least 1; one empty group for a batch
    without objects), doubled entries, rows and negatives against the DINO spec oracle's bookkeeping, for
    batches of very different object counts with empty images."""
    targets = random_targets(counts)
    queries, label_enc, content, _ = _prepare(targets, contrastive_config(scalar, per_image))
    meta = queries.dn_meta
    cfg = argparse.Namespace(num_classes=NUM_CLASSES, contrastive=True, scalar=scalar, cdn_split_per_image=per_image)
    dn = spec_oracle_dino.dn_entries(targets, cfg)
    entries = dn["entries"]
    assert (meta.group_size, meta.num_groups, meta.pad_size) == (dn["group_size"], dn["num_groups"], dn["pad"])
    assert meta.batch_idx.tolist() == [e["batch"] for e in entries]
    assert meta.query_idx.tolist() == [e["row"] for e in entries]
    assert meta.labels.tolist() == [e["label"] for e in entries]
    assert meta.negative.tolist() == [e["negative"] for e in entries]
    assert meta.positive_idx.tolist() == [i for i, e in enumerate(entries) if not e["negative"]]
    assert meta.num_reconstructed == dn["num_tgt"]
    # Without noise: negatives are fed as "no object", positives with their label.
    assert meta.noised_labels.tolist() == [NUM_CLASSES if e["negative"] else e["label"] for e in entries]
    for b, n in enumerate(counts):  # an image's rows beyond its 2 * n entries of each group stay padding
        used = {q for i, q in zip(meta.batch_idx.tolist(), meta.query_idx.tolist()) if i == b}
        padding = [q for q in range(meta.pad_size) if q not in used]
        assert len(used) == 2 * n * meta.num_groups
        assert not queries.content[b, padding].any() and not queries.anchors[b, padding].any()
    assert torch.equal(queries.content[:, meta.pad_size:], content.expand(len(counts), -1, -1))


def test_corner_noise_bands_of_positives_and_negatives():
    torch.manual_seed(0)
    boxes = torch.cat([torch.rand(4000, 2) * 0.4 + 0.3, torch.rand(4000, 2) * 0.2 + 0.05], dim=1)
    negative = torch.arange(4000) % 2 == 1
    scale = 0.4
    noised = add_corner_noise(boxes, scale, negative)
    move = (box_cxcywh_to_xyxy(noised) - box_cxcywh_to_xyxy(boxes)).abs() / (boxes[:, 2:].repeat(1, 2) / 2 * scale)
    eps = 1e-4
    assert (move[~negative] < 1 + eps).all() and move[~negative].max() > 0.99
    assert (move[negative] > 1 - eps).all() and (move[negative] < 2 + eps).all() and move[negative].max() > 1.99
    uniform = add_corner_noise(boxes, scale)  # without negatives: one uniform offset in [-1, 1) per coordinate
    move = (box_cxcywh_to_xyxy(uniform) - box_cxcywh_to_xyxy(boxes)).abs() / (boxes[:, 2:].repeat(1, 2) / 2 * scale)
    assert (move < 1 + eps).all() and move.max() > 0.99
    assert torch.equal(add_corner_noise(boxes, 0.0, negative), boxes)


def test_contrastive_losses_classify_negatives_and_reconstruct_positives_only():
    targets = random_targets([2, 1])
    queries, *_ = _prepare(targets, contrastive_config(2))
    meta = queries.dn_meta
    logits = torch.full((1, 2, meta.pad_size, NUM_CLASSES), -20.0)
    boxes = torch.full((1, 2, meta.pad_size, 4), 0.5)
    real = meta.labels < NUM_CLASSES
    logits[:, meta.batch_idx[real], meta.query_idx[real], meta.labels[real]] = 20.0  # copies: no class at all
    positive = ~meta.negative
    boxes[:, meta.batch_idx[positive], meta.query_idx[positive]] = meta.boxes[positive]  # negatives: wrong boxes
    _, _, predictions = split_dn_outputs(logits, boxes, meta)
    losses = dn_losses(meta, predictions, 1, 0.25, "cpu")
    assert losses["tgt_loss_bbox"].item() == pytest.approx(0, abs=1e-6) and losses["tgt_loss_ce"].item() < 1e-6
    assert losses["tgt_class_error"].item() == 50  # a copy's target "no object" is never an arg-max
    boxes[:, meta.batch_idx[positive], meta.query_idx[positive]] = 0.5
    _, _, predictions = split_dn_outputs(logits, boxes, meta)
    expected = (torch.full_like(meta.boxes, 0.5) - meta.boxes)[positive].abs().sum() / 6  # G * N = 2 * 3
    assert torch.allclose(dn_losses(meta, predictions, 1, 0.25, "cpu")["tgt_loss_bbox"], expected)


def test_contrastive_config_checks():
    with pytest.raises(ValueError, match="--cdn_split_per_image"):
        DNConfig(5, 0.2, 0.4, negatives_per_image=True, corner_noise=True)
    with pytest.raises(ValueError, match="corner"):
        DNConfig(5, 0.2, 0.4, contrastive=True)
    assert [DNConfig(100, dynamic_groups_from=100).group_count(p) for p in (0, 7, 50, 101)] == [1, 14, 2, 1]
    assert [DNConfig(5).group_count(p) for p in (0, 7)] == [5, 5]  # the other models: always --scalar groups
