"""Set criterion: Hungarian-matched losses of every decoder layer plus the denoising losses (spec §5)."""
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from util.distributed import all_reduce_mean
from util.misc import accuracy

from .dn_components import compute_dn_loss, layer_loss_suffixes
from .losses import box_regression_losses, focal_classification_loss
from .matcher import HungarianMatcher, MatchIndices


class SetCriterion(nn.Module):
    """Computes the loss dictionary of a detector's outputs; ``weight_dict`` says how to sum it.

    Keys of the last decoder layer are unsuffixed, auxiliary layer ``i`` adds ``_i``; denoising
    losses are the ``tgt_*`` keys (present whenever the model trains with denoising).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 focal_alpha: float, use_dn: bool, num_decoder_layers: int, aux_loss: bool,
                 log_xy_hw: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.use_dn = use_dn
        self.num_decoder_layers = num_decoder_layers
        self.aux_loss = aux_loss
        self.log_xy_hw = log_xy_hw

    def layer_losses(self, outputs: Dict[str, torch.Tensor], match: torch.Tensor, tgt_labels: torch.Tensor,
                     tgt_boxes: torch.Tensor, target_lengths: torch.Tensor, num_boxes: torch.Tensor,
                     log: bool) -> Dict[str, torch.Tensor]:
        """Classification, box and cardinality terms of one decoder layer.

        ``match [3, M]`` holds the image, query and batch-wide target index of every matched pair.
        """
        logits = outputs["pred_logits"].float()  # [B, Q, C]
        batch_idx, query_idx, target_idx = match
        matched_labels = tgt_labels[target_idx]

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = matched_labels
        losses = {"loss_ce": focal_classification_loss(logits, target_classes, num_boxes, self.focal_alpha)}
        if log:
            losses["class_error"] = 100 - accuracy(logits[batch_idx, query_idx], matched_labels)[0]

        src_boxes = outputs["pred_boxes"][batch_idx, query_idx].float()
        box_losses = box_regression_losses(src_boxes, tgt_boxes[target_idx], num_boxes)
        if not self.log_xy_hw:
            box_losses = {k: box_losses[k] for k in ("loss_bbox", "loss_giou")}
        losses.update(box_losses)
        losses["cardinality_error"] = self.cardinality_error(logits, target_lengths)
        return losses

    @staticmethod
    @torch.no_grad()
    def cardinality_error(logits: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
        """|#predictions whose arg-max is not the last class - #objects|, a DETR log-only leftover."""
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return F.l1_loss(card_pred.float(), target_lengths.float())

    @staticmethod
    def flatten_matches(all_indices: List[MatchIndices], sizes: List[int], device) -> torch.Tensor:
        """Every layer's matches as (image, query, batch-wide target) -> ``[L, 3, M]``, on ``device`` in one copy.

        ``M`` is the same for every layer: each target is matched once (``min(Q, n_b)`` per image).
        """
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        per_layer = [torch.stack([
            torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]),
            torch.cat([src for src, _ in indices]),
            torch.cat([tgt + offset for (_, tgt), offset in zip(indices, offsets)]),
        ]) for indices in all_indices]
        return torch.stack(per_layer).to(device, non_blocking=True)

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        layer_outputs = (outputs.get("aux_outputs", []) + [outputs]) if self.aux_loss else [outputs]
        suffixes = layer_loss_suffixes(len(layer_outputs), aux_loss=True)
        device = outputs["pred_logits"].device
        sizes = [len(t["labels"]) for t in targets]
        matches = self.flatten_matches(self.matcher.match_layers(layer_outputs, targets), sizes, device)
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        target_lengths = torch.as_tensor(sizes, dtype=torch.float32).to(device, non_blocking=True)  # [B]

        # Average number of target boxes across processes, for normalisation.
        num_boxes = all_reduce_mean(target_lengths.sum()).clamp(min=1)

        losses = {}
        for layer_out, match, suffix in zip(layer_outputs, matches, suffixes):
            layer_losses = self.layer_losses(layer_out, match, tgt_labels, tgt_boxes, target_lengths, num_boxes,
                                             log=suffix == "")
            losses.update({name + suffix: value for name, value in layer_losses.items()})
        if self.use_dn:
            dn_meta = outputs.get("dn_meta") if self.training else None
            losses.update(compute_dn_loss(dn_meta, self.num_decoder_layers, self.aux_loss, self.focal_alpha, device))
        return losses


def build_weight_dict(args) -> Dict[str, float]:
    base = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
    if args.use_dn:
        base.update({"tgt_loss_ce": args.cls_loss_coef, "tgt_loss_bbox": args.bbox_loss_coef,
                     "tgt_loss_giou": args.giou_loss_coef})
    weight_dict = dict(base)
    if args.aux_loss:
        for i in range(args.dec_layers - 1):
            weight_dict.update({f"{name}_{i}": coef for name, coef in base.items()})
    return weight_dict
