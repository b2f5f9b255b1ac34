"""DN-DETR's DINO-style variant (``-m dn_dab_dino_deformable_detr``): ``dn_dab_deformable_detr`` with three
ideas of DINO.

* Contrastive denoising (``--contrastive``): every ground truth enters each denoising group twice, as a
  positive query (corners moved by less than half the noise scale, to be reconstructed) and as a negative
  one (moved by between half and the full scale, fed with the "no object" label, to be classified as no
  object). The queries come from the one denoising module (``DNConfig.contrastive``), their losses from the
  one criterion.
* Look-forward-twice (always on): the heads of decoder layer ``l >= 1`` refine layer ``l - 1``'s refined box
  before it is detached, so a layer's box loss also trains the previous layer's box head.
* Mixed query selection (``--two_stage``): every encoder token proposes a box; the best ``--num_queries``,
  ranked by an extra class head, become the anchors of the matching queries, whose content is a learned
  embedding (``transformer.tgt_embed``). The proposals are supervised by the criterion's ``_enc`` losses.

Without ``--two_stage`` the network (state dict, initial weights, evaluation outputs) is exactly that of
``dn_dab_deformable_detr``; the gradients (look-forward-twice) and the denoising queries differ.
"""
import logging
from typing import Optional

from torch import nn

from .backbone import Joiner
from .deformable_transformer import DeformableTransformer, build_deformable_transformer
from .detector import DNDetector, EncoderMemory, MatchingQueries, box_head, class_head, multiscale_input_proj, per_layer
from .dn_components import DNConfig
from .dn_dab_deformable_detr import DNDABDeformableDETR, deformable_backbone

logger = logging.getLogger(__name__)


class DNDABDINODeformableDETR(DNDABDeformableDETR):
    """The deformable model; with a two-stage transformer (``num_selected_queries > 0``) one more class head
    and box head (the last ones, shared with the decoder as ``transformer.decoder.class_embed`` /
    ``bbox_embed``) score and refine the encoder proposals, and the matching queries come from them."""

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, dn_config: Optional[DNConfig] = None,
                 random_refpoints_xy: bool = False, num_patterns: int = 0):
        if transformer.num_selected_queries == 0:
            super().__init__(backbone, transformer, num_classes, num_queries, num_feature_levels, aux_loss, dn_config,
                             random_refpoints_xy)
            self.two_stage = False
            return
        DNDetector.__init__(self, num_classes, num_queries, aux_loss, dn_config)
        self.two_stage = True
        hidden_dim = transformer.d_model
        num_heads = transformer.decoder.num_layers + 1
        parts = dict(
            transformer=transformer,
            # All box heads start at zero refinement (the first layer's smaller-box bias is not applied here).
            class_embed=lambda: per_layer(class_head(hidden_dim, num_classes), num_heads),
            bbox_embed=lambda: per_layer(box_head(hidden_dim), num_heads),
            label_enc=self.label_embedding,
        )
        if num_patterns > 0:
            # The original creates it with two-stage and never reads it; kept for its checkpoint layout.
            parts["patterns_embed"] = lambda: nn.Embedding(num_patterns, hidden_dim)
        self.register_in_order(
            **parts,
            input_proj=lambda: multiscale_input_proj(backbone.num_channels, num_feature_levels, hidden_dim,
                                                     xavier_init=True),
            backbone=backbone,
        )
        self.transformer.decoder.class_embed = self.class_embed  # one module, two state-dict paths

    def matching_queries(self, memory: EncoderMemory) -> MatchingQueries:
        """Without two-stage, as ``dn_dab_deformable_detr``. With it: content ``transformer.tgt_embed [K, D]``,
        anchors ``[B, K, 4]`` from the encoder proposals, and the proposals' predictions as ``enc_outputs``."""
        if not self.two_stage:
            return MatchingQueries(*super().matching_queries(memory))
        content, anchors, enc_outputs = self.transformer.select_queries(memory)
        # Numerically null terms that keep label_enc (a batch without objects) and the unused pattern
        # embedding in the graph, so distributed training never sees them as unused parameters.
        content = content + self.label_enc.weight[0, 0] * 0
        if hasattr(self, "patterns_embed"):
            content = content + self.patterns_embed.weight[0, 0] * 0
        return MatchingQueries(content, anchors, {"enc_outputs": enc_outputs})


def build(args, dn_config: Optional[DNConfig]) -> DNDABDINODeformableDETR:
    if args.num_patterns > 0 and not args.two_stage:
        raise ValueError(f"--num_patterns {args.num_patterns}: {args.modelname} has no pattern embeddings without "
                         "--two_stage (and does not use them with it); drop the flag")
    if args.use_mqs and not args.two_stage:
        logger.warning("--use_mqs: mixed query selection picks the queries from the encoder proposals of "
                       "--two_stage; without --two_stage it is off")
    if args.two_stage:
        if args.random_refpoints_xy:
            logger.warning("--random_refpoints_xy is ignored with --two_stage: the anchors come from the encoder")
        if args.num_patterns > 0:
            logger.warning(f"--num_patterns {args.num_patterns} creates patterns_embed (checkpoint layout of the "
                           "original) but the model does not use it")
        if not args.aux_loss:
            logger.warning("--no_aux_loss also leaves the encoder proposal losses (_enc) unweighted, as in the "
                           "original: the proposal heads and enc_output do not train")
    backbone = deformable_backbone(args)
    transformer = build_deformable_transformer(args, look_forward_twice=True,
                                               num_selected_queries=args.num_queries if args.two_stage else 0)
    return DNDABDINODeformableDETR(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                                   num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                                   dn_config=dn_config, random_refpoints_xy=args.random_refpoints_xy,
                                   num_patterns=args.num_patterns)
