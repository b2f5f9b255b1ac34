"""Box conversions and pairwise (generalised) IoU.

Boxes are ``(cx, cy, w, h)`` or ``(x0, y0, x1, y1)``. The ``+1e-6`` terms in the IoU and GIoU
denominators are part of the original release's numerics and must stay.
"""
import torch


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Area of xyxy boxes ``[..., 4]`` -> ``[...]``."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _iou_union_enclosing(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """IoU, union and enclosing-box area of two broadcastable xyxy box tensors ``[..., 4]``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    overlap = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = overlap[..., 0] * overlap[..., 1]
    union = area1 + area2 - inter
    hull = (torch.max(boxes1[..., 2:], boxes2[..., 2:]) - torch.min(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    return inter / (union + 1e-6), union, hull[..., 0] * hull[..., 1]


def _check_boxes(boxes1: torch.Tensor, boxes2: torch.Tensor) -> None:
    """Degenerate boxes (x1 < x0 or y1 < y0, e.g. from NaN predictions) fail an assertion instead of
    silently producing garbage; the check is asynchronous, so it costs no host-device sync."""
    torch._assert_async((boxes1[..., 2:] >= boxes1[..., :2]).all(), "generalized_box_iou: degenerate boxes1")
    torch._assert_async((boxes2[..., 2:] >= boxes2[..., :2]).all(), "generalized_box_iou: degenerate boxes2")


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor):
    """Pairwise IoU of xyxy boxes ``[N, 4]`` x ``[M, 4]`` -> (iou ``[N, M]``, union ``[N, M]``)."""
    iou, union, _ = _iou_union_enclosing(boxes1[:, None], boxes2[None])
    return iou, union


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise generalised IoU (https://giou.stanford.edu/) of xyxy boxes ``[N, 4]`` x ``[M, 4]`` -> ``[N, M]``."""
    _check_boxes(boxes1, boxes2)
    iou, union, enclosing = _iou_union_enclosing(boxes1[:, None], boxes2[None])
    return iou - (enclosing - union) / (enclosing + 1e-6)


def elementwise_generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matched pairs of xyxy boxes ``[N, 4]`` x ``[N, 4]`` -> ``[N]``.

    Equal to the diagonal of :func:`generalized_box_iou` without building the ``N x N`` matrix.
    """
    _check_boxes(boxes1, boxes2)
    iou, union, enclosing = _iou_union_enclosing(boxes1, boxes2)
    return iou - (enclosing - union) / (enclosing + 1e-6)
