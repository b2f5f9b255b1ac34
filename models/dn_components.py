"""Query denoising (DN-DETR): noised ground truth as extra decoder queries.

One implementation serves every model:

* :func:`prepare_for_dn` builds the decoder queries: ``num_groups`` groups of noised copies of the
  ground truth ahead of the matching queries, and the self-attention mask that keeps the matching
  part from seeing them and the groups from seeing each other. With ``DNConfig.contrastive`` every
  ground truth enters each group twice: once as a positive query (small noise, reconstructed) and
  once as a negative query (larger noise, to be classified as "no object");
* :func:`split_dn_outputs` separates the denoising predictions from the matching ones.

The reconstruction losses of the denoising queries live with the other losses, in
:mod:`models.criterion`. Everything here is vectorised over images and groups and follows the device
of its inputs.
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.misc import inverse_sigmoid


@dataclass(frozen=True)
class DNConfig:
    num_groups: int = 5  # --scalar
    label_noise_scale: float = 0.2
    box_noise_scale: float = 0.4
    # --contrastive: a positive and a negative query per ground truth and group.
    contrastive: bool = False
    # --cdn_split_per_image: the negatives are each image's copies. Off: the second half of every group's
    # flat entry list, whatever image it belongs to (what the original does; see _entry_layout).
    negatives_per_image: bool = False
    # Noise on the box corners instead of on centre and size (the DINO-style variant).
    corner_noise: bool = False
    # --scalar at or above this value is a query budget instead of a group count: groups = scalar // group
    # height (at least 1), and a batch without objects gets one empty group. None: always --scalar groups.
    dynamic_groups_from: Optional[int] = None
    # --no-dn_attn_mask (a research ablation): no self-attention mask at all, so the matching queries see the
    # noised ground truth of the denoising groups and the groups see each other.
    attention_mask: bool = True

    @classmethod
    def from_args(cls, args, **options) -> "DNConfig":
        """The settings of the command line (``--scalar``, ``--label_noise_scale``, ``--box_noise_scale`` and,
        where the parser has them, ``--contrastive``, ``--cdn_split_per_image``, ``--dn_attn_mask``) and the
        ``options`` a model fixes (``corner_noise``, ``dynamic_groups_from``)."""
        return cls(num_groups=args.scalar, label_noise_scale=args.label_noise_scale,
                   box_noise_scale=args.box_noise_scale, contrastive=getattr(args, "contrastive", False),
                   negatives_per_image=getattr(args, "cdn_split_per_image", False),
                   attention_mask=getattr(args, "dn_attn_mask", True), **options)

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"--scalar must be >= 1 (number of denoising groups), got {self.num_groups}")
        if not 0 <= self.label_noise_scale <= 1:
            raise ValueError(f"--label_noise_scale is a probability in [0, 1], got {self.label_noise_scale}")
        if self.box_noise_scale < 0:
            raise ValueError(f"--box_noise_scale must be >= 0, got {self.box_noise_scale}")
        if self.contrastive and not self.corner_noise:
            raise ValueError("contrastive denoising draws its noise bands on the box corners: corner_noise=True")
        if self.negatives_per_image and not self.contrastive:
            raise ValueError("--cdn_split_per_image chooses the negative denoising queries: it needs --contrastive")

    def group_count(self, group_size: int) -> int:
        """Number of groups for a batch whose groups are ``group_size`` rows high."""
        if self.dynamic_groups_from is None:
            return self.num_groups
        if group_size == 0:
            return 1
        if self.num_groups >= self.dynamic_groups_from:
            return max(self.num_groups // group_size, 1)
        return self.num_groups


@dataclass(frozen=True)
class DNMeta:
    """Bookkeeping of one batch's denoising queries.

    Each group holds the same ``M`` flat entries: the ground truth of every image in batch order (``N``
    in all), and with contrastive denoising each image's ground truth again, as its copies, right after
    it (``[real_0, copies_0, real_1, copies_1, ...]``, ``M = 2N``). Entry ``g * M + j`` is flat entry
    ``j`` in group ``g``.
    """

    pad_size: int  # denoising query rows in front of the matching queries (num_groups * group_size)
    group_size: int  # rows per group = the largest number of entries of an image in the batch
    num_groups: int
    labels: torch.Tensor  # [G * M] clean labels (the targets; num_classes = "no object" for the copies)
    boxes: torch.Tensor  # [G * M, 4] clean cxcywh boxes
    noised_labels: torch.Tensor  # [G * M] labels fed to the decoder
    noised_boxes: torch.Tensor  # [G * M, 4] boxes fed to the decoder
    batch_idx: torch.Tensor  # [G * M] image of each entry
    query_idx: torch.Tensor  # [G * M] query row of each entry within its image
    # Contrastive denoising only: [G * M] True for the negative queries (large noise, "no object" input
    # label, no box loss), and the indices of the other entries, whose boxes are reconstructed.
    negative: Optional[torch.Tensor] = None
    positive_idx: Optional[torch.Tensor] = None

    @property
    def num_reconstructed(self) -> int:
        """Entries whose boxes are reconstructed; every denoising loss is divided by this count."""
        return self.labels.shape[0] if self.positive_idx is None else self.positive_idx.shape[0]


class DNPredictions(NamedTuple):
    """What every decoder layer predicted for the denoising rows."""

    pred_logits: torch.Tensor  # [L, B, pad_size, C]
    pred_boxes: torch.Tensor  # [L, B, pad_size, 4]


class DecoderQueries(NamedTuple):
    content: torch.Tensor  # [B, Q, D]
    anchors: torch.Tensor  # [B, Q, 4] anchor boxes in logit space
    attn_mask: Optional[torch.Tensor]  # [Q, Q], True = blocked; None when there are no DN queries
    dn_meta: Optional[DNMeta]


def add_label_noise(labels: torch.Tensor, noise_scale: float, num_classes: int) -> torch.Tensor:
    """Replace each label with probability ``noise_scale`` by a uniformly drawn class in ``[0, num_classes)``.

    The random draws (a uniform per entry, then one integer per flipped entry) follow the original
    release's order so that a seeded run reproduces its noise; the integer draw's
    size depends on the flips, which costs one host-device sync on accelerators.
    """
    if noise_scale <= 0:
        return labels
    flip_prob = torch.rand(labels.shape, device=labels.device)
    flipped = torch.nonzero(flip_prob < noise_scale).view(-1)
    new_labels = torch.randint_like(flipped, 0, num_classes)
    return labels.scatter(0, flipped, new_labels)


def add_box_noise(boxes: torch.Tensor, noise_scale: float) -> torch.Tensor:
    """Shift centres by up to ``noise_scale * (w/2, h/2)`` and scale sizes within ``[(1-l)w, (1+l)w]``.

    ``boxes [M, 4]`` are normalised cxcywh; the result is clamped to ``[0, 1]``.
    """
    if noise_scale <= 0:
        return boxes
    max_shift = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], dim=1)  # [M, 4]: (w/2, h/2, w, h)
    noised = boxes + torch.mul(torch.rand_like(boxes) * 2 - 1.0, max_shift) * noise_scale
    return noised.clamp(min=0.0, max=1.0)


def add_corner_noise(boxes: torch.Tensor, noise_scale: float, negative: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Move each corner of ``boxes [M, 4]`` (normalised cxcywh) by up to ``noise_scale`` times half the box's
    width (x) or height (y), then clamp the corners to ``[0, 1]``.

    Without ``negative``: one uniform offset in ``[-1, 1)`` per coordinate. With it (contrastive denoising):
    a random sign and a magnitude in ``[0, 1)``, plus 1 for the negatives, so positive corners move by less
    than ``noise_scale / 2`` of the size and negative ones by ``[noise_scale / 2, noise_scale)`` of it. As in
    the original, the draws are the signs (an integer draw in the boxes' float type) then the magnitudes,
    and nothing guards the sizes: they can reach zero, or turn negative when ``noise_scale > 0.5``.
    """
    if noise_scale <= 0:
        return boxes
    half_size = boxes[:, 2:].repeat(1, 2) / 2  # [M, 4]: (w/2, h/2, w/2, h/2)
    if negative is None:
        offset = torch.rand_like(boxes) * 2 - 1.0
    else:
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        offset = sign * (torch.rand_like(boxes) + negative[:, None].to(boxes.dtype))
    corners = box_cxcywh_to_xyxy(boxes) + offset * half_size * noise_scale
    return box_xyxy_to_cxcywh(corners.clamp(min=0.0, max=1.0))


def dn_attention_mask(pad_size: int, group_size: int, num_matching: int, device=None) -> torch.Tensor:
    """Self-attention mask ``[Q, Q]`` (True = blocked), ``Q = pad_size + num_matching`` 

    Matching queries (rows >= pad_size) cannot see any denoising query; a denoising query sees its own
    group (padding slots included) and every matching query, but no other group.
    """
    index = torch.arange(pad_size + num_matching, device=device)
    is_dn = index < pad_size
    group = index // max(group_size, 1)
    other_group = group[:, None] != group[None, :]
    return is_dn[None, :] & (~is_dn[:, None] | other_group)


class _EntryLayout(NamedTuple):
    """Where every denoising entry comes from and goes to (host tensors ``[G * M]``, entry ``g * M + j``)."""

    batch_idx: torch.Tensor  # image
    query_idx: torch.Tensor  # row within the image: g * group_size + index of the entry within its image
    source: torch.Tensor  # index of its ground truth in the batch's concatenated targets
    copy: torch.Tensor  # bool: the second (contrastive) entry of its ground truth
    negative: Optional[torch.Tensor]  # bool, contrastive only: a negative query
    group_size: int
    num_groups: int


def _entry_layout(counts: Sequence[int], config: DNConfig) -> _EntryLayout:
    """The denoising entries of a batch with ``counts[b]`` objects in image ``b``, computed on the host from
    the counts (known without a device sync).

    Each image contributes its ground truth, then (contrastive) its copies; the images follow each other,
    and the groups repeat this flat list.
    """
    counts_t = torch.as_tensor(counts, dtype=torch.int64)
    entry_counts = counts_t * (2 if config.contrastive else 1)
    group_size = int(entry_counts.max())
    num_groups = config.group_count(group_size)
    num_entries = int(entry_counts.sum())
    batch_idx = torch.repeat_interleave(torch.arange(len(counts)), entry_counts)  # [M]
    index_in_image = torch.arange(num_entries) - (torch.cumsum(entry_counts, 0) - entry_counts)[batch_idx]
    objects = counts_t[batch_idx]
    copy = index_in_image >= objects
    source = (torch.cumsum(counts_t, 0) - counts_t)[batch_idx] + index_in_image - objects * copy
    negative = None
    if config.contrastive:
        # The original takes the second half of each group's flat list as the negatives: right for a batch
        # with one non-empty image, wrong entries (real objects as negatives, copies as positives) with several.
        negative = copy if config.negatives_per_image else torch.arange(num_entries) >= int(counts_t.sum())
        negative = negative.repeat(num_groups)
    group = torch.arange(num_groups).repeat_interleave(num_entries)  # [G * M]
    return _EntryLayout(batch_idx.repeat(num_groups), index_in_image.repeat(num_groups) + group * group_size,
                        source.repeat(num_groups), copy.repeat(num_groups), negative, group_size, num_groups)


def prepare_for_dn(targets: Optional[List[Dict[str, torch.Tensor]]], dn_config: Optional[DNConfig],
                   label_enc: nn.Embedding, matching_content: torch.Tensor, matching_anchors: torch.Tensor,
                   num_classes: int, batch_size: int) -> DecoderQueries:
    """Decoder queries for a batch: denoising groups (when ``dn_config`` and ``targets`` are given)
    followed by the matching queries.

    Args:
        targets: per-image dicts with ``labels [n_b]`` and normalised cxcywh ``boxes [n_b, 4]``.
        dn_config: noise settings, or None for matching queries only (inference, baselines).
        label_enc: class embedding ``[num_classes + 1, D - 1]`` of the denoising content.
        matching_content: ``[Qm, D]`` content of the matching queries (indicator channel included), shared
            by every image, or ``[B, Qm, D]``.
        matching_anchors: ``[Qm, 4]`` anchor logits of the matching queries, or ``[B, Qm, 4]``.
        batch_size: number of images.
    """
    num_matching, d_model = matching_content.shape[-2:]
    matching_content = matching_content.expand(batch_size, -1, -1)
    matching_anchors = matching_anchors.expand(batch_size, -1, -1)
    if dn_config is None or targets is None:
        return DecoderQueries(matching_content, matching_anchors, None, None)
    if len(targets) != batch_size:
        raise ValueError(f"prepare_for_dn: {len(targets)} targets for a batch of {batch_size} images")

    device = matching_content.device
    layout = _entry_layout([t["labels"].shape[0] for t in targets], dn_config)
    group_size, num_groups = layout.group_size, layout.num_groups
    pad_size = group_size * num_groups
    batch_idx, query_idx, source = torch.stack([layout.batch_idx, layout.query_idx, layout.source]).to(
        device, non_blocking=True)
    labels = torch.cat([t["labels"] for t in targets])[source]  # [G * M]
    boxes = torch.cat([t["boxes"] for t in targets])[source]  # [G * M, 4]
    negative = positive_idx = None
    if dn_config.contrastive:
        labels = labels.masked_fill(layout.copy.to(device, non_blocking=True), num_classes)  # copies: no object
        negative = layout.negative.to(device, non_blocking=True)
        positive_idx = torch.nonzero(~layout.negative).view(-1).to(device, non_blocking=True)  # host-side

    noised_labels = add_label_noise(labels, dn_config.label_noise_scale, num_classes)
    if negative is not None:
        noised_labels = noised_labels.masked_fill(negative, num_classes)  # after the label noise, as the original
    if dn_config.corner_noise:
        noised_boxes = add_corner_noise(boxes, dn_config.box_noise_scale, negative)
    else:
        noised_boxes = add_box_noise(boxes, dn_config.box_noise_scale)
    indicator = torch.ones_like(noised_boxes[:, :1])  # 1 marks a denoising query
    dn_content = torch.cat([label_enc(noised_labels), indicator.to(label_enc.weight.dtype)], dim=1)  # [G*M, D]
    dn_anchors = inverse_sigmoid(noised_boxes)

    # Padding slots (images with fewer entries than group_size) keep zero content and zero anchor logits.
    content = torch.cat([matching_content.new_zeros(batch_size, pad_size, d_model), matching_content], dim=1)
    anchors = torch.cat([matching_anchors.new_zeros(batch_size, pad_size, 4), matching_anchors], dim=1)
    content[batch_idx, query_idx] = dn_content
    anchors[batch_idx, query_idx] = dn_anchors.to(anchors.dtype)

    attn_mask = None
    if pad_size > 0:
        attn_mask = dn_attention_mask(pad_size, group_size, num_matching, device)
        if not dn_config.attention_mask:
            attn_mask = torch.zeros_like(attn_mask)  # nothing blocked: every query sees every other one
    meta = DNMeta(pad_size=pad_size, group_size=group_size, num_groups=num_groups, labels=labels, boxes=boxes,
                  noised_labels=noised_labels, noised_boxes=noised_boxes, batch_idx=batch_idx, query_idx=query_idx,
                  negative=negative, positive_idx=positive_idx)
    return DecoderQueries(content, anchors, attn_mask, meta)


def split_dn_outputs(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, dn_meta: Optional[DNMeta]):
    """Separate the denoising rows of per-layer outputs ``[L, B, Q, *]`` from the matching rows.

    Returns the matching outputs and the :class:`DNPredictions` (None when there are no denoising rows).
    """
    if dn_meta is None or dn_meta.pad_size == 0:
        return outputs_class, outputs_coord, None
    pad = dn_meta.pad_size
    dn_predictions = DNPredictions(outputs_class[:, :, :pad], outputs_coord[:, :, :pad])
    return outputs_class[:, :, pad:], outputs_coord[:, :, pad:], dn_predictions
