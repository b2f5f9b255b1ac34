"""The previous multi-scale deformable attention core, one ``F.grid_sample`` per level, kept as a reference.

``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) is PyTorch's own bilinear sampler; its
autograd gives the exact gradients of the quantity the official CUDA kernel computes. The op in
``models/ops/ms_deform_attn.py`` must agree with this function (values and gradients). The function lives
in that module (``grid_sample_msda``) because exported graphs (ONNX) use it in place of the custom op.
"""
from models.ops.ms_deform_attn import grid_sample_msda

__all__ = ["grid_sample_msda"]
