"""What every DETR variant with query denoising shares: heads, anchors, the denoising pipeline.

A model file subclasses :class:`DNDetector` and supplies

* its submodules, in the order of the released checkpoints (:meth:`DNDetector.register_in_order`);
* :meth:`DNDetector.matching_queries`: the content and anchors of the matching queries (and, for a
  model that selects them from the encoder output, that selection's own predictions).

The base class runs the rest of the forward pass, the same for every variant:

    images -> backbone -> input projection -> transformer.encode -> memory
    matching queries (+ noised ground truth when training with denoising) -> transformer.decode
    -> class / box heads per decoder layer -> matching outputs + denoising outputs

A transformer provides ``encode(levels) -> EncoderMemory`` and
``decode(content, anchors, attn_mask, memory) -> (hs [L, B, Q, D], references [L, B, Q, 4])``, batch
first; ``references`` are the boxes (sigmoid space) that each layer's box head refines.
"""
import copy
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from util.misc import NestedTensor, inverse_sigmoid, to_nested_tensor

from .backbone import resize_mask
from .dn_components import DNConfig, prepare_for_dn, split_dn_outputs
from .layers import MLP

PRIOR_PROBABILITY = 0.01  # initial foreground probability of every class logit
CLASS_DEPENDENT_MODULES = ("class_embed", "label_enc")  # their shapes follow the number of classes


class FeatureLevels(NamedTuple):
    """Projected feature maps fed to the encoder, per level (finest first)."""

    srcs: List[torch.Tensor]  # [B, D, H_l, W_l]
    masks: List[torch.Tensor]  # [B, H_l, W_l], True = padding
    pos: List[torch.Tensor]  # [B, D, H_l, W_l] positional encodings


class EncoderMemory(NamedTuple):
    """The encoder's output as the decoder (and a query-selecting model) reads it; batch first."""

    memory: torch.Tensor  # [B, S, D], S = sum of the levels' H_l * W_l
    padding_mask: torch.Tensor  # [B, S], True = padding
    pos: torch.Tensor  # [B, S, D] positional encodings (with level embeddings where the model has them)
    spatial_shapes: List[Tuple[int, int]]  # (H_l, W_l) per level
    valid_ratios: Optional[torch.Tensor]  # [B, num_levels, 2] unpadded fraction (w, h) of each level


class MatchingQueries(NamedTuple):
    """What :meth:`DNDetector.matching_queries` returns (a plain ``(content, anchors)`` pair works too)."""

    content: torch.Tensor  # [Qm, D] shared by every image, or [B, Qm, D]
    anchors: torch.Tensor  # [Qm, 4] or [B, Qm, 4] anchor logits
    outputs: Optional[Dict] = None  # added to the model's output dict (e.g. ``enc_outputs``)


def class_head(hidden_dim: int, num_classes: int) -> nn.Linear:
    """Class logits, biased so that every class starts at :data:`PRIOR_PROBABILITY` (focal-loss init)."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))
    return head


def box_head(hidden_dim: int) -> MLP:
    """Box refinement (an offset in logit space); its last layer starts at zero, i.e. at the anchor."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def per_layer(head: nn.Module, num_layers: int) -> nn.ModuleList:
    """Independent copies of one initialised head, one per decoder layer."""
    return nn.ModuleList(copy.deepcopy(head) for _ in range(num_layers))


def multiscale_input_proj(in_channels: List[int], num_feature_levels: int, hidden_dim: int,
                          xavier_init: bool) -> nn.ModuleList:
    """1x1 conv + GroupNorm per backbone level, then 3x3 stride-2 conv + GroupNorm per extra level (the
    first extra level convolves the last backbone map, later ones the previous extra level)."""
    projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                   for c in in_channels]
    extra_in = in_channels[-1]
    for _ in range(num_feature_levels - len(in_channels)):
        projections.append(nn.Sequential(nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                                         nn.GroupNorm(32, hidden_dim)))
        extra_in = hidden_dim
    if xavier_init:
        for proj in projections:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


def make_outputs(outputs_class: torch.Tensor, outputs_coord: torch.Tensor, aux_loss: bool) -> Dict:
    """Output dict from per-layer predictions ``[L, B, Q, *]``: the last layer, plus the earlier ones in
    ``aux_outputs`` when they are supervised."""
    out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(outputs_class[:-1], outputs_coord[:-1])]
    return out


class DNDetector(nn.Module):
    """Base of every detector: see the module documentation.

    Subclasses register at least ``transformer``, ``class_embed`` and ``bbox_embed`` (one shared module
    or one per decoder layer), ``label_enc`` (the class embedding of the denoising queries, with one
    extra row for "unknown class"), ``input_proj`` (one conv on the last backbone map, or a
    :func:`multiscale_input_proj` list) and ``backbone``.
    """

    transformer: nn.Module
    class_embed: Union[nn.Linear, nn.ModuleList]
    bbox_embed: Union[MLP, nn.ModuleList]
    label_enc: nn.Embedding
    input_proj: Union[nn.Conv2d, nn.ModuleList]

    def __init__(self, num_classes: int, num_queries: int, aux_loss: bool, dn_config: Optional[DNConfig]):
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.dn_config = dn_config

    def register_in_order(self, **parts: Union[nn.Module, Callable[[], nn.Module]]) -> None:
        """Create (callables) and register the submodules in the given order.

        The order is that of the released checkpoints' state dicts and of their optimizer state, which is
        positional; it is also the order in which the submodules draw their random initial values, so a
        seeded run starts from the same weights as the original implementation.
        """
        for name, part in parts.items():
            setattr(self, name, part if isinstance(part, nn.Module) else part())
        # The decoder refines its anchors with the detector's box head(s): one module, two state-dict paths.
        self.transformer.decoder.bbox_embed = self.bbox_embed

    def label_embedding(self) -> nn.Embedding:
        """``[num_classes + 1, D - 1]``: one channel of the ``D``-wide query content is left for the
        denoising indicator (1 for a denoising query, 0 for a matching query)."""
        return nn.Embedding(self.num_classes + 1, self.transformer.d_model - 1)

    def class_dependent_keys(self) -> List[str]:
        """State-dict keys whose shape follows the number of classes: the class head(s) and the label
        embedding of the denoising queries (what changes when fine-tuning on data with other classes)."""
        owned = {id(tensor) for name in CLASS_DEPENDENT_MODULES for tensor in getattr(self, name).parameters()}
        # keep_vars: the parameters themselves, so that a head registered a second time (a two-stage
        # decoder's copy of the class heads) is recognised under its other name too
        return [key for key, tensor in self.state_dict(keep_vars=True).items() if id(tensor) in owned]

    def randomise_anchor_xy(self) -> None:
        """``--random_refpoints_xy``: anchor centres drawn uniformly in the image. Initialisation only:
        as in the original release the centres keep training."""
        with torch.no_grad():
            self.refpoint_embed.weight[:, :2].uniform_(0, 1)
            self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2])

    def matching_queries(self, memory: EncoderMemory) -> Union[MatchingQueries, Tuple[torch.Tensor, torch.Tensor]]:
        """Content ``[Qm, D]`` (indicator channel included) and anchor logits ``[Qm, 4]`` of the matching
        queries, shared by every image of the batch (or ``[B, Qm, *]`` per image), and optionally outputs of
        the model's own to return with the predictions (:class:`MatchingQueries`)."""
        raise NotImplementedError

    def feature_levels(self, samples: NestedTensor) -> FeatureLevels:
        """Backbone maps through the input projection; extra strided levels when ``input_proj`` has more
        entries than the backbone returns maps."""
        features, pos = self.backbone(samples)
        if not isinstance(self.input_proj, nn.ModuleList):
            src, mask = features[-1].decompose()
            return FeatureLevels([self.input_proj(src)], [mask], [pos[-1]])
        srcs, masks = [], []
        for feature, proj in zip(features, self.input_proj):
            src, mask = feature.decompose()
            srcs.append(proj(src))
            masks.append(mask)
        for level in range(len(features), len(self.input_proj)):
            src = self.input_proj[level](features[-1].tensors if level == len(features) else srcs[-1])
            mask = resize_mask(samples.mask, src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return FeatureLevels(srcs, masks, pos)

    def predict(self, hs: torch.Tensor, references: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Class logits ``[L, B, Q, C]`` and boxes ``[L, B, Q, 4]`` of every decoder layer."""
        if isinstance(self.class_embed, nn.ModuleList):
            outputs_class = torch.stack([head(h) for head, h in zip(self.class_embed, hs)])
            outputs_coord = torch.stack([(head(h) + inverse_sigmoid(ref)).sigmoid()
                                         for head, h, ref in zip(self.bbox_embed, hs, references)])
            return outputs_class, outputs_coord
        outputs_coord = (self.bbox_embed(hs) + inverse_sigmoid(references)).sigmoid()
        return self.class_embed(hs), outputs_coord

    def forward(self, samples, targets: Optional[List[Dict[str, torch.Tensor]]] = None) -> Dict:
        """``samples``: NestedTensor or list of ``[3, H, W]`` images; ``targets`` (normalised cxcywh
        ``boxes`` and ``labels`` per image) feed the denoising queries when training with denoising.

        Returns ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]``, ``aux_outputs`` (one dict per earlier
        decoder layer), the outputs of the query selection where the model has one (``enc_outputs``) and,
        when training with denoising, ``dn_meta`` (the denoising queries' bookkeeping) and ``dn_outputs``
        (their predictions, absent when the batch has no object).
        """
        samples = to_nested_tensor(samples)
        dn_config = self.dn_config if self.training else None
        if dn_config is not None and targets is None:
            raise ValueError("a model built with --use_dn needs the targets in training mode: model(samples, targets)")

        memory = self.transformer.encode(self.feature_levels(samples))
        matching = MatchingQueries(*self.matching_queries(memory))
        queries = prepare_for_dn(targets, dn_config, self.label_enc, matching.content, matching.anchors,
                                 self.num_classes, memory.memory.shape[0])
        hs, references = self.transformer.decode(queries.content, queries.anchors, queries.attn_mask, memory)
        outputs_class, outputs_coord = self.predict(hs, references)
        outputs_class, outputs_coord, dn_predictions = split_dn_outputs(outputs_class, outputs_coord, queries.dn_meta)

        outputs = make_outputs(outputs_class, outputs_coord, self.aux_loss)
        outputs.update(matching.outputs or {})
        if dn_config is not None:
            outputs["dn_meta"] = queries.dn_meta
            if dn_predictions is not None:
                outputs["dn_outputs"] = dn_predictions
        return outputs
