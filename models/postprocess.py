"""Convert model outputs into COCO-style detections."""
from typing import Dict, List

import torch
from torch import nn

from util.box_ops import box_cxcywh_to_xyxy


class PostProcess(nn.Module):
    """Top-``num_select`` (query, class) pairs by sigmoid score; boxes in absolute xyxy pixels."""

    def __init__(self, num_select: int = 300):
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], target_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """``target_sizes [B, 2]`` holds each image's (height, width), normally its original size."""
        logits = outputs["pred_logits"]
        if len(logits) != len(target_sizes):
            raise ValueError(f"PostProcess: {len(logits)} predictions but {len(target_sizes)} target sizes")
        scores, labels, boxes = self.select(logits, outputs["pred_boxes"], target_sizes)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]

    def select(self, logits: torch.Tensor, boxes: torch.Tensor, target_sizes: torch.Tensor):
        """The batched detections: ``scores [B, K]``, ``labels [B, K]`` and ``boxes [B, K, 4]`` (xyxy pixels),
        best first, ``K = min(num_select, Q * C)`` (also what an exported graph computes)."""
        batch, num_queries, num_classes = logits.shape
        prob = logits.float().sigmoid().reshape(batch, num_queries * num_classes)
        scores, flat_index = prob.topk(min(self.num_select, num_queries * num_classes), dim=1)
        query_index = flat_index // num_classes
        labels = flat_index % num_classes
        boxes = torch.gather(box_cxcywh_to_xyxy(boxes.float()), 1, query_index[..., None].expand(-1, -1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1).to(boxes.dtype)  # [B, 4]
        return scores, labels, boxes * scale[:, None, :]
