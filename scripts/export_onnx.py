"""Export a trained checkpoint to ONNX: images of any size in, ``pred_logits`` and ``pred_boxes`` out.

    python scripts/export_onnx.py --resume outputs/demo/checkpoint.pth --output outputs/demo/model.onnx
    python scripts/export_onnx.py --resume ckpt.pth --config configs/dn_dab_detr_r50.py --output model.onnx \\
        --postprocess

The network is rebuilt as ``inference.py`` does (flags from the checkpoint or ``--config``, EMA weights
when present unless ``--no-ema_weights``). The graph's input ``images [1, 3, H, W]`` is one image
transformed like an evaluation image (resized, ImageNet-normalised); height and width are free (at least
65 pixels). ``--postprocess`` adds the input ``orig_sizes [1, 2]`` (original height, width) and the
outputs ``scores``, ``labels``, ``boxes`` (top detections, xyxy in original pixels). After writing the
file, ONNX Runtime runs it on two image sizes against PyTorch and the largest difference is logged.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import get_args_parser  # noqa: E402
from model_loading import load_model_for_inference  # noqa: E402
from models.export import ExportableDetector, example_inputs, export_onnx, input_names  # noqa: E402
from util.checkpoint import CheckpointError  # noqa: E402
from util.config import parse_args  # noqa: E402
from util.logger import setup_logger  # noqa: E402


def get_export_parser() -> argparse.ArgumentParser:
    """``main.py``'s parser (every model flag) plus the export options."""
    parser = get_args_parser()
    parser.prog = "export_onnx.py"
    parser.description = "Export a DN-DETR checkpoint (--resume) to ONNX."
    group = parser.add_argument_group("export")
    group.add_argument("--output", required=True, help="the .onnx file to write")
    group.add_argument("--postprocess", action="store_true",
                       help="also output the top detections (scores, labels, xyxy boxes in original pixels); "
                            "adds the input orig_sizes")
    group.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    return parser


def check_sizes(val_scale: int):
    """Two image shapes (1, 3, H, W) to compare ONNX Runtime with PyTorch on, around ``--val_scale``."""
    side = max(val_scale, 96)
    return [(1, 3, side, side + side // 3), (1, 3, side + side // 4, side)]


@torch.no_grad()
def compare_with_onnxruntime(detector: ExportableDetector, path: Path, shapes) -> Dict[str, float]:
    """Largest absolute difference per output between ONNX Runtime (CPU) and PyTorch over ``shapes``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    differences = dict.fromkeys(names, 0.0)
    for shape in shapes:
        inputs = example_inputs(detector, shape)
        expected = detector(*inputs)
        got = session.run(None, {name: value.numpy() for name, value in zip(input_names(detector), inputs)})
        for name, want, value in zip(names, expected, got):
            difference = (torch.from_numpy(value).to(want.dtype) - want).abs().max().item()
            differences[name] = max(differences[name], difference)
    return differences


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    """Export; returns the largest ONNX Runtime vs PyTorch difference per output."""
    args = parse_args(get_export_parser(), argv)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(None, name="export_onnx")
    try:
        model, postprocessor, _ = load_model_for_inference(args, logger)
    except (FileNotFoundError, CheckpointError) as error:
        raise SystemExit(f"export_onnx.py: error: {error}") from None
    detector = ExportableDetector(model, postprocessor if args.postprocess else None).eval()
    start = time.perf_counter()
    export_onnx(detector, output, args.opset)
    logger.info(f"Wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f}s")
    differences = compare_with_onnxruntime(detector, output, check_sizes(args.val_scale))
    logger.info("ONNX Runtime vs PyTorch, largest absolute difference: "
                + ", ".join(f"{name} {value:.2e}" for name, value in differences.items()))
    return differences


if __name__ == "__main__":
    main()
