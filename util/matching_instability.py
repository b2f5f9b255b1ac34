"""Matching instability (IS, the DN-DETR paper's measure of how unstable bipartite matching is).

After epoch ``i``, every matching query ``n`` of a probe image is assigned ``V^i_n = m`` when the Hungarian
matcher pairs it with ground-truth object ``m`` of that image, and ``-1`` when it is paired with nothing.
The instability of epoch ``i`` counts the queries whose assignment changed since epoch ``i - 1``,
``IS^i = sum_n 1[V^i_n != V^{i-1}_n]``, averaged over the probe images. One object that moves from one query
to another changes two assignments, so the per-object version divides each image's count by its number of
objects (images without objects are left out of that average).
"""
from typing import Dict, Sequence

import torch

from models.matcher import MatchIndices

UNMATCHED = -1


def assignment_from_matches(matches: MatchIndices, num_queries: int) -> torch.Tensor:
    """``[B, num_queries]`` int64: the matched ground-truth index of each query, ``UNMATCHED`` for the rest."""
    assignment = torch.full((len(matches), num_queries), UNMATCHED, dtype=torch.int64)
    for image, (query_ids, target_ids) in enumerate(matches):
        assignment[image, query_ids] = target_ids
    return assignment


def matching_instability(previous: torch.Tensor, current: torch.Tensor,
                         num_objects: Sequence[int]) -> Dict[str, float]:
    """IS between two assignments ``[N, Q]`` of the same ``N`` probe images with ``num_objects`` objects each.

    Returns ``matching_instability`` (changed assignments per image) and ``matching_instability_per_object``
    (the same count divided by the image's objects, averaged over the images that have objects).
    """
    if previous.shape != current.shape:
        raise ValueError(f"assignments of different shapes: {tuple(previous.shape)} and {tuple(current.shape)}; "
                         "the probe images and --num_queries must stay the same across epochs")
    changed = (previous != current).sum(dim=1).double()  # [N]
    objects = torch.as_tensor(num_objects, dtype=torch.float64)
    has_objects = objects > 0
    per_object = (changed[has_objects] / objects[has_objects]).mean() if has_objects.any() else changed.new_zeros(())
    return {"matching_instability": changed.mean().item(), "matching_instability_per_object": per_object.item()}
