"""Small building blocks shared by both transformers."""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class MLP(nn.Module):
    """``num_layers`` Linear layers (``layers.0 ..``) with ReLU between them, none after the last."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims_in, dims_out))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def build_activation(name: str):
    """The FFN activation: a module with a learnable slope for ``prelu`` (a checkpoint key), else a function."""
    if name == "prelu":
        return nn.PReLU()
    functions = {"relu": F.relu, "gelu": F.gelu, "selu": F.selu}
    if name not in functions:
        raise ValueError(f"--transformer_activation: unknown activation {name!r}, choose from prelu, relu, gelu, selu")
    return functions[name]


def clone_modules(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def transformer_size(args) -> dict:
    """The size flags every transformer takes, as its constructor's keyword arguments."""
    return dict(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout)


class LayerStack(nn.Module):
    """Base of encoders and decoders: ``layers`` run one after the other, each optionally under activation
    checkpointing (``checkpoint_layers``: its activations are recomputed in the backward pass instead of
    kept, which trades compute for memory and leaves the gradients unchanged)."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        self.layers = clone_modules(layer, num_layers)
        self.checkpoint_layers = False

    def run_layer(self, layer: nn.Module, *inputs):
        if self.checkpoint_layers and torch.is_grad_enabled():
            return checkpoint(layer, *inputs, use_reentrant=False)
        return layer(*inputs)
