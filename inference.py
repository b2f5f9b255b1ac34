"""Detect objects in images with a trained DN-DETR checkpoint; writes drawn detections and a COCO results file.

    python inference.py --resume outputs/run/checkpoint.pth --images photo.jpg more_photos/ --output_dir out
    python inference.py --resume ckpt.pth --config configs/dn_dab_detr_r50.py --images val2017/ \\
        --output_dir out --threshold 0.5 --device cuda --batch_size 8

Network flags come from the checkpoint's recorded ``args`` and its tensors where neither the command line nor
``--config`` sets them (``model_loading.load_model_for_inference``); every ``main.py`` flag is accepted. The
backbone's ImageNet weights are never downloaded (the checkpoint replaces every weight) and the checkpoint is
loaded strictly: its EMA weights (``ema_model``) when it has them, unless ``--no-ema_weights``. Images get the evaluation transform (short side ``--val_scale``, long side capped at
``--max_size``, ImageNet normalisation), are batched ``--batch_size`` at a time, and run in eval mode
(no denoising queries).

Inputs: each ``--images`` entry is an image file or a folder, whose files with an image extension are
taken in name order. A file that cannot be read as an image (corrupt, truncated, not an image) or a
missing path is reported by name and skipped; the exit status is 0 when at least one image was processed.
Images are used as stored (no EXIF rotation), like the training data.

Outputs in ``--output_dir``:

* ``<stem>.png`` per image: the original image at its original resolution with every detection whose
  score is >= ``--threshold`` (box, class name, score); duplicate stems get ``_1``, ``_2``... suffixes;
* ``detections.json``: a COCO results list with the same detections (score >= ``--threshold``, i.e. all of
  the model's top-k when the threshold is 0), each ``{"image_id", "file_name", "category_id",
  "bbox": [x, y, w, h] in original pixels, "score"}``. Boxes are clipped to the image. ``image_id`` is the
  numeric file stem (``000000000139.jpg`` -> 139) when every input has a distinct numeric stem, otherwise
  the image's position (from 0) in the input order;
* ``info.txt``: the log (progress, timing, skipped files).

Class names come from ``--ann_file`` or ``--coco_path``'s ``annotations/instances_val2017.json``, else the
COCO-2017 names for 91-class models, else ``class N``.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from PIL import Image

from cli import exit_on_user_errors, get_args_parser
from datasets import coco_split_paths
from datasets.coco import category_names_from_annotations
from datasets.transforms import make_coco_transforms
from engine import autocast
from model_loading import load_model_for_inference
from util.checkpoint import CheckpointError
from util.compile import compile_model
from util.config import parse_args
from util.device import resolve_device
from util.logger import setup_logger
from util.misc import nested_tensor_from_tensor_list
from util.coco_categories import default_category_names
from util.visualization import detection_boxes, draw_boxes, enlarge_for_display

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
RESULTS_FILE = "detections.json"


def get_inference_parser() -> argparse.ArgumentParser:
    """``main.py``'s parser (every model and data flag) plus the inference inputs."""
    parser = get_args_parser()
    parser.prog = "inference.py"
    parser.description = "Run a trained DN-DETR checkpoint (--resume) on images and draw the detections."
    group = parser.add_argument_group("inference")
    group.add_argument("--images", nargs="+", default=None, metavar="IMG_OR_DIR",
                       help="image files and/or folders of images (required)")
    group.add_argument("--threshold", type=float, default=0.3,
                       help="keep detections with score >= this in the drawings and detections.json")
    group.add_argument("--ann_file", type=str, default=None,
                       help="COCO annotation file whose 'categories' name the classes (instead of --coco_path)")
    group.add_argument("--display_size", type=int, default=640,
                       help="enlarge drawings of smaller images to this long side so captions stay legible "
                            "(0: never; detections.json is always in original pixels)")
    return parser


def parse_inference_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = get_inference_parser()
    args = parse_args(parser, argv)
    if not args.resume:
        parser.error("--resume CHECKPOINT is required: the trained model to run")
    if not args.images:
        parser.error("--images IMG_OR_DIR [...] is required")
    if not args.output_dir:
        parser.error("--output_dir is required: where the drawn images and detections.json go")
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold {args.threshold}: scores are probabilities, use a value in [0, 1]")
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size} must be >= 1")
    return args


def collect_image_paths(inputs: Sequence[str], logger) -> List[Path]:
    """Files given directly, and the image-extension files of folders (name order); missing paths are reported."""
    paths = []
    for entry in map(Path, inputs):
        if entry.is_dir():
            files = sorted(p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
            images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
            if len(images) < len(files):
                logger.info(f"{entry}: ignoring {len(files) - len(images)} files without an image extension")
            paths.extend(images)
        elif entry.is_file():
            paths.append(entry)
        else:
            logger.warning(f"skipping {entry}: no such file or folder")
    return paths


def assign_image_ids(paths: Sequence[Path]) -> List[int]:
    """Numeric file stems when they are all numeric and distinct (COCO file names), else input positions."""
    stems = [p.stem for p in paths]
    if stems and all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(paths)))


def output_names(paths: Sequence[Path]) -> List[str]:
    """``<stem>.png`` per input, made unique with ``_1``, ``_2``... suffixes."""
    used, names = set(), []
    for path in paths:
        name, suffix = f"{path.stem}.png", 0
        while name in used:
            suffix += 1
            name = f"{path.stem}_{suffix}.png"
        used.add(name)
        names.append(name)
    return names


def read_image(path: Path) -> Image.Image:
    """The image as RGB; raises ``OSError`` naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise OSError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error


@dataclass
class LoadedImage:
    path: Path
    image_id: int
    output_name: str
    image: Image.Image  # original, RGB
    tensor: torch.Tensor  # [3, H', W'] resized and normalised


def iterate_batches(paths: Sequence[Path], image_ids: Sequence[int], names: Sequence[str], transform,
                    batch_size: int, logger) -> Iterator[List[LoadedImage]]:
    """Readable images in input order, ``batch_size`` at a time; unreadable ones are reported and skipped."""
    batch = []
    for path, image_id, name in zip(paths, image_ids, names):
        try:
            image = read_image(path)
        except OSError as error:
            logger.warning(f"skipping {error}")
            continue
        tensor, _ = transform(image, None)
        batch.append(LoadedImage(path, image_id, name, image, tensor))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def load_model(args: argparse.Namespace, logger):
    """The checkpoint's network in eval mode on ``args.device`` and its post-processor."""
    try:
        model, postprocessor, _ = load_model_for_inference(args, logger)
    except (FileNotFoundError, CheckpointError) as error:
        raise SystemExit(f"inference.py: error: {error}") from None
    device = resolve_device(args.device)
    model.to(device)
    logger.info(f"Running on {device}")
    if args.compile:
        model = compile_model(model, logger)
    return model, postprocessor, device


def resolve_category_names(args: argparse.Namespace) -> Dict[int, str]:
    if args.ann_file:
        return category_names_from_annotations(args.ann_file)
    if args.coco_path:
        return category_names_from_annotations(coco_split_paths(args.coco_path, "val")[1])
    return default_category_names(args.num_classes)


def coco_results(item: LoadedImage, boxes_xyxy: torch.Tensor, labels: torch.Tensor,
                 scores: torch.Tensor) -> List[dict]:
    """COCO results entries (xywh boxes) of one image's kept detections."""
    xywh = torch.cat([boxes_xyxy[:, :2], boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]], dim=1)
    return [{"image_id": item.image_id, "file_name": item.path.name, "category_id": int(label),
             "bbox": [round(float(v), 2) for v in box], "score": float(score)}
            for box, label, score in zip(xywh, labels, scores)]


@torch.no_grad()
def detect(model, postprocessor, batch: List[LoadedImage], device: torch.device, amp: bool):
    """Per image ``(boxes xyxy clipped to the original image, labels, scores)`` on the CPU, best first."""
    samples = nested_tensor_from_tensor_list([item.tensor for item in batch]).to(device)
    orig_sizes = torch.tensor([[item.image.height, item.image.width] for item in batch], device=device)
    with autocast(device, amp):
        outputs = model(samples)
    results = []
    for item, result in zip(batch, postprocessor(outputs, orig_sizes)):
        boxes = result["boxes"].cpu()
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, item.image.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, item.image.height)
        results.append((boxes, result["labels"].cpu(), result["scores"].cpu()))
    return results


@dataclass
class InferenceSummary:
    processed: int
    skipped: int
    detections: List[dict]


def run_inference(args: argparse.Namespace, logger) -> InferenceSummary:
    output_dir = Path(args.output_dir)
    model, postprocessor, device = load_model(args, logger)
    try:
        names = resolve_category_names(args)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"inference.py: error: class names: {error}") from None
    transform = make_coco_transforms("val", args)

    paths = collect_image_paths(args.images, logger)
    image_ids, out_names = assign_image_ids(paths), output_names(paths)
    inputs = {p.resolve() for p in paths}
    clashes = [name for name in out_names if (output_dir / name).resolve() in inputs]
    if clashes:
        raise SystemExit(f"inference.py: error: --output_dir {output_dir} would overwrite input images "
                         f"{clashes[:5]}; choose another folder")
    logger.info(f"{len(paths)} input files, batch size {args.batch_size}, threshold {args.threshold}")

    detections, processed, model_seconds, start = [], 0, 0.0, time.perf_counter()
    for batch in iterate_batches(paths, image_ids, out_names, transform, args.batch_size, logger):
        batch_start = time.perf_counter()
        results = detect(model, postprocessor, batch, device, args.amp)
        model_seconds += time.perf_counter() - batch_start
        for item, (boxes, labels, scores) in zip(batch, results):
            keep = scores >= args.threshold
            boxes, labels, scores = boxes[keep], labels[keep], scores[keep]
            shown, scale = enlarge_for_display(item.image, args.display_size)
            draw_boxes(shown, detection_boxes(boxes * scale, labels, scores, names)).save(output_dir / item.output_name)
            detections.extend(coco_results(item, boxes, labels, scores))
            logger.info(f"{item.path.name}: {len(scores)} detections >= {args.threshold} -> {item.output_name}")
        processed += len(batch)
        logger.info(f"[{processed}/{len(paths)}] batch of {len(batch)} in {time.perf_counter() - batch_start:.2f}s")

    (output_dir / RESULTS_FILE).write_text(json.dumps(detections))
    elapsed = time.perf_counter() - start
    skipped = len(paths) - processed
    per_image = f", model {1000 * model_seconds / processed:.1f} ms/image" if processed else ""
    logger.info(f"Done: {processed} images processed, {skipped} skipped, {len(detections)} detections in "
                f"{output_dir / RESULTS_FILE}; {elapsed:.2f}s total{per_image}")
    return InferenceSummary(processed, skipped, detections)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_inference_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(output_dir, name="inference")
    logger.info("Command: " + " ".join(sys.argv if argv is None else ["inference.py", *argv]))
    summary = run_inference(args, logger)
    if summary.processed == 0:
        logger.error("no image could be processed (see the warnings above)")
        return 1
    return 0


if __name__ == "__main__":
    with exit_on_user_errors("inference.py"):
        sys.exit(main())
