"""A literal transcription of the spec of ``dn_dab_deformable_detr_deformable_encoder_only``, used as a test oracle.

Written from /work/shared/spec/DN-DEFORMABLE-ENCODER-ONLY-SPEC.md (§2, §4, §5, §6, §7, §8, Appendix A) and the
main spec it cites, independently of ``models/`` (no model file was read), so that the equivalence tests catch
misreadings of the spec.  The model is a hybrid of the two models the project already has, and so is this
oracle: the pieces it shares with them come from the already-verified oracles.

* From :mod:`tests.spec_oracle_deformable`: the backbone stages, input projections (1×1 conv + GroupNorm),
  extra level from the raw C5 with its mask from the full-resolution image mask, valid ratios, encoder
  reference points and the six-layer MSDA encoder (explicit bilinear gathers; FFN activation from
  ``--transformer_activation``, §4.2 step 4).
* From :mod:`tests.spec_oracle` (``dn_dab_detr``): flavour-A image sine PE, anchor sine embedding, the DAB
  decoder loop (``query_scale``, ``ref_point_head``, ``ref_anchor_head``, ``decoder.norm``, anchor refinement,
  shared heads), the no-in-projection self-attention, DN query construction and noise (Appendix B order),
  matcher, losses (with ``loss_xy`` / ``loss_hw``, matcher α from ``--focal_alpha``) and the post-processor
  (K from ``--num_select``).

New here: flavour-A PE on every level (extra level included) with the ``--pe_temperatureH/W`` temperatures
(§4.1), the sequence-first transformer wrapper (§4.2 step 5), patterns on the matching rows (§4.3), the
multi-scale decoder layer's cross-attention — dense conditional attention run separately on each memory level
(one softmax per level, scale (2D/h)^-1/2 = 1/8 at D = 256, h = 8), each level's result through the shared
``ca_out_v_proj`` (bias included), mixed with ``softmax(lvl_attn(q_sa))`` where ``q_sa`` is the layer's
self-attention query (§4.3) — and the weight dict with ``tgt_loss_ce`` fixed at 1.0 (§6.2).

Two switches exist only for the discriminating tests of §13 (items 3 and 4); the spec values are the defaults:

* ``cfg.level_weight_source``: ``"layer_input"`` (spec: ``lvl_attn`` reads ``q_sa``) or
  ``"post_self_attention"`` (the wrong reading: ``lvl_attn`` reads the post-self-attention state ``y``).
* ``cfg.pe_flavour``: ``"A"`` (spec) or ``"B"`` (the deformable model's flavour: T 10000, −0.5 offset).

The oracle works on a *parameter dict* (state-dict names -> tensors, usually float64 leaves that require grad)
and mirrors the model's interface:

* ``config_from_args(args, **overrides)`` -> :class:`EncoderOnlyOracleConfig`.
* ``oracle_forward(params, cfg, images, targets=None, training=False, noised=None)`` -> dict with
  ``pred_logits``, ``pred_boxes``, ``aux_outputs``, per-layer ``all_logits`` / ``all_boxes``, the DN
  bookkeeping ``dn`` and, when DN rows exist, ``dn_pred_logits`` / ``dn_pred_boxes``; plus ``spatial_shapes``,
  ``valid_ratios`` and the per-layer decoder ``level_weights`` ([Q,B,L] each).
* ``oracle_losses(out, targets, cfg, training=True, dtype=None)`` -> the loss dict (main spec §5.3, 61 keys in
  DN training with aux loss).
* ``oracle_weight_dict(cfg)``, ``oracle_total_loss(losses, cfg)`` (§6.2).
* ``oracle_postprocess(out, target_sizes, num_select)`` -> top-K detections per image (§6.3).
* ``oracle_dn_noise(targets, cfg)`` (the single-scale oracle's, Appendix B draw order, §7).
* ``expected_state_dict_rows(cfg)`` / ``expected_non_backbone_keys(cfg)`` -> the state-dict layout of §2 and
  Appendix A (names, shapes, dtype, order) for any configuration, and ``random_params(cfg, seed)`` -> a parameter
  dict with exactly that layout (for running the oracle without the model).
"""
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from tests import spec_oracle as base
from tests import spec_oracle_deformable as deformable
from tests.spec_oracle import (inverse_sigmoid, layer_norm, linear, mlp, oracle_dn_noise, sigmoid,
                               softmax_rows)

__all__ = ["EncoderOnlyOracleConfig", "config_from_args", "oracle_forward", "oracle_losses", "oracle_weight_dict",
           "oracle_total_loss", "oracle_postprocess", "oracle_dn_noise", "expected_state_dict_rows",
           "expected_non_backbone_keys", "random_params", "LEVEL_WEIGHT_SOURCES", "PE_FLAVOURS"]

LEVEL_WEIGHT_SOURCES = ("layer_input", "post_self_attention")
PE_FLAVOURS = ("A", "B")
# §6.2: the DN classification weight does not follow --cls_loss_coef.
TGT_LOSS_CE_WEIGHT = 1.0
# Output channels of the ResNet stages layer2, layer3, layer4 (C3, C4, C5).
STAGE_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
                  "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048)}


@dataclass
class EncoderOnlyOracleConfig(base.OracleConfig):
    num_feature_levels: int
    enc_n_points: int
    dim_feedforward: int
    level_weight_source: str = "layer_input"
    pe_flavour: str = "A"


def config_from_args(args, **overrides) -> EncoderOnlyOracleConfig:
    """The shared fields as for ``dn_dab_detr`` (activation, PE temperatures, patterns, focal α, ``num_select``
    all from the flags, §1.2); ``overrides`` set the discriminating switches (or any other field)."""
    shared = asdict(base.config_from_args(args))
    if args.num_feature_levels == 2:
        raise ValueError("oracle: --num_feature_levels must be 1 or >= 3 (three backbone stages, spec §9.6)")
    cfg = EncoderOnlyOracleConfig(**shared, num_feature_levels=args.num_feature_levels,
                                  enc_n_points=args.enc_n_points, dim_feedforward=args.dim_feedforward)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"oracle: unknown config field {key!r}")
        setattr(cfg, key, value)
    if cfg.level_weight_source not in LEVEL_WEIGHT_SOURCES:
        raise ValueError(f"oracle: level_weight_source must be one of {LEVEL_WEIGHT_SOURCES}")
    if cfg.pe_flavour not in PE_FLAVOURS:
        raise ValueError(f"oracle: pe_flavour must be one of {PE_FLAVOURS}")
    return cfg


# ----------------------------------------------------------------------------------------------------------
# §4.1 levels and positional encodings
# ----------------------------------------------------------------------------------------------------------

def feature_levels(params, cfg, batch, img_mask):
    """Projected levels, their masks and their PEs. Levels and masks are the deformable model's (§4.1 steps
    2-4); the PE is flavour A (§1.6 of the main spec) with the ``--pe_temperatureH/W`` temperatures on every
    level, the extra level included (§8.2). ``cfg.pe_flavour == "B"`` keeps the deformable model's PE."""
    srcs, masks, pes_b = deformable.feature_levels(params, cfg, batch, img_mask)
    if cfg.pe_flavour == "B":
        return srcs, masks, pes_b
    pes = [base.image_sine_pe(m, cfg.hidden_dim, cfg.pe_temperature_h, cfg.pe_temperature_w).to(batch.dtype)
           for m in masks]
    return srcs, masks, pes


# ----------------------------------------------------------------------------------------------------------
# §4.3 the multi-scale decoder layer
# ----------------------------------------------------------------------------------------------------------

def level_attention(q_star, k_star, v, key_padding_mask, nheads):
    """Per-level attention without input or output projection (§4.3 "Per-level attention"):
    q* [Q,B,E], k* [S_l,B,E], v [S_l,B,Ev], mask [B,S_l] (True = pad) -> [Q,B,Ev].
    q* is multiplied by (E/h)^-1/2 before the dot product; padded keys get -inf; softmax over this level's keys
    only; heads (value head dim Ev/h) concatenated head-major."""
    E, Ev = q_star.shape[-1], v.shape[-1]
    d, dv = E // nheads, Ev // nheads
    per_batch = []
    for bi in range(q_star.shape[1]):
        heads = []
        for j in range(nheads):
            qj = q_star[:, bi, j * d:(j + 1) * d] * d ** -0.5
            kj = k_star[:, bi, j * d:(j + 1) * d]
            logits = (qj @ kj.T).masked_fill(key_padding_mask[bi][None, :], float("-inf"))
            heads.append(softmax_rows(logits) @ v[:, bi, j * dv:(j + 1) * dv])
        per_batch.append(torch.cat(heads, dim=-1))
    return torch.stack(per_batch, dim=1)


def multi_scale_decoder_layer(params, cfg, l, out, memory, attn_mask, mask, pos, query_pos, sine_q, *,
                              spatial_shapes, level_weights_log):
    """``MultiScaleDecoderLayer_l`` of §4.3, sequence-first. ``out`` [Q,B,D] is the layer input, ``memory`` /
    ``pos`` [S,B,D] (``pos`` = PE + level_embed), ``mask`` [B,S], ``query_pos`` [Q,B,D] from the unscaled anchor,
    ``sine_q`` = e' [Q,B,D]. The level weights of this layer are appended to ``level_weights_log``."""
    p = f"transformer.decoder.layers.{l}"
    L = len(spatial_shapes)
    for absent in (".cross_attn.out_proj.weight", ".cross_attn.out_proj.bias"):
        if p + absent in params:
            raise AssertionError(f"spec §2.2: {p}{absent} must not exist (per-level attention has no out_proj)")
    if params[p + ".lvl_attn.weight"].shape[0] != L:
        raise AssertionError(f"spec §2.4: {p}.lvl_attn must have {L} outputs")

    # Self-attention (as dn_dab_detr).
    q_sa = linear(out, params, p + ".sa_qcontent_proj") + linear(query_pos, params, p + ".sa_qpos_proj")
    k_sa = linear(out, params, p + ".sa_kcontent_proj") + linear(query_pos, params, p + ".sa_kpos_proj")
    v_sa = linear(out, params, p + ".sa_v_proj")
    a = base.attn_no_in_proj(q_sa, k_sa, v_sa, params, p + ".self_attn", cfg.nheads, attn_mask=attn_mask)
    y = layer_norm(out + a, params, p + ".norm1")

    # Level weights: softmax over the levels of lvl_attn(q_sa) (§4.3, §8.4).
    level_input = q_sa if cfg.level_weight_source == "layer_input" else y
    w = softmax_rows(linear(level_input, params, p + ".lvl_attn"))  # [Q,B,L]
    level_weights_log.append(w)

    # Cross-attention projections (as dn_dab_detr).
    qc = linear(y, params, p + ".ca_qcontent_proj")
    kc = linear(memory, params, p + ".ca_kcontent_proj")
    v = linear(memory, params, p + ".ca_v_proj")
    kp = linear(pos, params, p + ".ca_kpos_proj")
    if l == 0:
        qc = qc + linear(query_pos, params, p + ".ca_qpos_proj")
        kc = kc + kp
    elif p + ".ca_qpos_proj.weight" in params:
        raise AssertionError(f"spec §2.2: {p}.ca_qpos_proj must exist in layer 0 only")
    qs = linear(sine_q, params, p + ".ca_qpos_sine_proj")
    d = cfg.hidden_dim // cfg.nheads
    q_parts, k_parts = [], []
    for j in range(cfg.nheads):
        q_parts += [qc[..., j * d:(j + 1) * d], qs[..., j * d:(j + 1) * d]]
        k_parts += [kc[..., j * d:(j + 1) * d], kp[..., j * d:(j + 1) * d]]
    q_star, k_star = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)  # [Q,B,2D], [S,B,2D]

    # One attention per level (level blocks in flattening order), shared ca_out_v_proj, weighted sum.
    c = 0
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes):
        n = H * W
        o = level_attention(q_star, k_star[start:start + n], v[start:start + n], mask[:, start:start + n],
                            cfg.nheads)
        c = c + w[..., lvl:lvl + 1] * linear(o, params, p + ".ca_out_v_proj")
        start += n
    if start != memory.shape[0]:
        raise AssertionError("oracle: level sizes do not cover the memory")
    z = layer_norm(y + c, params, p + ".norm2")

    ffn = linear(base.activation(linear(z, params, p + ".linear1"), params, p, cfg.activation), params,
                 p + ".linear2")
    return layer_norm(z + ffn, params, p + ".norm3")


# ----------------------------------------------------------------------------------------------------------
# Full forward (§4), DN split (M§3.5)
# ----------------------------------------------------------------------------------------------------------

def add_patterns(params, cfg, content, pad):
    """§4.3 "Patterns": patterns.weight[j] (all D channels) added to matching rows pad + j·nq ... of every
    image; DN rows get none."""
    if cfg.num_patterns == 0:
        if "transformer.patterns.weight" in params:
            raise AssertionError("oracle: transformer.patterns.weight without --num_patterns")
        return content
    nq = cfg.num_queries
    rows = [content[:pad]]
    for j in range(cfg.num_patterns):
        rows.append(content[pad + j * nq: pad + (j + 1) * nq] + params["transformer.patterns.weight"][j])
    return torch.cat(rows, dim=0)


def oracle_forward(params, cfg, images, targets=None, training=False, noised=None):
    """§4 forward. ``noised = (labels, boxes)`` replaces the clean DN inputs (group-major entries), e.g. with the
    draws of ``oracle_dn_noise``; without it the DN queries are the clean GT (noise scales 0)."""
    dtype = params["label_enc.weight"].dtype
    batch, img_mask = base.pad_images([img.to(dtype) for img in images])
    B, D = batch.shape[0], cfg.hidden_dim

    # §4.1 - §4.2: levels, flattening, encoder (batch-first).
    srcs, masks, pes = feature_levels(params, cfg, batch, img_mask)
    spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
    level_embed = params["transformer.level_embed"]
    if level_embed.shape[0] != len(srcs):
        raise AssertionError(f"oracle: level_embed has {level_embed.shape[0]} rows for {len(srcs)} levels")
    src = torch.cat([s.reshape(B, D, -1).transpose(1, 2) for s in srcs], dim=1)  # [B,S,D] row-major per level
    mask = torch.cat([m.reshape(B, -1) for m in masks], dim=1)  # [B,S]
    lvl_pos = torch.cat([pe.reshape(B, D, -1).transpose(1, 2) + level_embed[lvl] for lvl, pe in enumerate(pes)],
                        dim=1)
    ratios = torch.stack([deformable.valid_ratios(m) for m in masks], dim=1)  # [B,L,2]
    reference = deformable.encoder_reference_points(spatial_shapes, ratios)
    memory = deformable.encoder(params, cfg, src, lvl_pos, reference, spatial_shapes, mask)
    memory = memory.transpose(0, 1)  # [S,B,D] sequence-first, no final norm (§4.2 step 5)
    pos = lvl_pos.transpose(0, 1)

    # §4.3: queries (dn_dab_detr flavour), patterns, DAB decoder with the multi-scale layer.
    content, anchors, attn_mask, dn = base.build_queries(params, cfg, targets, B, training, noised)
    pad = dn["pad"]
    content = add_patterns(params, cfg, content, pad)
    level_weights = []
    if cfg.num_feature_levels == 1:
        layer_fn = base.decoder_layer  # §2.4: one level falls back to the single-map dn_dab_detr layer
    else:
        layer_fn = partial(multi_scale_decoder_layer, spatial_shapes=spatial_shapes,
                           level_weights_log=level_weights)
    hs, refs = base.decoder(params, cfg, content, anchors, memory, attn_mask, mask, pos, layer_fn=layer_fn)

    # §4.4 heads: normalised hs, shared class / box heads, R_l with graph.
    logits, boxes = [], []
    for l in range(cfg.dec_layers):
        h = hs[l].permute(1, 0, 2)  # [B,Q,D]
        logits.append(linear(h, params, "class_embed"))
        boxes.append(sigmoid(mlp(h, params, "transformer.decoder.bbox_embed", 3)
                             + inverse_sigmoid(refs[l].permute(1, 0, 2))))

    out = {"dn": dn, "all_logits": logits, "all_boxes": boxes, "spatial_shapes": spatial_shapes,
           "valid_ratios": ratios, "level_weights": level_weights}
    if pad > 0:
        out["dn_pred_logits"] = torch.stack([x[:, :pad] for x in logits])
        out["dn_pred_boxes"] = torch.stack([x[:, :pad] for x in boxes])
    out["pred_logits"] = logits[-1][:, pad:]
    out["pred_boxes"] = boxes[-1][:, pad:]
    out["aux_outputs"] = [{"pred_logits": logits[l][:, pad:], "pred_boxes": boxes[l][:, pad:]}
                          for l in range(cfg.dec_layers - 1)] if cfg.aux_loss else []
    return out


# ----------------------------------------------------------------------------------------------------------
# §6 losses, weights, post-processor
# ----------------------------------------------------------------------------------------------------------

def oracle_losses(out, targets, cfg, training=True, dtype=None):
    """§6.1 = dn_dab_detr's criterion (matcher α = --focal_alpha, loss_xy / loss_hw logged, DN terms in training
    mode only). ``dtype`` casts the predictions first (the project's criterion computes in float32)."""
    if dtype is not None:
        out = deformable.outputs_in_dtype(out, dtype)
    return base.oracle_losses(out, targets, cfg, training)


def oracle_weight_dict(cfg):
    """§6.2: dn_dab_detr's weights except ``tgt_loss_ce`` (and its ``_i`` copies) = 1.0; no ``tgt_*`` weights
    without --use_dn (§9.1)."""
    weights = base.oracle_weight_dict(cfg)
    for key in weights:
        if key == "tgt_loss_ce" or key.startswith("tgt_loss_ce_"):
            weights[key] = TGT_LOSS_CE_WEIGHT
    return weights


def oracle_total_loss(losses, cfg):
    weights = oracle_weight_dict(cfg)
    return sum(losses[k] * w for k, w in weights.items() if k in losses)


def oracle_postprocess(out, target_sizes, num_select):
    """§6.3: dn_dab_detr's post-processor with K = --num_select over all matching queries (patterns included)."""
    return base.oracle_postprocess(out, target_sizes, num_select)


# ----------------------------------------------------------------------------------------------------------
# §2 / Appendix A: the state-dict layout, and random parameters with that layout
# ----------------------------------------------------------------------------------------------------------

def _linear_rows(prefix, n_in, n_out):
    return [(prefix + ".weight", (n_out, n_in)), (prefix + ".bias", (n_out,))]


def _mlp_rows(prefix, n_in, hidden, n_out, num_layers):
    dims = [n_in] + [hidden] * (num_layers - 1) + [n_out]
    rows = []
    for i in range(num_layers):
        rows += _linear_rows(f"{prefix}.layers.{i}", dims[i], dims[i + 1])
    return rows


def _norm_rows(prefix, dim):
    return [(prefix + ".weight", (dim,)), (prefix + ".bias", (dim,))]


def expected_non_backbone_keys(cfg):
    """Appendix A items 1-7 in state-dict order: [(name, shape)] (the shared box head listed twice)."""
    D, h, L, P, F_ = cfg.hidden_dim, cfg.nheads, cfg.num_feature_levels, cfg.enc_n_points, cfg.dim_feedforward
    prelu = cfg.activation == "prelu"
    rows = [("transformer.level_embed", (L, D))]
    for i in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        rows += _linear_rows(p + ".self_attn.sampling_offsets", D, h * L * P * 2)
        rows += _linear_rows(p + ".self_attn.attention_weights", D, h * L * P)
        rows += _linear_rows(p + ".self_attn.value_proj", D, D)
        rows += _linear_rows(p + ".self_attn.output_proj", D, D)
        rows += _norm_rows(p + ".norm1", D) + _linear_rows(p + ".linear1", D, F_)
        rows += [(p + ".activation.weight", (1,))] if prelu else []
        rows += _linear_rows(p + ".linear2", F_, D) + _norm_rows(p + ".norm2", D)
    for i in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj", "sa_v_proj",
                     "self_attn.out_proj"):
            rows += _linear_rows(f"{p}.{name}", D, D)
        rows += _norm_rows(p + ".norm1", D)
        for name in ("ca_qcontent_proj",) + (("ca_qpos_proj",) if i == 0 else ()) + (
                "ca_kcontent_proj", "ca_kpos_proj", "ca_v_proj", "ca_qpos_sine_proj"):
            rows += _linear_rows(f"{p}.{name}", D, D)
        if L == 1:
            rows += _linear_rows(p + ".cross_attn.out_proj", D, D)
        else:
            rows += _linear_rows(p + ".ca_out_v_proj", D, D) + _linear_rows(p + ".lvl_attn", D, L)
        rows += _linear_rows(p + ".linear1", D, F_) + _linear_rows(p + ".linear2", F_, D)
        rows += _norm_rows(p + ".norm2", D) + _norm_rows(p + ".norm3", D)
        rows += [(p + ".activation.weight", (1,))] if prelu else []
    bbox = _mlp_rows("bbox_embed", D, D, 4, 3)
    rows += _norm_rows("transformer.decoder.norm", D)
    rows += _mlp_rows("transformer.decoder.query_scale", D, D, D, 2)
    rows += _mlp_rows("transformer.decoder.ref_point_head", 2 * D, D, D, 2)
    rows += _mlp_rows("transformer.decoder.ref_anchor_head", D, D, 2, 2)
    rows += [("transformer.decoder." + k, s) for k, s in bbox]
    rows += [("transformer.patterns.weight", (cfg.num_patterns, D))] if cfg.num_patterns > 0 else []
    rows += _linear_rows("class_embed", D, cfg.num_classes)
    rows += [("label_enc.weight", (cfg.num_classes + 1, D - 1))]
    rows += bbox
    rows += [("refpoint_embed.weight", (cfg.num_queries, 4))]
    stage_channels = STAGE_CHANNELS[cfg.backbone]
    in_channels = stage_channels if L > 1 else stage_channels[2:]
    for lvl in range(L):
        p = f"input_proj.{lvl}"
        if lvl < len(in_channels):
            rows += [(p + ".0.weight", (D, in_channels[lvl], 1, 1)), (p + ".0.bias", (D,))]
        else:  # 3×3/2 conv: on the raw C5 for the first extra level, on the previous projected level after
            n_in = stage_channels[2] if lvl == len(in_channels) else D
            rows += [(p + ".0.weight", (D, n_in, 3, 3)), (p + ".0.bias", (D,))]
        rows += _norm_rows(p + ".1", D)
    return rows


def _resnet(cfg):
    return torchvision.models.__dict__[cfg.backbone](
        weights=None, norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, cfg.dilation])


def expected_state_dict_rows(cfg):
    """The full state-dict layout [(name, shape, dtype)]: Appendix A items 1-7, then the torchvision ResNet
    trunk (FrozenBatchNorm2d buffers, no fc) under ``backbone.0.body.`` (item 8)."""
    rows = [(k, s, "float32") for k, s in expected_non_backbone_keys(cfg)]
    for k, v in _resnet(cfg).state_dict().items():
        if not k.startswith("fc."):
            rows.append(("backbone.0.body." + k, tuple(v.shape), str(v.dtype).replace("torch.", "")))
    return rows


@torch.no_grad()
def random_params(cfg, seed, dtype=torch.float64):
    """A parameter dict with exactly the layout of :func:`expected_state_dict_rows`: the backbone at torchvision's
    random init (FrozenBN at identity), every other tensor random (≥ 2-D: N(0, 1/fan_in); norms 1 ± 0.1; biases
    and PReLU slopes N(·, 0.1²)); the shared box head equal under both names. Leaves require grad."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    backbone = {"backbone.0.body." + k: v for k, v in _resnet(cfg).state_dict().items() if not k.startswith("fc.")}
    params = {}
    for name, shape in expected_non_backbone_keys(cfg):
        if name.startswith("transformer.decoder.bbox_embed."):
            continue
        noise = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) >= 2 and name != "transformer.level_embed":
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = noise / fan_in ** 0.5
        elif name.endswith(".activation.weight"):
            t = 0.25 + 0.1 * noise
        elif name.endswith(".weight") and (".norm" in name or name.startswith("input_proj.")):
            t = 1.0 + 0.1 * noise  # LayerNorm / GroupNorm scales
        else:
            t = noise if name == "transformer.level_embed" else 0.1 * noise
        params[name] = t
    for name in list(params):
        if name.startswith("bbox_embed."):
            params["transformer.decoder." + name] = params[name]
    ordered = {k: params[k] for k, _ in expected_non_backbone_keys(cfg)}
    ordered.update(backbone)
    out = {}
    for k, v in ordered.items():
        leaf = v.detach().clone().to(dtype) if v.is_floating_point() else v.clone()
        frozen_bn_buffer = k.startswith("backbone.") and (".bn" in k or "downsample.1." in k)
        if v.is_floating_point() and not frozen_bn_buffer:
            leaf.requires_grad_(True)
        out[k] = leaf
    return out
