"""The optimizer and learning-rate schedule of every training run."""
import torch


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.AdamW:
    """AdamW with two parameter groups: the non-backbone parameters at ``--lr``, the backbone ones at
    ``--lr_backbone``. Both keep ``named_parameters()`` order, because an optimizer state (that of an
    official checkpoint included) is matched to parameters by position."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for n, p in named if "backbone" not in n], "lr": args.lr},
        {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone},
    ]
    return torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, args) -> torch.optim.lr_scheduler.StepLR:
    """The learning rate is multiplied by 0.1 every ``--lr_drop`` epochs."""
    return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
