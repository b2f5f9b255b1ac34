"""Tiny model configurations and inputs shared by the model tests."""
import torch

from cli import get_args_parser

TINY_MODEL_FLAGS = [
    "--no_pretrained_backbone", "--backbone", "resnet18", "--hidden_dim", "64", "--dim_feedforward", "96",
    "--enc_layers", "2", "--dec_layers", "3", "--nheads", "4", "--num_queries", "12",
]
TINY_FLAGS = TINY_MODEL_FLAGS + ["--num_classes", "11"]


def tiny_args(modelname: str = "dn_dab_detr", *extra: str):
    flags = ["-m", modelname] + TINY_FLAGS + list(extra)
    if modelname in ("dn_dab_deformable_detr", "dn_dab_dino_deformable_detr"):
        flags += ["--transformer_activation", "relu"]
    return get_args_parser().parse_args(flags)


def random_targets(counts, num_classes: int = 11, generator=None):
    """Targets with ``counts[b]`` random valid cxcywh boxes each."""
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return targets


def random_images(sizes, generator=None):
    return [torch.randn(3, h, w, generator=generator) for h, w in sizes]


def tiny_main_flags(coco_path, output_dir, *extra: str):
    """``main.py`` flags for a tiny DN-DETR run on a small synthetic COCO folder (seconds per epoch)."""
    return ["-m", "dn_dab_detr", "--use_dn", *TINY_MODEL_FLAGS, "--coco_path", str(coco_path), "--output_dir", str(output_dir),
            "--train_scales", "64", "80", "96", "--max_size", "128", "--val_scale", "96",
            "--crop_resize_scales", "64", "80", "--crop_size", "48", "64", "--batch_size", "2",
            "--num_workers", "0", "--device", "cpu", "--lr", "2e-4", *extra]
