"""Model zoo entry point: ``build_model(args) -> (model, criterion, postprocessors)``."""
from .builder import build_model

__all__ = ["build_model"]
