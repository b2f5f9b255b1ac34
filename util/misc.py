"""Batching helpers: padded image batches with their padding mask, and the detection collate."""
from typing import List, Optional, Sequence

import torch


class NestedTensor:
    """A batch of zero-padded images ``tensors [B, C, H, W]`` and ``mask [B, H, W]`` (True = padding)."""

    def __init__(self, tensors: torch.Tensor, mask: Optional[torch.Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device, non_blocking: bool = False) -> "NestedTensor":
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    def decompose(self):
        return self.tensors, self.mask

    @property
    def device(self) -> torch.device:
        return self.tensors.device

    def __repr__(self) -> str:
        return f"NestedTensor(tensors={tuple(self.tensors.shape)}, mask={tuple(self.mask.shape)})"


def nested_tensor_from_tensor_list(tensor_list: Sequence[torch.Tensor]) -> NestedTensor:
    """Pad ``[C, H_i, W_i]`` images at the bottom/right to ``[B, C, max H, max W]``."""
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: empty list of images")
    if any(img.dim() != 3 for img in tensor_list):
        shapes = [tuple(img.shape) for img in tensor_list]
        raise ValueError(f"nested_tensor_from_tensor_list: expected [C, H, W] images, got shapes {shapes}")
    channels = tensor_list[0].shape[0]
    max_h = max(img.shape[1] for img in tensor_list)
    max_w = max(img.shape[2] for img in tensor_list)
    first = tensor_list[0]
    tensors = first.new_zeros((len(tensor_list), channels, max_h, max_w))
    mask = torch.ones((len(tensor_list), max_h, max_w), dtype=torch.bool, device=first.device)
    for img, padded, pad_mask in zip(tensor_list, tensors, mask):
        padded[:, : img.shape[1], : img.shape[2]].copy_(img)
        pad_mask[: img.shape[1], : img.shape[2]] = False
    return NestedTensor(tensors, mask)


def to_nested_tensor(samples) -> NestedTensor:
    """Accept a NestedTensor, a list of ``[C, H, W]`` tensors or a ``[B, C, H, W]`` tensor."""
    if isinstance(samples, NestedTensor):
        return samples
    if isinstance(samples, torch.Tensor) and samples.dim() == 4:
        samples = list(samples)
    return nested_tensor_from_tensor_list(samples)


def collate_fn(batch: List[tuple]):
    """Collate ``(image, target)`` pairs into ``(NestedTensor, tuple of targets)``."""
    images, targets = zip(*batch)
    return nested_tensor_from_tensor_list(images), targets


@torch.no_grad()
def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> List[torch.Tensor]:
    """Top-k accuracy in percent; an empty target gives 0 (so a class error of 100)."""
    if target.numel() == 0:
        return [torch.zeros((), device=output.device)]
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / batch_size) for k in topk]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Clamped logit, as the original release computes it. ``eps = 1e-3`` saturates at about +-6.9068; that is intended."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
