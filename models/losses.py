"""Loss terms shared by the matching criterion and the denoising losses."""
from typing import Dict

import torch
import torch.nn.functional as F

from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, normalizer, alpha: float = 0.25,
                       gamma: float = 2) -> torch.Tensor:
    """Focal loss (https://arxiv.org/abs/1708.02002) of logits ``[B, Q, C]`` vs 0/1 targets.

    Reduced as the original release does: mean over the query axis, sum over batch and classes, divided by
    ``normalizer``. Callers multiply by ``Q`` to get the total sum over queries / ``normalizer``.
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss.mean(1).sum() / normalizer


def focal_classification_loss(logits: torch.Tensor, labels: torch.Tensor, normalizer, alpha: float) -> torch.Tensor:
    """Focal loss of logits ``[B, Q, C]`` against class indices ``[B, Q]``, where index ``C`` = no object."""
    batch, num_queries, num_classes = logits.shape
    onehot = logits.new_zeros((batch, num_queries, num_classes + 1))
    onehot.scatter_(2, labels.unsqueeze(-1), 1)
    onehot = onehot[..., :num_classes]  # [B, Q, C]
    return sigmoid_focal_loss(logits, onehot, normalizer, alpha=alpha, gamma=2) * logits.shape[1]


def box_regression_losses(src_boxes: torch.Tensor, target_boxes: torch.Tensor, normalizer) -> Dict[str, torch.Tensor]:
    """L1 and GIoU losses of matched cxcywh box pairs ``[N, 4]``, summed and divided by ``normalizer``."""
    loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")  # [N, 4]
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes))
    return {
        "loss_bbox": loss_bbox.sum() / normalizer,
        "loss_giou": (1 - giou).sum() / normalizer,
        "loss_xy": loss_bbox[:, :2].sum().detach() / normalizer,
        "loss_hw": loss_bbox[:, 2:].sum().detach() / normalizer,
    }
