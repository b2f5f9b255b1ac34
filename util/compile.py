"""``--compile``: the detector through ``torch.compile``, running eagerly wherever that cannot compile."""
import torch
import torch._dynamo
from torch import nn


def compile_model(model: nn.Module, logger, backend: str = "inductor") -> nn.Module:
    """``torch.compile(model)`` for the forward passes of training and evaluation (the returned module shares
    ``model``'s parameters; save and load ``model`` itself).

    Graphs are compiled at their first calls (minutes on a CPU). A graph that fails to compile runs eagerly
    instead, with a warning that names the error (``torch._dynamo.config.suppress_errors``); where
    ``torch.compile`` is unavailable altogether (an unsupported Python or platform), ``model`` is returned
    with a warning.
    """
    torch._dynamo.config.suppress_errors = True
    try:
        compiled = torch.compile(model, backend=backend)
    except Exception as error:  # raised by torch.compile itself, before any graph: e.g. an unsupported Python
        logger.warning(f"--compile: torch.compile is unavailable here ({type(error).__name__}: {error}); "
                       "running eagerly")
        return model
    logger.info(f"--compile: torch.compile (backend {backend}) compiles the model at its first calls; graphs "
                "that fail to compile run eagerly, with a warning")
    return compiled


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``model`` itself when it is not a compiled module)."""
    return getattr(model, "_orig_mod", model)
