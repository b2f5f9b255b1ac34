"""Box utilities (spec §1.5) against hand-computed values, including the +1e-6 denominators."""
import pytest
import torch

from util.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                          elementwise_generalized_box_iou, generalized_box_iou)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_conversions():
    cxcywh = _t([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = _t([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    batched = torch.rand(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched)
    torch.testing.assert_close(box_area(xyxy), _t([0.2 * 0.4, 24.0]))


def test_iou_overlapping_disjoint_nested():
    a = _t([[0, 0, 2, 2]])
    b = _t([[1, 1, 3, 3], [5, 5, 6, 6], [0.5, 0.5, 1.5, 1.5], [0, 0, 2, 2]])
    iou, union = box_iou(a, b)
    # overlap 1 / union 7; disjoint; nested 1 / 4; identical 4 / 4 -- each with the +1e-6.
    torch.testing.assert_close(iou, _t([[1 / (7 + 1e-6), 0.0, 1 / (4 + 1e-6), 4 / (4 + 1e-6)]]))
    torch.testing.assert_close(union, _t([[7.0, 5.0, 4.0, 4.0]]))
    assert iou.shape == (1, 4)


def test_epsilon_terms_dominate_for_tiny_boxes():
    tiny = _t([[0, 0, 1e-3, 1e-3]])  # area 1e-6, the size of the epsilon
    iou, _ = box_iou(tiny, tiny)
    assert iou.item() == pytest.approx(0.5, rel=1e-9)  # 1e-6 / (1e-6 + 1e-6)
    assert generalized_box_iou(tiny, tiny).item() == pytest.approx(0.5, rel=1e-9)  # enclosing = union: no penalty


def test_generalized_iou_hand_values():
    a = _t([[0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 2, 2]])
    b = _t([[2, 0, 3, 1], [1, 1, 2, 2], [1, 1, 3, 3]])
    giou = generalized_box_iou(a, b)
    disjoint = 0.0 - (3 - 2) / (3 + 1e-6)  # enclosing [0,0,3,1] area 3, union 2
    nested = 1 / (16 + 1e-6) - (16 - 16) / (16 + 1e-6)  # enclosing = outer box
    overlapping = 1 / (7 + 1e-6) - (9 - 7) / (9 + 1e-6)  # enclosing [0,0,3,3] area 9
    torch.testing.assert_close(giou.diagonal(), _t([disjoint, nested, overlapping]))
    # Off-diagonal pair, a[0] = [0,0,1,1] vs b[1] = [1,1,2,2]: touching corners, enclosing area 4, union 2.
    torch.testing.assert_close(giou[0, 1], _t(0.0 - (4 - 2) / (4 + 1e-6)))
    torch.testing.assert_close(elementwise_generalized_box_iou(a, b), giou.diagonal())
    far = generalized_box_iou(_t([[0, 0, 1, 1]]), _t([[99, 99, 100, 100]])).item()
    assert -1 < far < -0.999


def test_generalized_iou_rejects_degenerate_boxes():
    good = _t([[0, 0, 1, 1]])
    with pytest.raises(RuntimeError, match="degenerate"):
        generalized_box_iou(_t([[1, 0, 0, 1]]), good)
    with pytest.raises(RuntimeError, match="degenerate"):
        generalized_box_iou(good, _t([[0, 0, float("nan"), 1]]))
