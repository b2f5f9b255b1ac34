"""Query denoising (DN-DETR): noised ground truth as extra decoder queries.

One implementation serves every model:

* :func:`prepare_for_dn` builds the decoder queries: ``num_groups`` groups of noised copies of the
  ground truth ahead of the matching queries, and the self-attention mask that keeps the matching
  part from seeing them and the groups from seeing each other;
* :func:`split_dn_outputs` separates the denoising predictions from the matching ones.

The reconstruction losses of the denoising queries live with the other losses, in
:mod:`models.criterion`. Everything here is vectorised over images and groups and follows the device
of its inputs.
"""
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from util.misc import inverse_sigmoid


@dataclass(frozen=True)
class DNConfig:
    num_groups: int = 5  # --scalar
    label_noise_scale: float = 0.2
    box_noise_scale: float = 0.4

    @classmethod
    def from_args(cls, args) -> "DNConfig":
        """The noise settings of the command line (``--scalar``, ``--label_noise_scale``, ``--box_noise_scale``)."""
        return cls(num_groups=args.scalar, label_noise_scale=args.label_noise_scale,
                   box_noise_scale=args.box_noise_scale)

    def __post_init__(self):
        if self.num_groups < 1:
            raise ValueError(f"--scalar must be >= 1 (number of denoising groups), got {self.num_groups}")
        if not 0 <= self.label_noise_scale <= 1:
            raise ValueError(f"--label_noise_scale is a probability in [0, 1], got {self.label_noise_scale}")
        if self.box_noise_scale < 0:
            raise ValueError(f"--box_noise_scale must be >= 0, got {self.box_noise_scale}")


@dataclass(frozen=True)
class DNMeta:
    """Bookkeeping of one batch's denoising queries; entry ``g * N + t`` is ground truth ``t`` in group ``g``."""

    pad_size: int  # denoising query rows in front of the matching queries (num_groups * group_size)
    group_size: int  # rows per group = the largest ground-truth count of an image in the batch
    num_groups: int
    labels: torch.Tensor  # [G * N] clean labels (the reconstruction targets)
    boxes: torch.Tensor  # [G * N, 4] clean cxcywh boxes
    noised_labels: torch.Tensor  # [G * N] labels fed to the decoder
    noised_boxes: torch.Tensor  # [G * N, 4] boxes fed to the decoder
    batch_idx: torch.Tensor  # [G * N] image of each entry
    query_idx: torch.Tensor  # [G * N] query row of each entry within its image


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


def _dn_indices(counts: Sequence[int], num_groups: int):
    """Image and query row of every denoising entry (group-major, then image, then ground truth).

    Computed on the host from the per-image counts (known without a device sync) -> ``[2, G * N]``.
    """
    counts_t = torch.as_tensor(counts, dtype=torch.int64)
    num_boxes, group_size = int(counts_t.sum()), max(counts)
    batch_idx = torch.repeat_interleave(torch.arange(len(counts)), counts_t)  # [N]
    first_of_image = torch.cumsum(counts_t, 0) - counts_t  # [B]
    index_in_image = torch.arange(num_boxes) - first_of_image[batch_idx]  # [N]
    group = torch.arange(num_groups).repeat_interleave(num_boxes)  # [G * N]
    return torch.stack([batch_idx.repeat(num_groups), index_in_image.repeat(num_groups) + group * group_size])


def prepare_for_dn(targets: Optional[List[Dict[str, torch.Tensor]]], dn_config: Optional[DNConfig],
                   label_enc: nn.Embedding, matching_content: torch.Tensor, matching_anchors: torch.Tensor,
                   num_classes: int, batch_size: int) -> DecoderQueries:
    """Decoder queries for a batch: denoising groups (when ``dn_config`` and ``targets`` are given)
    followed by the matching queries.

    Args:
        targets: per-image dicts with ``labels [n_b]`` and normalised cxcywh ``boxes [n_b, 4]``.
        dn_config: noise settings, or None for matching queries only (inference, baselines).
        label_enc: class embedding ``[num_classes + 1, D - 1]`` of the denoising content.
        matching_content: ``[Qm, D]`` content of the matching queries (indicator channel included).
        matching_anchors: ``[Qm, 4]`` anchor logits of the matching queries.
        batch_size: number of images.
    """
    num_matching, d_model = matching_content.shape
    if dn_config is None or targets is None:
        return DecoderQueries(matching_content.expand(batch_size, -1, -1),
                              matching_anchors.expand(batch_size, -1, -1), None, None)
    if len(targets) != batch_size:
        raise ValueError(f"prepare_for_dn: {len(targets)} targets for a batch of {batch_size} images")

    device = matching_content.device
    counts = [t["labels"].shape[0] for t in targets]
    num_groups = dn_config.num_groups
    group_size = max(counts)
    pad_size = group_size * num_groups
    labels = torch.cat([t["labels"] for t in targets]).repeat(num_groups)  # [G * N]
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(num_groups, 1)  # [G * N, 4]
    batch_idx, query_idx = _dn_indices(counts, num_groups).to(device, non_blocking=True)

    noised_labels = add_label_noise(labels, dn_config.label_noise_scale, num_classes)
    noised_boxes = add_box_noise(boxes, dn_config.box_noise_scale)
    indicator = torch.ones_like(noised_boxes[:, :1])  # 1 marks a denoising query
    dn_content = torch.cat([label_enc(noised_labels), indicator.to(label_enc.weight.dtype)], dim=1)  # [G*N, D]
    dn_anchors = inverse_sigmoid(noised_boxes)

    # Padding slots (images with fewer objects than group_size) keep zero content and zero anchor logits.
    content = torch.cat([matching_content.new_zeros(pad_size, d_model), matching_content]).repeat(batch_size, 1, 1)
    anchors = torch.cat([matching_anchors.new_zeros(pad_size, 4), matching_anchors]).repeat(batch_size, 1, 1)
    content[batch_idx, query_idx] = dn_content
    anchors[batch_idx, query_idx] = dn_anchors.to(anchors.dtype)

    attn_mask = dn_attention_mask(pad_size, group_size, num_matching, device) if pad_size > 0 else None
    meta = DNMeta(pad_size=pad_size, group_size=group_size, num_groups=num_groups, labels=labels, boxes=boxes,
                  noised_labels=noised_labels, noised_boxes=noised_boxes, batch_idx=batch_idx, query_idx=query_idx)
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
