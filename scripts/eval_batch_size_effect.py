"""How much COCO AP depends on the evaluation batch size, and whether zero padding explains all of it.

    python scripts/eval_batch_size_effect.py --resume outputs/demo/checkpoint.pth --coco_path data/synthetic \
        --batch_sizes 1 2 8 --out docs/results/eval_batch_size_effect.json

A batch is zero-padded at the bottom/right to its largest image, and the CNN backbone sees the padding:
activations near the padded border change, so an image's detections depend on its batch mates. For each
batch size this evaluates the validation set twice, with the images in dataset order (batch mates of
different sizes: padding, as ``main.py`` evaluates) and grouped by their size after the transforms (batch
mates of equal size: no padding), and reports the 12 COCO numbers of each. If padding is the only
cause, every grouped run gives the batch-1 AP exactly (up to float rounding in the batched kernels).
"""
import argparse
import json
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import get_args_parser  # noqa: E402
from datasets import build_dataset, get_coco_api_from_dataset  # noqa: E402
from engine import evaluate  # noqa: E402
from model_loading import load_model_for_inference  # noqa: E402
from models import build_model  # noqa: E402
from util.device import resolve_device  # noqa: E402
from util.misc import collate_fn  # noqa: E402


def image_sizes(dataset) -> List[tuple]:
    """``(H, W)`` of every image of ``dataset`` after the transforms (each image decoded once)."""
    return [tuple(dataset[index][0].shape[-2:]) for index in range(len(dataset))]


def size_grouped_batches(sizes: List[tuple], batch_size: int) -> List[List[int]]:
    """Image indices in batches whose images share one size (no padding)."""
    by_size: Dict[tuple, List[int]] = defaultdict(list)
    for index, size in enumerate(sizes):
        by_size[size].append(index)
    return [indices[i:i + batch_size] for indices in by_size.values() for i in range(0, len(indices), batch_size)]


def evaluate_ap(model, criterion, postprocessors, dataset, batch_sampler, device, logger) -> List[float]:
    loader = DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=0)
    stats, _ = evaluate(model, criterion, postprocessors, loader, get_coco_api_from_dataset(dataset), device,
                        logger=logger)
    return stats["coco_eval_bbox"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, parents=[get_args_parser()], add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, conflict_handler="resolve")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if not args.resume:
        raise SystemExit("--resume CHECKPOINT is required: the model to evaluate")
    logging.basicConfig(level=logging.WARNING)
    logger = logging.getLogger("eval_batch_size_effect")
    device = resolve_device(args.device)
    model, _, _ = load_model_for_inference(args, logger)
    _, criterion, postprocessors = build_model(args)  # the criterion of the checkpoint's settings
    model.to(device)
    dataset = build_dataset("val", args)
    sizes = image_sizes(dataset)

    results = []
    for batch_size in args.batch_sizes:
        in_order = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
        for layout, batches in (("dataset order (padding)", in_order),
                                ("grouped by size (no padding)", size_grouped_batches(sizes, batch_size))):
            ap = evaluate_ap(model, criterion, postprocessors, dataset, batches, device, logger)
            padded = sum(len({sizes[i] for i in batch}) > 1 for batch in batches)
            results.append({"batch_size": batch_size, "layout": layout, "batches": len(batches),
                            "batches_with_padding": padded, "coco_eval_bbox": ap})
            print(f"batch {batch_size:>3}  {layout:<30} AP {100 * ap[0]:.2f}  AP50 {100 * ap[1]:.2f}  "
                  f"AP75 {100 * ap[2]:.2f}  ({padded}/{len(batches)} batches padded)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "checkpoint": args.resume,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
