"""The model zoo: every detector ``-m/--modelname`` can build, and the settings each one fixes or ignores.

Adding a DETR variant with denoising = one model file (a :class:`models.detector.DNDetector` subclass and
its ``build(args, dn_config)``) plus one :class:`ModelEntry` here; the command line, the builder, the
criterion's weights and the flag checks all read this table.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from . import (dn_dab_deformable_detr, dn_dab_deformable_detr_deformable_encoder_only, dn_dab_detr,
               dn_dab_dino_deformable_detr)
from .detector import DNDetector
from .dn_components import DNConfig


@dataclass(frozen=True)
class FromFlag:
    """A setting whose value is that of a command-line flag (``--<flag>``)."""

    flag: str

    def resolve(self, args) -> Any:
        return getattr(args, self.flag)


def resolve(setting: Union[Any, FromFlag], args) -> Any:
    """A fixed setting as is, a :class:`FromFlag` setting from ``args``."""
    return setting.resolve(args) if isinstance(setting, FromFlag) else setting


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[Any, Optional[DNConfig]], DNDetector]  # the detector from the flags and the noise settings
    description: str
    # Focal alpha of the matcher's class cost (the loss always uses --focal_alpha).
    matcher_focal_alpha: Union[float, FromFlag] = FromFlag("focal_alpha")
    # Detections kept per image by the post-processor.
    num_select: Union[int, FromFlag] = FromFlag("num_select")
    # Weight of the denoising classification loss ``tgt_loss_ce``.
    dn_class_loss_coef: Union[float, FromFlag] = FromFlag("cls_loss_coef")
    # Whether the criterion logs the L1 box loss split into centre (``loss_xy``) and size (``loss_hw``).
    log_xy_hw: bool = True
    # Flags the model cannot honour: setting one (to a true / non-zero value) is an error.
    unsupported_flags: Tuple[str, ...] = ()
    # Flags the model does not read, with the value it uses in their place (None: the flag has no
    # meaning for it). Giving another value than that or the parser default draws a warning.
    ignored_flags: Mapping[str, Any] = field(default_factory=dict)
    # DNConfig settings of the model's denoising queries besides the flags (e.g. corner noise).
    dn_options: Mapping[str, Any] = field(default_factory=dict)
    # Whether the weight dict weighs losses of encoder proposals (``_enc``, models with --two_stage).
    encoder_losses: bool = False


# The DINO-style variant's flags: an error for the other models (the original crashes in training), or
# ignored by them.
DINO_ONLY_FLAGS = ("contrastive", "cdn_split_per_image")
IGNORED_DINO_FLAGS = {"use_mqs": None, "use_lft": None, "num_results": None}


MODELS = {
    "dn_dab_detr": ModelEntry(
        build=dn_dab_detr.build,
        description="DN-DAB-DETR: single scale, DAB-DETR transformer, pattern embeddings",
        unsupported_flags=("two_stage",) + DINO_ONLY_FLAGS,
        ignored_flags={"num_feature_levels": None, "enc_n_points": None, "dec_n_points": None, **IGNORED_DINO_FLAGS},
    ),
    "dn_dab_deformable_detr": ModelEntry(
        build=dn_dab_deformable_detr.build,
        description="DN-DAB-Deformable-DETR: multi-scale deformable attention in encoder and decoder",
        matcher_focal_alpha=0.25,
        num_select=100,
        log_xy_hw=False,
        unsupported_flags=("two_stage", "num_patterns") + DINO_ONLY_FLAGS,
        ignored_flags={"transformer_activation": "relu", "num_select": 100, "pe_temperatureH": 10000,
                       "pe_temperatureW": 10000, "pre_norm": None, **IGNORED_DINO_FLAGS},
    ),
    "dn_dab_deformable_detr_deformable_encoder_only": ModelEntry(
        build=dn_dab_deformable_detr_deformable_encoder_only.build,
        description="DN-DAB-Deformable-DETR (deformable encoder only): multi-scale deformable encoder, "
                    "DAB decoder attending to every level densely",
        dn_class_loss_coef=1.0,  # fixed in the original release, whatever --cls_loss_coef says
        unsupported_flags=("two_stage",) + DINO_ONLY_FLAGS,
        ignored_flags={"pre_norm": None, "dec_n_points": None, "random_refpoints_xy": None, **IGNORED_DINO_FLAGS},
    ),
    "dn_dab_dino_deformable_detr": ModelEntry(
        build=dn_dab_dino_deformable_detr.build,
        description="DN-DAB-Deformable-DETR with DINO's contrastive denoising (--contrastive), mixed query "
                    "selection from encoder proposals (--two_stage) and look-forward-twice (always on)",
        matcher_focal_alpha=0.25,
        num_select=FromFlag("num_results"),
        log_xy_hw=False,
        ignored_flags={"transformer_activation": "relu", "num_select": None, "pe_temperatureH": 10000,
                       "pe_temperatureW": 10000, "pre_norm": None, "use_lft": True},
        # Corner noise, and --scalar >= 100 is a budget of denoising queries rather than a group count.
        dn_options={"corner_noise": True, "dynamic_groups_from": 100},
        encoder_losses=True,
    ),
}
