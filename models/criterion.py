"""Set criterion: Hungarian-matched losses of every decoder layer plus the denoising losses."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from util.distributed import all_reduce_mean
from util.misc import accuracy

from .dn_components import DNMeta, DNPredictions
from .losses import box_regression_losses, focal_classification_loss
from .matcher import HungarianMatcher, MatchIndices

MATCHING_LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
DN_LOSS_NAMES = ("tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou")


def layer_loss_suffixes(num_layers: int) -> List[str]:
    """Key suffix of each decoder layer's losses: ``_0 .. _{L-2}`` for auxiliary layers, none for the last."""
    return [f"_{i}" for i in range(num_layers - 1)] + [""]


def dn_losses(dn_meta: Optional[DNMeta], dn_predictions: Optional[DNPredictions], num_layers: int,
              focal_alpha: float, device) -> Dict[str, torch.Tensor]:
    """Reconstruction losses of the denoising queries of the last ``num_layers`` decoder layers.

    Each denoising query is supervised by the ground truth it was noised from (no matching): focal
    classification (a contrastive negative's target is "no object"), L1 and GIoU (on the entries that are
    not negatives), all divided by the number of reconstructed entries of this process (as in the original
    release, not averaged across processes). Without denoising predictions (evaluation, a batch without
    objects) every key is a constant zero, so logs keep their keys.
    """
    suffixes = layer_loss_suffixes(num_layers)
    if dn_predictions is None:
        zero = torch.zeros((), device=device)
        return {name + suffix: zero for suffix in suffixes for name in DN_LOSS_NAMES}

    # [L, B, pad, *] -> [L, G * M, *]: each entry's prediction in its own image and row.
    logits = dn_predictions.pred_logits[:, dn_meta.batch_idx, dn_meta.query_idx].float()
    boxes = dn_predictions.pred_boxes[:, dn_meta.batch_idx, dn_meta.query_idx].float()
    target_boxes = dn_meta.boxes
    if dn_meta.positive_idx is not None:
        boxes, target_boxes = boxes[:, dn_meta.positive_idx], target_boxes[dn_meta.positive_idx]
    # Half the entries with contrastive denoising, yet the class loss sums over all of them (original).
    normalizer = dn_meta.num_reconstructed
    first_layer = logits.shape[0] - num_layers
    losses = {}
    for layer_id, suffix in enumerate(suffixes, start=first_layer):
        box_losses = box_regression_losses(boxes[layer_id], target_boxes, normalizer)
        losses["tgt_loss_ce" + suffix] = focal_classification_loss(
            logits[layer_id][None], dn_meta.labels[None], normalizer, focal_alpha)
        losses["tgt_class_error" + suffix] = 100 - accuracy(logits[layer_id], dn_meta.labels)[0]
        losses["tgt_loss_bbox" + suffix] = box_losses["loss_bbox"]
        losses["tgt_loss_giou" + suffix] = box_losses["loss_giou"]
    return losses


class SetCriterion(nn.Module):
    """Computes the loss dictionary of a detector's outputs; ``weight_dict`` says how to sum it.

    Every decoder layer the outputs carry is supervised: the last one under unsuffixed keys, auxiliary
    layer ``i`` (present in ``aux_outputs`` unless the model was built with ``--no_aux_loss``) under
    ``_i`` keys. The denoising losses are the ``tgt_*`` keys: computed from the outputs' denoising
    predictions when there are some and the criterion is in training mode, and reported as zeros
    otherwise (evaluation, a batch without objects) whenever ``weight_dict`` weighs them, i.e. for a
    model trained with denoising. Encoder proposals (``enc_outputs`` of a two-stage model) are matched to
    the targets with every label set to class 0, in training and evaluation alike, under ``_enc`` keys.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 focal_alpha: float, log_xy_hw: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.focal_alpha = focal_alpha
        self.log_xy_hw = log_xy_hw
        self.reports_dn_losses = "tgt_loss_ce" in weight_dict

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
        layer_outputs = outputs.get("aux_outputs", []) + [outputs]
        suffixes = layer_loss_suffixes(len(layer_outputs))
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
        if "enc_outputs" in outputs:
            # Objectness of the encoder proposals: the original scores them with class 0 of a full class head
            # and trains that column only (all targets relabelled 0; the other columns are all negatives).
            enc_targets = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
            (enc_match,) = self.flatten_matches(self.matcher.match_layers([outputs["enc_outputs"]], enc_targets),
                                                sizes, device)
            enc_losses = self.layer_losses(outputs["enc_outputs"], enc_match, torch.zeros_like(tgt_labels), tgt_boxes,
                                           target_lengths, num_boxes, log=False)
            losses.update({name + "_enc": value for name, value in enc_losses.items()})
        if self.reports_dn_losses:
            dn_predictions = outputs.get("dn_outputs") if self.training else None  # evaluation: zeros
            losses.update(dn_losses(outputs.get("dn_meta"), dn_predictions, len(layer_outputs), self.focal_alpha,
                                    device))
        return losses


def build_weight_dict(args, num_decoder_layers: int, denoising: bool, dn_class_loss_coef: float,
                      aux_loss: bool, encoder_losses: bool = False) -> Dict[str, float]:
    """Weight of every loss key the criterion sums: matching terms and, with ``denoising``, their
    ``tgt_`` counterparts, for the last layer and (with ``aux_loss``) every auxiliary layer and, with
    ``encoder_losses``, the encoder proposals (``_enc``)."""
    base = dict(zip(MATCHING_LOSS_NAMES, (args.cls_loss_coef, args.bbox_loss_coef, args.giou_loss_coef)))
    if denoising:
        base.update({"tgt_loss_ce": dn_class_loss_coef, "tgt_loss_bbox": args.bbox_loss_coef,
                     "tgt_loss_giou": args.giou_loss_coef})
    suffixes = [""] + (layer_loss_suffixes(num_decoder_layers)[:-1] if aux_loss else [])
    # The original weighs the encoder losses only through the auxiliary-loss copies (and also makes
    # tgt_*_enc copies, which no loss uses).
    if aux_loss and encoder_losses:
        suffixes.append("_enc")
    return {name + suffix: coef for suffix in suffixes for name, coef in base.items()}
