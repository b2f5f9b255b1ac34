"""Tiny model configurations and inputs shared by the model tests."""
import torch

from main import get_args_parser

TINY_FLAGS = [
    "--no_pretrained_backbone", "--backbone", "resnet18", "--hidden_dim", "64", "--dim_feedforward", "96",
    "--enc_layers", "2", "--dec_layers", "3", "--nheads", "4", "--num_queries", "12", "--num_classes", "11",
]


def tiny_args(modelname: str = "dn_dab_detr", *extra: str):
    flags = ["-m", modelname] + TINY_FLAGS + list(extra)
    if modelname == "dn_dab_deformable_detr":
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
