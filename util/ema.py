"""An exponential moving average (EMA) of a model's weights, updated after every optimizer step.

The average usually evaluates a little better than the last weights (smoother, less dependent on the
last steps' noise). Its decay ramps up over a warm-up: ``decay_t = decay * (1 - exp(-t / warmup_steps))``
after ``t`` updates, so early on, when the weights change fast, the average follows them closely
instead of dragging the random initialisation along for thousands of steps.
"""
import copy
import math

import torch
from torch import nn

from util.compile import unwrap_compiled


class ModelEMA:
    """``module`` is an eval-mode copy of the model holding the averaged weights (no gradients).

    Floating-point parameters and buffers (BatchNorm statistics included) are averaged; integer
    buffers (``num_batches_tracked``) are copied. The update runs on the weights' device and reads no
    value back to the host.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997, warmup_steps: int = 2000):
        if not 0 <= decay < 1:
            raise ValueError(f"--ema_decay {decay} must lie in [0, 1)")
        if warmup_steps < 0:
            raise ValueError(f"--ema_warmup_steps {warmup_steps} must be >= 0")
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update."""
        if self.warmup_steps == 0:
            return self.decay
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (a DDP wrapper is looked through)."""
        decay = self.current_decay()
        self.updates += 1
        averaged, current = [], []
        for ema_value, value in zip(_tensors(self.module), _tensors(unwrap(model))):
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(value.detach())
            else:
                ema_value.copy_(value)
        torch._foreach_lerp_(averaged, current, 1 - decay)

    def state_dict(self) -> dict:
        """The checkpoint entries: ``ema_model`` (a model state dict, loadable wherever ``model`` is) and
        ``ema_updates`` (the warm-up position)."""
        return {"ema_model": self.module.state_dict(), "ema_updates": self.updates}

    def load_state_dict(self, checkpoint: dict) -> None:
        self.module.load_state_dict(checkpoint["ema_model"], strict=True)
        self.updates = int(checkpoint.get("ema_updates", 0))


def _tensors(module: nn.Module):
    """Every parameter and buffer once (a submodule registered under two names, like the shared box head,
    appears twice in a state dict but must be averaged once), in a fixed order."""
    return [*module.parameters(), *module.buffers()]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a torch.compile and a DistributedDataParallel wrapper, else the model."""
    model = unwrap_compiled(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
