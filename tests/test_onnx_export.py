"""scripts/export_onnx.py for every registered model: ONNX Runtime on the CPU against PyTorch, two image sizes."""
import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from models import build_model
from models.registry import MODELS
from tests.model_utils import tiny_args
from util.checkpoint import save_checkpoint
from util.misc import nested_tensor_from_tensor_list

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("export_onnx", ROOT / "scripts" / "export_onnx.py")
export_onnx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_onnx)

# One encoder and one decoder layer: the export time grows with the graph, and one of each exercises
# every operator (the deformable models keep their 4 feature levels).
SMALL = ("--enc_layers", "1", "--dec_layers", "1")
SIZES = [(96, 128), (144, 80)]  # both sides vary; neither is the traced example's
# The zoo configuration of a model where it differs from the defaults in what the graph computes.
ZOO_FLAGS = {"dn_dab_dino_deformable_detr": ("--two_stage", "--use_mqs", "--use_lft")}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("modelname", sorted(MODELS))
def test_onnx_runtime_matches_pytorch_on_two_image_sizes(modelname, tmp_path):
    torch.manual_seed(0)
    args = tiny_args(modelname, *SMALL, *ZOO_FLAGS.get(modelname, ()))
    model, _, postprocessors = build_model(args)
    model.eval()
    checkpoint = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": model.state_dict(), "args": vars(args), "epoch": 0}, checkpoint)
    path = tmp_path / "model.onnx"

    export_onnx.main(["--resume", str(checkpoint), "--output", str(path), "--postprocess", "--val_scale", "96"])

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images", "orig_sizes"]
    assert [o.name for o in graph.output] == ["pred_logits", "pred_boxes", "scores", "labels", "boxes"]
    batch, _, height, width = graph.input[0].type.tensor_type.shape.dim
    assert batch.dim_value == 1 and all(d.dim_param and not d.dim_value for d in (height, width))  # symbolic

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for height, width in SIZES:
        images = [torch.randn(3, height, width, generator=generator)]
        orig_sizes = torch.tensor([[2 * height, 3 * width]])
        with torch.no_grad():
            expected = model(nested_tensor_from_tensor_list(images))
            detections = postprocessors["bbox"](expected, orig_sizes)
        logits, boxes, scores, labels, xyxy = session.run(
            None, {"images": torch.stack(images).numpy(), "orig_sizes": orig_sizes.numpy()})
        np.testing.assert_allclose(logits, expected["pred_logits"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(boxes, expected["pred_boxes"].numpy(), atol=1e-4, rtol=0)
        for image, detection in enumerate(detections):
            np.testing.assert_allclose(scores[image], detection["scores"].numpy(), atol=1e-4, rtol=0)
            # Near-equal scores of an untrained model may come out in another order: match each detection.
            for score, label, box in zip(scores[image], labels[image], xyxy[image]):
                same = ((np.abs(detection["scores"].numpy() - score) < 1e-4) & (detection["labels"].numpy() == label)
                        & (np.abs(detection["boxes"].numpy() - box).max(axis=1) < 1e-2))  # boxes in pixels
                assert same.any(), (score, label, box)
