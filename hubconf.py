"""torch.hub entry points, one per model-zoo config in ``configs/`` (the DETR convention).

    import torch
    model = torch.hub.load("path/to/DN-DETR", "dn_dab_detr_r50", checkpoint="dn_detr_r50.pth", source="local")
    model, postprocessor = torch.hub.load("path/to/DN-DETR", "dn_dab_deformable_detr_r50",
                                          checkpoint="https://.../checkpoint.pth", source="local",
                                          return_postprocessor=True)

Each entry builds the network of its config (``configs/<entry>.py``); keyword arguments named like
``main.py``'s flags override the config (``num_classes=12``, ``hidden_dim=64``, ...). ``checkpoint``, a file
or an http(s) URL (downloaded once into the torch hub cache), is read with the safe loader
(``util.checkpoint.load_checkpoint``: nothing in the file is executed) and loaded strictly; settings that
neither the config nor the keywords set take what the checkpoint records or reveals, as in ``inference.py``
(a set one that contradicts the checkpoint's network is an error), and its EMA weights are used when it has
them (``ema_weights=False``: its raw weights). Without a checkpoint the network is freshly initialised (the
backbone with ImageNet weights unless ``no_pretrained_backbone=True``). The model is returned in eval mode
on the CPU; it takes a list of normalised ``[3, H, W]`` images (or a NestedTensor) and returns ``pred_logits``
and ``pred_boxes``.
"""
import logging
import pathlib

dependencies = ["torch", "torchvision", "scipy"]

_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"
# The zoo rows and their baselines; the synthetic configs size models for the demo, not for the zoo.
_ZOO = sorted(path.stem for path in _CONFIGS.glob("*.py") if not path.stem.startswith("synthetic"))


def _load(name: str, checkpoint, return_postprocessor: bool, settings: dict):
    from cli import get_args_parser
    from model_loading import load_model_for_inference
    from models import build_model
    from util.config import parse_args

    args = parse_args(get_args_parser(), ["--config", str(_CONFIGS / f"{name}.py")])
    unknown = sorted(set(settings) - set(vars(args)))
    if unknown:
        raise TypeError(f"{name}: unknown settings {unknown}; use main.py's flag names (python main.py --help)")
    vars(args).update(settings)
    args.given_flags = sorted(set(args.given_flags) | set(settings))
    logger = logging.getLogger("dn_detr.hub")
    if checkpoint is None:
        model, _, postprocessors = build_model(args)
        model, postprocessor = model.eval(), postprocessors["bbox"]
    else:
        args.resume = str(checkpoint)
        model, postprocessor, _ = load_model_for_inference(args, logger)
    return (model, postprocessor) if return_postprocessor else model


def _entry(name: str):
    def load(checkpoint=None, return_postprocessor: bool = False, **settings):
        return _load(name, checkpoint, return_postprocessor, settings)

    load.__name__ = load.__qualname__ = name
    load.__doc__ = (f"The network of configs/{name}.py, with the weights of ``checkpoint`` (a path or URL) when "
                    "given; keywords override the config's settings; ``return_postprocessor=True`` also returns "
                    "the post-processor (outputs -> scores, labels, xyxy boxes).")
    return load


globals().update({name: _entry(name) for name in _ZOO})
