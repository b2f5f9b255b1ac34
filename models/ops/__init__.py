"""Pure-PyTorch operators: multi-scale deformable attention."""
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core, spatial_shapes_as_list

__all__ = ["MSDeformAttn", "ms_deform_attn_core", "spatial_shapes_as_list"]
