"""Synthetic shapes in COCO format: a small, deterministic stand-in for COCO.

Writes a real COCO folder (``train2017/*.jpg``, ``val2017/*.jpg``, ``annotations/instances_{train,val}2017.json``)
that the ordinary COCO pipeline reads unchanged; it is the embedded default of the demo, the tests and the
DN-DETR vs baseline convergence experiment.

Each image has a textured, noisy background, 0..``max_objects`` filled shapes (six classes, non-contiguous
category ids like COCO's) in random colours, sizes, aspect ratios and rotations, possibly overlapping, plus
unannotated distractor shapes. A fraction of images is empty, and a fraction holds one ``iscrowd`` group
(a cluster of small shapes of one class annotated as a single crowd region). Boxes are the tight box of the
shape's *visible* pixels (after occlusion by later shapes) and ``area`` is its visible pixel count, as in COCO.

Presets: ``easy`` (big, high-contrast, mostly separate objects, no clutter), ``hard`` (small objects,
strong occlusion, colour jitter, textured low-contrast backgrounds and distractors) and ``medium`` in
between; every knob is adjustable on its own. Output is byte-identical for the same arguments and seed.

    python -m datasets.synthetic --out data/synthetic --seed 0 --preset hard --num_train 2000 --num_val 200

``--shapes`` draws a subset of the shapes only, as categories 1..k in the given order: a dataset with
another label set, e.g. to fine-tune a model trained on the default one:

    python -m datasets.synthetic --out data/shapes3 --shapes ring,star,cross
"""
import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

# Non-contiguous ids, as in COCO; num_classes = max id + 1 = 12.
CATEGORIES = {1: "rectangle", 3: "ellipse", 4: "triangle", 7: "cross", 9: "ring", 11: "star"}
DISTRACTOR_SHAPES = ("line", "hexagon", "outline")
PALETTE = np.array([
    (220, 40, 40), (40, 180, 60), (50, 80, 230), (235, 210, 40),
    (200, 50, 200), (40, 205, 215), (245, 140, 30), (240, 240, 240),
], dtype=np.float32)
SPLITS = {"train": (0, 0), "val": (1, 500_000)}  # split -> (seed stream, image id base)
MIN_VISIBLE_PIXELS = 9
PLACEMENT_ATTEMPTS = 20


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the generator; sizes in pixels, object sizes relative to the image's short side."""

    min_size: int = 96  # image side range (width and height drawn independently -> varied aspect ratios)
    max_size: int = 160
    max_objects: int = 4
    min_object_frac: float = 0.22  # object extent / short side
    max_object_frac: float = 0.5
    min_visible: float = 0.85  # an object keeps at least this fraction of its pixels when later ones overlap it
    max_distractors: int = 0  # unannotated clutter shapes per image
    colour_jitter: float = 0.0  # per-object, per-channel colour offset std, fraction of 255
    class_colours: bool = False  # paint each class in its own palette colour (colour becomes a cue besides shape)
    noise_std: float = 4.0  # per-pixel Gaussian noise std (0..255 scale)
    background_low: int = 20  # background colour range (0..255): low contrast when it overlaps the palette
    background_high: int = 100
    texture_amplitude: float = 0.0  # strength of striped background texture (0..255 scale)
    empty_fraction: float = 0.1  # images without objects (at least one per split when > 0)
    crowd_fraction: float = 0.1  # images with one iscrowd group (at least one per split when > 0)
    jpeg_quality: int = 90
    # Comma-separated subset of the six shapes, annotated as categories 1..k in the given order (a dataset
    # with other classes than the default one, e.g. to fine-tune on); empty: all six with their CATEGORIES ids.
    shapes: str = ""

    def validate(self) -> None:
        if not 8 <= self.min_size <= self.max_size:
            raise ValueError(f"image size range [{self.min_size}, {self.max_size}]: need 8 <= min_size <= max_size")
        if not 0 < self.min_object_frac <= self.max_object_frac <= 1:
            raise ValueError(f"object size range [{self.min_object_frac}, {self.max_object_frac}]: "
                             "need 0 < min_object_frac <= max_object_frac <= 1")
        if self.max_objects < 1 or self.max_distractors < 0:
            raise ValueError(f"max_objects {self.max_objects} must be >= 1, max_distractors "
                             f"{self.max_distractors} >= 0")
        for name in ("min_visible", "empty_fraction", "crowd_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} {getattr(self, name)} must lie in [0, 1]")
        if self.empty_fraction + self.crowd_fraction > 1:
            raise ValueError("empty_fraction + crowd_fraction must not exceed 1")
        if not 0 <= self.background_low <= self.background_high <= 255:
            raise ValueError(f"background range [{self.background_low}, {self.background_high}] must lie in [0, 255]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality} must lie in [1, 100]")
        names = self.shapes.split(",") if self.shapes else []
        unknown = [name for name in names if name not in CATEGORIES.values()]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"shapes {self.shapes!r}: give distinct names from {', '.join(CATEGORIES.values())}, "
                             "separated by commas")

    def categories(self) -> Dict[int, str]:
        """Category id -> shape name of the annotated classes."""
        if not self.shapes:
            return dict(CATEGORIES)
        return {index + 1: name for index, name in enumerate(self.shapes.split(","))}


PRESETS: Dict[str, SyntheticConfig] = {
    "easy": SyntheticConfig(),
    "medium": SyntheticConfig(max_objects=6, min_object_frac=0.12, max_object_frac=0.45, min_visible=0.6,
                              max_distractors=2, colour_jitter=0.06, noise_std=8.0, background_low=0,
                              background_high=180, texture_amplitude=12.0),
    "hard": SyntheticConfig(max_objects=8, min_object_frac=0.07, max_object_frac=0.4, min_visible=0.45,
                            max_distractors=6, colour_jitter=0.12, noise_std=14.0, background_low=0,
                            background_high=255, texture_amplitude=30.0, crowd_fraction=0.15),
}


# ---------------------------------------------------------------------------------------------------------
# Shapes: polygons in unit coordinates (extent [-1, 1]); a shape is an outer polygon and optional holes.

def _circle(radius: float, points: int = 40) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


_ARM = 0.33
UNIT_SHAPES: Dict[str, Tuple[np.ndarray, List[np.ndarray]]] = {
    "rectangle": (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float), []),
    "ellipse": (_circle(1.0), []),
    "triangle": (np.array([(0, -1), (1, 0.8), (-1, 0.8)], dtype=float), []),
    "cross": (np.array([(-_ARM, -1), (_ARM, -1), (_ARM, -_ARM), (1, -_ARM), (1, _ARM), (_ARM, _ARM), (_ARM, 1),
                        (-_ARM, 1), (-_ARM, _ARM), (-1, _ARM), (-1, -_ARM), (-_ARM, -_ARM)], dtype=float), []),
    "ring": (_circle(1.0), [_circle(0.55)]),
    "star": (_star(), []),
    "hexagon": (_circle(1.0, points=6), []),
    "outline": (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
                [np.array([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])]),
}


def _place(unit: np.ndarray, centre, radii, angle: float) -> List[Tuple[float, float]]:
    """Scale unit polygon by ``radii`` (rx, ry), rotate by ``angle`` and move to ``centre`` (x, y)."""
    scaled = unit * np.asarray(radii)
    cos, sin = math.cos(angle), math.sin(angle)
    rotated = scaled @ np.array([[cos, sin], [-sin, cos]])
    return [tuple(p) for p in (rotated + np.asarray(centre)).tolist()]


def _shape_mask(shape: str, centre, radii, angle: float, width: int, height: int) -> np.ndarray:
    """Boolean ``[H, W]`` mask of one filled shape (holes cut out), no anti-aliasing so pixels are exact."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    outer, holes = UNIT_SHAPES[shape]
    draw.polygon(_place(outer, centre, radii, angle), fill=1)
    for hole in holes:
        draw.polygon(_place(hole, centre, radii, angle), fill=0)
    return np.asarray(canvas, dtype=bool)


def _line_mask(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    points = [(rng.uniform(0, width), rng.uniform(0, height)) for _ in range(2)]
    ImageDraw.Draw(canvas).line(points, fill=1, width=int(rng.integers(1, 4)))
    return np.asarray(canvas, dtype=bool)


# ---------------------------------------------------------------------------------------------------------
# Scene composition.

@dataclasses.dataclass
class _Annotated:
    category_id: int
    iscrowd: int
    full_area: int
    visible: np.ndarray  # [H, W] bool, shrinks as later layers cover it


class _Scene:
    """Layers painted back to front; keeps each annotated layer's visible mask up to date."""

    def __init__(self, rng: np.random.Generator, config: SyntheticConfig, width: int, height: int):
        self.rng, self.config, self.width, self.height = rng, config, width, height
        self.short = min(width, height)
        self.image = _background(rng, config, width, height)  # [H, W, 3] float32
        self.objects: List[_Annotated] = []
        self.categories = config.categories()

    def _colour(self, category_id: Optional[int] = None) -> np.ndarray:
        """A palette colour: the class's own with ``class_colours`` (for annotated shapes; each shape keeps
        its colour whatever its category id), else a random one."""
        if self.config.class_colours and category_id is not None:
            colour = PALETTE[list(CATEGORIES.values()).index(self.categories[category_id])]
        else:
            colour = PALETTE[self.rng.integers(len(PALETTE))]
        if self.config.colour_jitter > 0:
            colour = colour + self.rng.normal(0, 255 * self.config.colour_jitter, size=3).astype(np.float32)
        return np.clip(colour, 0, 255)

    def _random_shape_mask(self, shape: str, min_frac: float, max_frac: float, centre=None) -> np.ndarray:
        extent = self.rng.uniform(min_frac, max_frac) * self.short
        aspect = math.exp(self.rng.uniform(-0.4, 0.4))
        radii = (max(extent / 2 * aspect, 1.5), max(extent / 2 / aspect, 1.5))
        if centre is None:
            centre = (self.rng.uniform(0, self.width), self.rng.uniform(0, self.height))
        angle = self.rng.uniform(-0.35, 0.35) if shape == "rectangle" else self.rng.uniform(0, 2 * np.pi)
        return _shape_mask(shape, centre, radii, angle, self.width, self.height)

    def _paint(self, mask: np.ndarray, category_id: Optional[int] = None) -> None:
        self.image[mask] = self._colour(category_id)

    def _accept(self, mask: np.ndarray) -> bool:
        """A new top layer is accepted if it is itself visible enough and leaves every annotated layer
        under it at least ``min_visible`` of its pixels (and never fewer than MIN_VISIBLE_PIXELS)."""
        if mask.sum() < MIN_VISIBLE_PIXELS:
            return False
        for obj in self.objects:
            remaining = np.count_nonzero(obj.visible & ~mask)
            if remaining < max(self.config.min_visible * obj.full_area, MIN_VISIBLE_PIXELS):
                return False
        return True

    def _add_annotated(self, make_mask, category_id: int, iscrowd: int) -> None:
        for _ in range(PLACEMENT_ATTEMPTS):
            mask = make_mask()
            if self._accept(mask):
                for obj in self.objects:
                    obj.visible &= ~mask
                self._paint(mask, category_id)
                self.objects.append(_Annotated(category_id, iscrowd, int(mask.sum()), mask.copy()))
                return

    def add_distractor(self) -> None:
        """Unannotated clutter, painted under every annotated object."""
        shape = DISTRACTOR_SHAPES[self.rng.integers(len(DISTRACTOR_SHAPES))]
        if shape == "line":
            self._paint(_line_mask(self.rng, self.width, self.height))
        else:
            self._paint(self._random_shape_mask(shape, self.config.min_object_frac, self.config.max_object_frac))

    def add_object(self) -> None:
        category_id = int(self.rng.choice(list(self.categories)))
        shape = self.categories[category_id]
        self._add_annotated(
            lambda: self._random_shape_mask(shape, self.config.min_object_frac, self.config.max_object_frac),
            category_id, iscrowd=0)

    def add_crowd(self) -> None:
        """3..6 small shapes of one class clustered together, annotated as one iscrowd region."""
        category_id = int(self.rng.choice(list(self.categories)))
        shape = self.categories[category_id]

        def cluster_mask() -> np.ndarray:
            cx, cy = self.rng.uniform(0.2, 0.8) * self.width, self.rng.uniform(0.2, 0.8) * self.height
            spread = 0.15 * self.short
            mask = np.zeros((self.height, self.width), dtype=bool)
            for _ in range(int(self.rng.integers(3, 7))):
                centre = (cx + self.rng.uniform(-spread, spread), cy + self.rng.uniform(-spread, spread))
                mask |= self._random_shape_mask(shape, 0.08, 0.14, centre=centre)
            return mask

        self._add_annotated(cluster_mask, category_id, iscrowd=1)

    def finish(self) -> np.ndarray:
        """The final ``[H, W, 3]`` uint8 image: painted layers plus sensor noise."""
        if self.config.noise_std > 0:
            self.image += self.rng.normal(0, self.config.noise_std, size=self.image.shape).astype(np.float32)
        return np.clip(np.rint(self.image), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, config: SyntheticConfig, width: int, height: int) -> np.ndarray:
    """Smooth random colour blotches (a bilinearly upsampled coarse grid) plus optional stripes."""
    grid = rng.integers(2, 6, size=2)
    coarse = rng.uniform(config.background_low, config.background_high, size=(grid[0], grid[1], 3))
    image = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR),
                       dtype=np.float32)
    if config.texture_amplitude > 0:
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
        ys, xs = np.mgrid[0:height, 0:width]
        stripes = np.sin(2 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        image += (config.texture_amplitude * stripes)[..., None].astype(np.float32)
    return image


def _tight_box(mask: np.ndarray) -> List[float]:
    """COCO ``[x, y, w, h]`` of the mask's pixels (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``)."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    x0, y0 = int(cols[0]), int(rows[0])
    return [float(x0), float(y0), float(cols[-1] + 1 - x0), float(rows[-1] + 1 - y0)]


def render_image(rng: np.random.Generator, config: SyntheticConfig, empty: bool, crowd: bool):
    """One scene -> (``[H, W, 3]`` uint8 image, list of (category_id, iscrowd, bbox xywh, area))."""
    width = int(rng.integers(config.min_size, config.max_size + 1))
    height = int(rng.integers(config.min_size, config.max_size + 1))
    scene = _Scene(rng, config, width, height)
    for _ in range(int(rng.integers(0, config.max_distractors + 1))):
        scene.add_distractor()
    if crowd:
        scene.add_crowd()
    if not empty:
        for _ in range(int(rng.integers(1, config.max_objects + 1))):
            scene.add_object()
    objects = [(o.category_id, o.iscrowd, _tight_box(o.visible), float(np.count_nonzero(o.visible)))
               for o in scene.objects]
    return scene.finish(), objects


def _special_images(rng: np.random.Generator, num_images: int, config: SyntheticConfig):
    """Disjoint index sets of empty and crowd images; each non-empty when its fraction is > 0."""
    def count(fraction: float) -> int:
        return 0 if fraction == 0 or num_images == 0 else max(1, round(fraction * num_images))

    order = rng.permutation(num_images)
    num_empty = min(count(config.empty_fraction), num_images)
    num_crowd = min(count(config.crowd_fraction), num_images - num_empty)
    return set(order[:num_empty].tolist()), set(order[num_empty:num_empty + num_crowd].tolist())


def _generate_split(out_dir: Path, split: str, num_images: int, seed: int, config: SyntheticConfig,
                    preset: str) -> None:
    stream, id_base = SPLITS[split]
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    empty_set, crowd_set = _special_images(np.random.default_rng([seed, stream]), num_images, config)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, stream, index + 1])
        pixels, objects = render_image(rng, config, empty=index in empty_set, crowd=index in crowd_set)
        image_id = id_base + 2 * index + 1  # sparse ids, like COCO's
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, format="JPEG", quality=config.jpeg_quality)
        images.append({"id": image_id, "file_name": file_name, "width": pixels.shape[1], "height": pixels.shape[0]})
        for category_id, iscrowd, bbox, area in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": bbox, "area": area, "iscrowd": iscrowd})
    info = {"description": f"synthetic shapes ({split}), datasets/synthetic.py", "version": "1.0",
            "generator": {"seed": seed, "preset": preset, **dataclasses.asdict(config)}}
    categories = [{"id": cid, "name": name, "supercategory": "shape"}
                  for cid, name in sorted(config.categories().items())]
    dataset = {"info": info, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    ann_dir = out_dir / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}2017.json").write_text(json.dumps(dataset, separators=(",", ":")))


def make_config(preset: str = "easy", **overrides) -> SyntheticConfig:
    """The preset's settings with ``overrides`` (SyntheticConfig field names) applied and validated."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown synthetic dataset option(s) {unknown}; valid: {sorted(fields)}")
    config = dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


def generate_synthetic_coco(out_dir, num_train: int = 200, num_val: int = 50, seed: int = 0, preset: str = "easy",
                            **overrides) -> Path:
    """Write a synthetic COCO folder to ``out_dir`` and return its path (usable as ``--coco_path``).

    ``overrides`` are :class:`SyntheticConfig` fields (``min_size``, ``max_size``, ``max_objects``, ...)
    replacing the preset's values; ``None`` keeps the preset's value. Same arguments -> same bytes.
    """
    if seed < 0:
        raise ValueError(f"seed {seed} must be >= 0")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train {num_train} and num_val {num_val} must be >= 0")
    config = make_config(preset, **overrides)
    out_dir = Path(out_dir)
    _generate_split(out_dir, "train", num_train, seed, config, preset)
    _generate_split(out_dir, "val", num_val, seed, config, preset)
    return out_dir


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("python -m datasets.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", required=True, help="output folder (becomes --coco_path)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_val", type=int, default=50)
    parser.add_argument("--preset", default="easy", choices=sorted(PRESETS))
    for field in dataclasses.fields(SyntheticConfig):
        preset_values = ", ".join(f"{name} {getattr(config, field.name)}" for name, config in PRESETS.items())
        value_type = _parse_bool if isinstance(field.default, bool) else type(field.default)
        parser.add_argument(f"--{field.name}", type=value_type, default=None,
                            help=f"override the preset's value ({preset_values})")
    return parser


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = _build_parser()
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(SyntheticConfig)}
    try:
        path = generate_synthetic_coco(args.out, args.num_train, args.num_val, args.seed, args.preset, **overrides)
    except ValueError as error:
        parser.error(str(error))
    print(f"wrote {args.num_train} train and {args.num_val} val images ({args.preset}) to {path}")


if __name__ == "__main__":
    main()
