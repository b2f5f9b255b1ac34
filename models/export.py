"""A detector as a graph for ONNX: a batch of images in, named tensors out, any image size.

The graph is captured with ``torch.export`` (the exporter ``torch.onnx.export`` uses by default since
PyTorch 2.9), with the batch size, height and width symbolic; the deformable attention is plain PyTorch
(``grid_sample``), so every model exports without custom operators.
"""
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.export import Dim

from util.misc import NestedTensor

OUTPUT_NAMES = ("pred_logits", "pred_boxes")
DETECTION_NAMES = ("scores", "labels", "boxes")
# The coarsest level of a 4-level deformable model (stride 64) needs at least two cells per side.
MIN_IMAGE_SIDE = 65
# Traced example: a batch of 2 (a batch of 1 would be frozen into the graph), unequal sides.
EXAMPLE_SHAPE = (2, 3, 160, 224)


class ExportableDetector(nn.Module):
    """``images [B, 3, H, W]`` (transformed like evaluation images: resized, ImageNet-normalised; one size
    per batch, no padding) -> ``pred_logits [B, Q, C]`` and ``pred_boxes [B, Q, 4]`` (normalised cxcywh).

    With a post-processor the graph also takes ``orig_sizes [B, 2]`` (each image's original height, width)
    and returns the top detections ``scores [B, K]``, ``labels [B, K]`` and ``boxes [B, K, 4]`` (xyxy in
    original pixels), as ``models.postprocess.PostProcess`` computes them.
    """

    def __init__(self, model: nn.Module, postprocessor: Optional[nn.Module] = None):
        super().__init__()
        self.model = model
        self.postprocessor = postprocessor

    def forward(self, images: torch.Tensor, orig_sizes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
        batch, _, height, width = images.shape
        no_padding = torch.zeros((batch, height, width), dtype=torch.bool, device=images.device)
        outputs = self.model(NestedTensor(images, no_padding))
        predictions = (outputs["pred_logits"], outputs["pred_boxes"])
        if self.postprocessor is None:
            return predictions
        return predictions + self.postprocessor.select(*predictions, orig_sizes)


def example_inputs(detector: ExportableDetector, shape: Sequence[int] = EXAMPLE_SHAPE) -> Tuple[torch.Tensor, ...]:
    """Inputs of ``shape`` for ``detector``: random images (and their size as original size)."""
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if detector.postprocessor is None:
        return (images,)
    return images, torch.tensor([shape[2:]] * shape[0])


def input_names(detector: ExportableDetector) -> Tuple[str, ...]:
    return ("images",) if detector.postprocessor is None else ("images", "orig_sizes")


def export_onnx(detector: ExportableDetector, path: Union[str, Path], opset_version: int = 18) -> None:
    """Write ``detector`` (in eval mode, on the CPU) to the ONNX file ``path`` (weights inside the file)."""
    batch, height, width = Dim("batch", min=1), Dim("height", min=MIN_IMAGE_SIDE), Dim("width", min=MIN_IMAGE_SIDE)
    dynamic_shapes = {"images": {0: batch, 2: height, 3: width}}
    output_names = OUTPUT_NAMES
    if detector.postprocessor is not None:
        dynamic_shapes["orig_sizes"] = {0: batch}
        output_names += DETECTION_NAMES
    torch.onnx.export(detector.eval(), example_inputs(detector), str(path), input_names=list(input_names(detector)),
                      output_names=list(output_names), dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                      dynamo=True, external_data=False)
