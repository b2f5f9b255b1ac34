"""Drawing helpers shared by ``inference.py``, ``scripts/visualize_dn.py`` and ``scripts/plot_curves.py``:
a colour palette, labelled (optionally dashed) boxes drawn with PIL, and class captions (an id without
a name is shown as ``"class N"``).
"""
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

RGB = Tuple[int, int, int]

# Distinct, saturated colours (matplotlib's tab10 followed by a few more); indexed modulo its length.
PALETTE: Tuple[RGB, ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (255, 215, 0), (0, 128, 128), (220, 20, 60), (65, 105, 225), (50, 205, 50), (255, 0, 255),
)

def palette_color(index: int) -> RGB:
    return PALETTE[index % len(PALETTE)]


def class_caption(label: int, names: Mapping[int, str]) -> str:
    return names.get(int(label), f"class {int(label)}")


@dataclass(frozen=True)
class DrawnBox:
    """One box to draw: corners ``(x0, y0, x1, y1)`` in pixels of the image it is drawn on, a caption
    written above it and its colour; ``dashed`` outlines it with dashes."""

    box: Tuple[float, float, float, float]
    caption: str
    color: RGB
    dashed: bool = False


def display_scale(image_size: Tuple[int, int], display_size: int) -> float:
    """Enlargement that brings the long side of a ``(width, height)`` image to ``display_size`` so that
    captions stay legible on small images (never shrinks; 0 disables it)."""
    return max(1.0, display_size / max(image_size)) if display_size > 0 else 1.0


def enlarge_for_display(image: Image.Image, display_size: int) -> Tuple[Image.Image, float]:
    """``image`` enlarged by :func:`display_scale` (bicubic) and the scale; boxes must be multiplied by it."""
    scale = display_scale(image.size, display_size)
    if scale == 1.0:
        return image, scale
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC), scale


def detection_boxes(boxes_xyxy: Sequence[Sequence[float]], labels: Sequence[int], scores: Sequence[float],
                    names: Mapping[int, str]) -> List[DrawnBox]:
    """Boxes ``[N, 4]`` (xyxy pixels; tensors or lists) with ``"name 0.87"`` captions, coloured by class,
    lowest score first so that the most confident detections end up on top when drawn."""
    order = sorted(range(len(scores)), key=lambda i: float(scores[i]))
    drawn = []
    for i in order:
        label = int(labels[i])
        drawn.append(DrawnBox(tuple(float(v) for v in boxes_xyxy[i]),
                              f"{class_caption(label, names)} {float(scores[i]):.2f}", palette_color(label)))
    return drawn


def default_line_width(image_size: Tuple[int, int]) -> int:
    return max(1, round(min(image_size) / 250))


def default_font_size(image_size: Tuple[int, int]) -> int:
    return max(9, round(min(image_size) / 40))


def _dashed_line(draw: ImageDraw.ImageDraw, start: Tuple[float, float], end: Tuple[float, float], color: RGB,
                 width: int) -> None:
    """Axis-aligned dashed segment: dashes of ``4 * width`` pixels separated by ``3 * width``."""
    (x0, y0), (x1, y1) = start, end
    length = abs(x1 - x0) + abs(y1 - y0)
    dash, period = 4 * width, 7 * width
    offset = 0.0
    while offset < length:
        a, b = offset / max(length, 1e-6), min(offset + dash, length) / max(length, 1e-6)
        draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                  fill=color, width=width)
        offset += period


def _text_color(background: RGB) -> RGB:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_boxes(image: Image.Image, boxes: Sequence[DrawnBox], line_width: Optional[int] = None,
               font_size: Optional[int] = None) -> Image.Image:
    """A copy of ``image`` (RGB) with every box outlined and its caption on a filled label above the box
    (inside it when the box touches the top edge). Widths and font size default to the image size."""
    canvas = image.convert("RGB")
    width = line_width or default_line_width(canvas.size)
    font = ImageFont.load_default(size=font_size or default_font_size(canvas.size))
    draw = ImageDraw.Draw(canvas)
    for drawn in boxes:
        x0, y0, x1, y1 = drawn.box
        if drawn.dashed:
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
            for start, end in zip(corners[:-1], corners[1:]):
                _dashed_line(draw, start, end, drawn.color, width)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=drawn.color, width=width)
        if not drawn.caption:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), drawn.caption, font=font)
        text_w, text_h = right - left + 2, bottom - top + 2
        label_y = y0 - text_h if y0 - text_h >= 0 else y0
        draw.rectangle([x0, label_y, x0 + text_w, label_y + text_h], fill=drawn.color)
        draw.text((x0 + 1 - left, label_y + 1 - top), drawn.caption, fill=_text_color(drawn.color), font=font)
    return canvas
