"""The optimizer and learning-rate schedule of every training run."""
from typing import Dict

import torch

# --adamw_impl: how AdamW loops over the parameters. "for-loop" (one parameter at a time) and "foreach"
# (grouped tensor ops) give identical updates; "fused" (one kernel) differs from them by float rounding
# only and takes about a third of their time on a CPU.
ADAMW_IMPLEMENTATIONS: Dict[str, Dict[str, bool]] = {
    "fused": {"fused": True, "foreach": False},
    "foreach": {"fused": False, "foreach": True},
    "for-loop": {"fused": False, "foreach": False},
}


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the non-backbone parameters at ``--lr``, the backbone ones at
    ``--lr_backbone``. Both keep ``named_parameters()`` order, because an optimizer state (that of an
    official checkpoint included) is matched to parameters by position."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for n, p in named if "backbone" not in n], "lr": args.lr},
        {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone},
    ]
    return torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay,
                             **ADAMW_IMPLEMENTATIONS[args.adamw_impl])


def use_adamw_impl(optimizer: torch.optim.Optimizer, impl: str) -> None:
    """Switch a built (e.g. just restored) optimizer to ``impl``: a loaded optimizer state brings the
    implementation it was saved with."""
    for group in optimizer.param_groups:
        group.update(ADAMW_IMPLEMENTATIONS[impl])


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.StepLR:
    """The learning rate is multiplied by 0.1 every ``--lr_drop`` epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
