"""A detector as a graph for ONNX: one image in, named tensors out, any image size.

The graph is captured with ``torch.export`` (the exporter ``torch.onnx.export`` uses by default since
PyTorch 2.9) with the height and width symbolic; the deformable attention is plain PyTorch
(``grid_sample``), so every model exports without custom operators. The batch is one image: images of
different sizes only share a batch padded, with a padding mask, which the graph does not take (and a
symbolic batch size makes the export markedly slower).
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
EXAMPLE_SHAPE = (1, 3, 160, 224)  # the traced example; unequal sides, so that they stay two symbols


class ExportableDetector(nn.Module):
    """``images [1, 3, H, W]`` (transformed like an evaluation image: resized, ImageNet-normalised) ->
    ``pred_logits [1, Q, C]`` and ``pred_boxes [1, Q, 4]`` (normalised cxcywh).

    With a post-processor the graph also takes ``orig_sizes [1, 2]`` (the image's original height, width)
    and returns the top detections ``scores [1, K]``, ``labels [1, K]`` and ``boxes [1, K, 4]`` (xyxy in
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
    """Inputs of ``shape`` for ``detector``: a random image (and its size as original size)."""
    images = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    if detector.postprocessor is None:
        return (images,)
    return images, torch.tensor([shape[2:]] * shape[0])


def input_names(detector: ExportableDetector) -> Tuple[str, ...]:
    return ("images",) if detector.postprocessor is None else ("images", "orig_sizes")


def export_onnx(detector: ExportableDetector, path: Union[str, Path], opset_version: int = 18) -> None:
    """Write ``detector`` (in eval mode, on the CPU) to the ONNX file ``path`` (weights inside the file)."""
    dynamic_shapes = {"images": {2: Dim("height", min=MIN_IMAGE_SIDE), 3: Dim("width", min=MIN_IMAGE_SIDE)}}
    output_names = OUTPUT_NAMES
    if detector.postprocessor is not None:
        dynamic_shapes["orig_sizes"] = None
        output_names += DETECTION_NAMES
    torch.onnx.export(detector.eval(), example_inputs(detector), str(path), input_names=list(input_names(detector)),
                      output_names=list(output_names), dynamic_shapes=dynamic_shapes, opset_version=opset_version,
                      dynamo=True, external_data=False)
