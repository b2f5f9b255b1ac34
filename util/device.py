"""Choosing the device a run uses."""
from typing import Optional

import torch


def resolve_device(name: Optional[str]) -> torch.device:
    """``--device``: CUDA when available if not given; a device this machine lacks is a clear error."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device
