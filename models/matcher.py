"""Hungarian matching between predictions and ground truth."""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

MatchIndices = List[Tuple[torch.Tensor, torch.Tensor]]  # per image: (query indices, target indices)


class NonFinitePredictionError(RuntimeError):
    """Predicted boxes or logits to be matched are NaN or infinite (a diverged model)."""


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class * focal cost + w_bbox * L1 + w_giou * (-GIoU)``."""

    def __init__(self, cost_class: float = 2, cost_bbox: float = 5, cost_giou: float = 2, focal_alpha: float = 0.25):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0 (--set_cost_class/--set_cost_bbox/--set_cost_giou)")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha

    @torch.no_grad()
    def cost_matrix(self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor,
                    tgt_labels: torch.Tensor, tgt_boxes: torch.Tensor) -> torch.Tensor:
        """Costs of predictions ``[M, C]``/``[M, 4]`` against all targets of the batch -> ``[M, N]``.

        A prediction with a non-finite box or logit gets non-finite costs (its box is not passed to
        ``generalized_box_iou``, whose degenerate-box check would fail, on CUDA with a device-side assert).
        """
        prob = pred_logits.float().sigmoid()
        alpha, gamma = self.focal_alpha, 2.0
        neg_cost = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
        pos_cost = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_labels] - neg_cost[:, tgt_labels]
        pred_boxes, tgt_boxes = pred_boxes.float(), tgt_boxes.float()
        cost_bbox = torch.cdist(pred_boxes, tgt_boxes, p=1)
        finite = pred_boxes.isfinite().all(-1, keepdim=True)  # [M, 1]
        safe_boxes = torch.where(finite, pred_boxes, torch.full_like(pred_boxes, 0.5))
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(safe_boxes), box_cxcywh_to_xyxy(tgt_boxes))
        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return cost.masked_fill(~finite, float("nan"))

    @torch.no_grad()
    def match_layers(self, layer_outputs: Sequence[Dict[str, torch.Tensor]],
                     targets: Sequence[Dict[str, torch.Tensor]]) -> List[MatchIndices]:
        """Match every decoder layer's outputs independently, with one device-to-host copy in total.

        ``layer_outputs[l]`` holds ``pred_logits [B, Q, C]`` and ``pred_boxes [B, Q, 4]``. Raises
        :class:`NonFinitePredictionError` if a prediction is not finite while there are targets (detected on
        the host copy of the costs, so without a further device sync).
        """
        sizes = [len(t["boxes"]) for t in targets]
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets])
        batch, num_queries = layer_outputs[0]["pred_logits"].shape[:2]
        costs = torch.stack([
            self.cost_matrix(out["pred_logits"].flatten(0, 1), out["pred_boxes"].flatten(0, 1), tgt_labels, tgt_boxes)
            for out in layer_outputs
        ]).view(len(layer_outputs), batch, num_queries, -1).cpu()  # [L, B, Q, N]
        check_finite(costs)
        matches = []
        for layer_costs in costs:
            indices = []
            for image_id, image_costs in enumerate(layer_costs.split(sizes, dim=-1)):
                query_ids, target_ids = linear_sum_assignment(image_costs[image_id])
                indices.append((torch.as_tensor(query_ids, dtype=torch.int64),
                                torch.as_tensor(target_ids, dtype=torch.int64)))
            matches.append(indices)
        return matches

    def forward(self, outputs: Dict[str, torch.Tensor], targets) -> MatchIndices:
        """Match one layer: ``outputs`` holds ``pred_logits [B, Q, C]`` and ``pred_boxes [B, Q, 4]``."""
        return self.match_layers([outputs], targets)[0]


def check_finite(costs: torch.Tensor) -> None:
    """Raise :class:`NonFinitePredictionError` naming the layers whose costs ``[L, B, Q, N]`` are not all finite."""
    if costs.isfinite().all():
        return
    bad_layers = (~costs.isfinite()).flatten(1).any(1).nonzero().flatten().tolist()
    raise NonFinitePredictionError(f"NaN or infinite predicted boxes or class logits in layers {bad_layers} of the "
                                   f"{len(costs)} matched")


def build_matcher(args, focal_alpha: float) -> HungarianMatcher:
    return HungarianMatcher(args.set_cost_class, args.set_cost_bbox, args.set_cost_giou, focal_alpha)
