"""Show what denoising training feeds the decoder for one image: its noised ground-truth queries and the
self-attention mask of the batch (the picture of the paper's Figure 1), made by ``models/dn_components.py``.

    python scripts/visualize_dn.py --coco_path data/synthetic --out dn_vis
    python scripts/visualize_dn.py --coco_path /data/coco --image_id 139 --scalar 5 --box_noise_scale 0.4 --out dn_vis
    python scripts/visualize_dn.py --image /data/coco/val2017/000000000139.jpg \\
        --ann_file /data/coco/annotations/instances_val2017.json --out dn_vis

The image is ``--image_id`` of the ``--image_set`` split of ``--coco_path`` (default: its first image with
objects), or ``--image`` listed in ``--ann_file`` (by file name; the other images of that file must sit
in the same folder, as in any COCO-format split). ``prepare_for_dn`` runs on it as in a training step
(batch of one, a real ``nn.Embedding`` label encoder, ``--seed`` fixing the noise). Writes:

* ``<out>/dn_queries.png``: ground-truth boxes (white, solid) and every noised denoising query, dashed, one
  colour per group, captioned ``g<group> <noised class>`` (``*``: the label was flipped by label noise).
  Images whose long side is below ``--display_size`` are enlarged so the captions stay legible;
* ``<out>/dn_attention_mask.png``: the ``[Q, Q]`` mask, ``Q`` = denoising queries + ``--num_queries``
  matching queries, one ``--cell_size`` square per (query, key) pair, upscaled without smoothing. Rows are
  queries, columns the keys they attend to; dark = blocked, light = visible, tinted with the row's group
  colour; grey lines separate groups, the red line separates denoising from matching queries.
  ``--num_queries`` defaults to 20 (not the model's 300) so that the picture stays readable.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets import coco_split_paths  # noqa: E402
from datasets.coco import CocoDetection, ImageLoadError  # noqa: E402
from datasets.transforms import Compose, Normalize, ToTensor  # noqa: E402
from cli import get_args_parser  # noqa: E402
from models.builder import resolve_num_classes  # noqa: E402
from models.dn_components import DecoderQueries, DNConfig, DNMeta, dn_attention_mask, prepare_for_dn  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from util.visualization import DrawnBox, class_caption, draw_boxes, enlarge_for_display, palette_color  # noqa: E402

EMBED_DIM = 8  # width of the throw-away query content: only the boxes and the mask are shown
GT_COLOR = (255, 255, 255)
BLOCKED_COLOR = (45, 45, 45)
MATCHING_VISIBLE_COLOR = (235, 235, 235)
GROUP_LINE_COLOR = (150, 150, 150)
SPLIT_LINE_COLOR = (220, 30, 30)


@dataclass
class Example:
    image: Image.Image  # original RGB
    image_id: int
    labels: torch.Tensor  # [N] category ids
    boxes: torch.Tensor  # [N, 4] normalised cxcywh
    names: Mapping[int, str]
    num_classes: int  # max category id + 1, as main.py sets --num_classes
    source: str


@dataclass
class DNVisualization:
    queries: DecoderQueries  # from prepare_for_dn
    attn_mask: torch.Tensor  # [Q, Q] bool, True = blocked
    gt_boxes: List[DrawnBox]  # in display pixels
    noised_boxes: List[DrawnBox]  # one per denoising entry (groups x ground-truth boxes), display pixels
    queries_image: Image.Image
    mask_image: Image.Image


def load_example(args: argparse.Namespace) -> Example:
    """The requested image of a COCO-format split with its targets normalised like the model's input."""
    if args.image:
        if not args.ann_file:
            raise SystemExit("visualize_dn.py: error: --image needs --ann_file (the COCO file that lists it)")
        image_path = Path(args.image)
        dataset = CocoDetection(image_path.parent, args.ann_file)
        matches = [i for i, img in dataset.coco.imgs.items() if Path(img["file_name"]).name == image_path.name]
        if not matches:
            raise SystemExit(f"visualize_dn.py: error: --image {image_path.name} is not listed in {args.ann_file}")
        image_id = matches[0]
    elif args.coco_path:
        dataset = CocoDetection(*coco_split_paths(args.coco_path, args.image_set))
        image_id = args.image_id if args.image_id is not None else first_image_with_objects(dataset)
        if image_id not in dataset.coco.imgs:
            raise SystemExit(f"visualize_dn.py: error: --image_id {image_id} is not in {dataset.ann_file} "
                             f"(the {args.image_set} split; see --image_set)")
    else:
        raise SystemExit("visualize_dn.py: error: give --coco_path (with optional --image_id), "
                         "or --image and --ann_file")
    image = dataset.load_image(image_id)
    _, target = Compose([ToTensor(), Normalize()])(image, dataset.make_target(image_id, image.size))
    names = {c["id"]: c.get("name") or f"class {c['id']}" for c in dataset.coco.cats.values()}
    num_classes = resolve_num_classes(args, dataset_max_category_id=max(dataset.coco.getCatIds()),
                                      dataset_name=str(dataset.ann_file))
    return Example(image, image_id, target["labels"], target["boxes"], names, num_classes,
                   f"{dataset.img_folder / dataset.coco.imgs[image_id]['file_name']} (image id {image_id})")


def first_image_with_objects(dataset: CocoDetection) -> int:
    for image_id in dataset.ids:
        if dataset.coco.getAnnIds(imgIds=[image_id], iscrowd=False):
            return image_id
    raise SystemExit(f"visualize_dn.py: error: no image of {dataset.ann_file} has a non-crowd object")


def build_dn_queries(labels: torch.Tensor, boxes: torch.Tensor, num_classes: int, dn_config: DNConfig,
                     num_queries: int, seed: int) -> DecoderQueries:
    """``prepare_for_dn`` for a batch of one image, with zero matching content and anchors."""
    torch.manual_seed(seed)
    label_enc = nn.Embedding(num_classes + 1, EMBED_DIM - 1)
    matching_content = torch.zeros(num_queries, EMBED_DIM)
    matching_anchors = torch.zeros(num_queries, 4)
    return prepare_for_dn([{"labels": labels, "boxes": boxes}], dn_config, label_enc, matching_content,
                          matching_anchors, num_classes, batch_size=1)


def query_boxes(meta: DNMeta, clean_boxes: torch.Tensor, clean_labels: torch.Tensor, image_size: Tuple[int, int],
                names: Mapping[int, str]) -> Tuple[List[DrawnBox], List[DrawnBox]]:
    """Ground-truth and noised denoising boxes in pixels of an image of ``image_size = (W, H)``."""
    width, height = image_size
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    gt = [DrawnBox(tuple(box.tolist()), class_caption(label, names), GT_COLOR)
          for box, label in zip(box_cxcywh_to_xyxy(clean_boxes) * scale, clean_labels.tolist())]
    noised_xyxy = box_cxcywh_to_xyxy(meta.noised_boxes.float()) * scale  # [G * N, 4], entry g * N + t
    noised = []
    for entry, (box, label, clean) in enumerate(zip(noised_xyxy, meta.noised_labels.tolist(), meta.labels.tolist())):
        group = entry // meta.group_size  # a batch of one: group_size = its number of boxes
        flipped = "*" if label != clean else ""
        noised.append(DrawnBox(tuple(box.tolist()), f"g{group} {class_caption(label, names)}{flipped}",
                               palette_color(group), dashed=True))
    return gt, noised


def render_attention_mask(attn_mask: torch.Tensor, pad_size: int, group_size: int, cell_size: int) -> Image.Image:
    """``[Q, Q]`` mask (True = blocked) -> ``(Q * cell_size)``-pixel square picture, see the module doc."""
    num = attn_mask.shape[0]
    row_colors = np.tile(np.array(MATCHING_VISIBLE_COLOR, dtype=np.float32), (num, 1))  # [Q, 3]
    for row in range(pad_size):
        row_colors[row] = (np.array(palette_color(row // group_size)) + 255) / 2  # group colour, lightened
    blocked = attn_mask.cpu().numpy()[:, :, None]  # [Q, Q, 1]
    pixels = np.where(blocked, np.array(BLOCKED_COLOR, dtype=np.float32), row_colors[:, None, :])  # [Q, Q, 3]
    picture = Image.fromarray(pixels.astype(np.uint8)).resize((num * cell_size,) * 2, Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    last = num * cell_size - 1
    for boundary in range(group_size, pad_size, group_size):
        at = boundary * cell_size
        draw.line([(at, 0), (at, last)], fill=GROUP_LINE_COLOR)
        draw.line([(0, at), (last, at)], fill=GROUP_LINE_COLOR)
    if 0 < pad_size < num:
        at = pad_size * cell_size
        draw.rectangle([at - 1, 0, at, last], fill=SPLIT_LINE_COLOR)
        draw.rectangle([0, at - 1, last, at], fill=SPLIT_LINE_COLOR)
    return picture


def visualize(example: Example, args: argparse.Namespace) -> DNVisualization:
    dn_config = DNConfig.from_args(args)
    queries = build_dn_queries(example.labels, example.boxes, example.num_classes, dn_config, args.num_queries,
                               args.seed)
    meta = queries.dn_meta
    # prepare_for_dn returns no mask when the image has no object (nothing to hide); it is then all visible.
    attn_mask = (queries.attn_mask if queries.attn_mask is not None
                 else dn_attention_mask(meta.pad_size, meta.group_size, args.num_queries))
    shown, _ = enlarge_for_display(example.image, args.display_size)
    gt, noised = query_boxes(meta, example.boxes, example.labels, shown.size, example.names)
    return DNVisualization(queries, attn_mask, gt, noised, draw_boxes(shown, gt + noised),
                           render_attention_mask(attn_mask, meta.pad_size, meta.group_size, args.cell_size))


def get_parser() -> argparse.ArgumentParser:
    defaults = get_args_parser()
    parser = argparse.ArgumentParser("scripts/visualize_dn.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--coco_path", default=None, help="COCO-format folder (train2017/, val2017/, annotations/)")
    parser.add_argument("--image_set", default="train", choices=["train", "val"], help="split of --coco_path")
    parser.add_argument("--image_id", type=int, default=None, help="default: the split's first image with objects")
    parser.add_argument("--image", default=None, help="an image file listed in --ann_file (instead of --coco_path)")
    parser.add_argument("--ann_file", default=None, help="COCO annotation file listing --image")
    parser.add_argument("--out", required=True, help="folder for dn_queries.png and dn_attention_mask.png")
    for flag in ("scalar", "label_noise_scale", "box_noise_scale", "seed"):
        parser.add_argument(f"--{flag}", type=type(defaults.get_default(flag)), default=defaults.get_default(flag),
                            help=f"as in main.py (default {defaults.get_default(flag)})")
    parser.add_argument("--num_queries", type=int, default=20,
                        help="matching queries in the mask (default 20: the model's 300 would be unreadable)")
    parser.add_argument("--num_classes", type=int, default=None, help="default: max category id + 1")
    parser.add_argument("--cell_size", type=int, default=12, help="pixels per (query, key) pair of the mask")
    parser.add_argument("--display_size", type=int, default=640,
                        help="enlarge smaller images to this long side for dn_queries.png (0: never)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> DNVisualization:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.num_queries < 0 or args.cell_size < 1:
        parser.error(f"--num_queries {args.num_queries} must be >= 0 and --cell_size {args.cell_size} >= 1")
    try:
        example = load_example(args)
    except (FileNotFoundError, ValueError, ImageLoadError) as error:
        raise SystemExit(f"visualize_dn.py: error: {error}") from None
    if example.labels.numel() and example.num_classes <= int(example.labels.max()):
        parser.error(f"--num_classes {example.num_classes} is too small for {example.source}: it has category id "
                     f"{int(example.labels.max())}")
    result = visualize(example, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.queries_image.save(out / "dn_queries.png")
    result.mask_image.save(out / "dn_attention_mask.png")
    meta = result.queries.dn_meta
    print(f"{example.source}: {len(result.gt_boxes)} ground-truth boxes, {meta.num_groups} groups -> "
          f"{len(result.noised_boxes)} denoising queries")
    print(f"attention mask shape {tuple(result.attn_mask.shape)}: {meta.pad_size} denoising rows "
          f"({meta.num_groups} groups x {meta.group_size}) + {args.num_queries} matching; "
          f"{int(result.attn_mask.sum())} of {result.attn_mask.numel()} pairs blocked")
    print(f"wrote {out / 'dn_queries.png'} and {out / 'dn_attention_mask.png'}")
    return result


if __name__ == "__main__":
    main()
