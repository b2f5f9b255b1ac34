"""A literal transcription of the DN-DETR spec for ``dn_dab_deformable_detr``, used as a test oracle.

Written from /work/shared/spec/DN-DETR-SPEC.md only (§1, §3.7, §4, §5, §8 items 15-21, Appendix A.2),
independently of ``models/`` (neither the model, its transformer nor the deformable-attention op were read),
so that the equivalence tests catch misreadings of the spec.  The pieces that the two models share are taken
from the already-verified single-scale oracle (:mod:`tests.spec_oracle`): clamped inverse sigmoid, sine
features, anchor sine embedding, image padding, DN query construction and noise, matcher cost, losses and
post-processor.

Multi-scale deformable attention is written as explicit bilinear interpolation with gathers (pixel
coordinates ``x·W_l − 0.5``, ``y·H_l − 0.5``; each of the four neighbours outside the map contributes zero),
not with ``grid_sample``, so that the oracle also checks how the model uses its attention op.

The oracle works on a *parameter dict* (state-dict names -> tensors, usually float64 leaves that require
grad) and mirrors the model's interface:

* ``config_from_args(args)`` -> :class:`DeformableOracleConfig`.
* ``oracle_forward(params, cfg, images, targets=None, training=False, noised=None)`` -> dict with
  ``pred_logits``, ``pred_boxes``, ``aux_outputs``, per-layer ``all_logits`` / ``all_boxes``, the DN
  bookkeeping ``dn`` and, when DN rows exist, ``dn_pred_logits`` / ``dn_pred_boxes``; plus the multi-scale
  bookkeeping ``spatial_shapes`` and ``valid_ratios``.
* ``oracle_losses(out, targets, cfg, training=True)`` -> the loss dict (§5.3 minus ``loss_xy`` / ``loss_hw``).
* ``oracle_weight_dict(cfg)``, ``oracle_total_loss(losses, cfg)`` (§5.4).
* ``oracle_postprocess(out, target_sizes)`` -> top-100 detections per image (§5.5).
* ``oracle_dn_noise`` (re-exported from the single-scale oracle, Appendix B draw order).
"""
import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from tests import spec_oracle as base
from tests.spec_oracle import inverse_sigmoid, layer_norm, linear, mlp, oracle_dn_noise, sigmoid, softmax_rows

__all__ = ["DeformableOracleConfig", "config_from_args", "oracle_forward", "oracle_losses", "oracle_weight_dict",
           "oracle_total_loss", "oracle_postprocess", "oracle_dn_noise", "msda"]

# §1.6 flavour B: one temperature for both axes, the --pe_temperature* flags are ignored.
PE_TEMPERATURE = 10000
# §4.1: every input projection ends in GroupNorm(32, D).
INPUT_PROJ_GROUPS = 32
GROUP_NORM_EPS = 1e-5
# §5.1 / §8.21: the deformable matcher's focal alpha is hard-coded.
MATCHER_FOCAL_ALPHA = 0.25
# §5.5 / §8.19: the deformable post-processor keeps a fixed top-100 (ignores --num_select).
NUM_SELECT = 100
# §1.9: ResNet stages returned for the multi-scale model (C3, C4, C5).
BACKBONE_STAGES = ("layer2", "layer3", "layer4")


@dataclass
class DeformableOracleConfig(base.OracleConfig):
    num_feature_levels: int
    enc_n_points: int
    dec_n_points: int


def config_from_args(args) -> DeformableOracleConfig:
    shared = asdict(base.config_from_args(args))
    if shared["num_patterns"] > 0:
        raise ValueError("oracle: dn_dab_deformable_detr does not support patterns (spec §3.7)")
    if args.num_feature_levels == 2:
        raise ValueError("oracle: --num_feature_levels must be 1 or >= 3 (three backbone stages)")
    # §4.1: the deformable layers always use ReLU; the post-processor always keeps 100.
    shared.update(activation="relu", num_select=NUM_SELECT)
    return DeformableOracleConfig(**shared, num_feature_levels=args.num_feature_levels,
                                  enc_n_points=args.enc_n_points, dec_n_points=args.dec_n_points)


# ----------------------------------------------------------------------------------------------------------
# Building blocks: flavour-B image PE (§1.6), GroupNorm, stock multi-head attention with an attention mask
# ----------------------------------------------------------------------------------------------------------

def image_sine_pe_flavour_b(mask, hidden_dim):
    """§1.6 flavour B: mask [B,H,W] (True = pad) -> [B,D,H,W] in float32 (the caller casts).

    Cumulative sums of the valid map down the rows (Y) and across the columns (X), minus 0.5, divided by the
    last row / column value + 1e-6, times 2π; temperature 10000; [Y-features ‖ X-features]."""
    valid = (~mask).to(torch.float32)
    Y = torch.cumsum(valid, dim=1)
    X = torch.cumsum(valid, dim=2)
    y_hat = (Y - 0.5) / (Y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x_hat = (X - 0.5) / (X[:, :, -1:] + 1e-6) * (2 * math.pi)
    num_feats = hidden_dim // 2
    feats = torch.cat([base.sine_features(y_hat, num_feats, PE_TEMPERATURE),
                       base.sine_features(x_hat, num_feats, PE_TEMPERATURE)], dim=-1)  # [B,H,W,D]
    return feats.permute(0, 3, 1, 2)


def group_norm(x, params, prefix, groups=INPUT_PROJ_GROUPS, eps=GROUP_NORM_EPS):
    """GroupNorm over [B,C,H,W]: biased mean / variance per (image, group of C/groups channels)."""
    B, C, H, W = x.shape
    g = x.reshape(B, groups, (C // groups) * H * W)
    mean = g.mean(dim=-1, keepdim=True)
    var = ((g - mean) ** 2).mean(dim=-1, keepdim=True)
    normalised = ((g - mean) / torch.sqrt(var + eps)).reshape(B, C, H, W)
    return normalised * params[prefix + ".weight"][None, :, None, None] + params[prefix + ".bias"][None, :, None, None]


def mha_with_attn_mask(x_qk, x_v, params, prefix, nheads, attn_mask):
    """Stock ``nn.MultiheadAttention`` math, batch-first: x_qk [B,Q,D] feeds both query and key, x_v [B,Q,D]
    the value; q is scaled by d^-1/2 after the in-projection; ``attn_mask [Q,Q]`` (True = blocked) or None."""
    B, Q, D = x_qk.shape
    d = D // nheads
    w, b = params[prefix + ".in_proj_weight"], params[prefix + ".in_proj_bias"]
    q = (x_qk @ w[:D].T + b[:D]).reshape(B, Q, nheads, d).transpose(1, 2)  # [B,h,Q,d]
    k = (x_qk @ w[D:2 * D].T + b[D:2 * D]).reshape(B, Q, nheads, d).transpose(1, 2)
    v = (x_v @ w[2 * D:].T + b[2 * D:]).reshape(B, Q, nheads, d).transpose(1, 2)
    logits = (q * d ** -0.5) @ k.transpose(-1, -2)  # [B,h,Q,Q]
    if attn_mask is not None:
        logits = logits.masked_fill(attn_mask[None, None], float("-inf"))
    out = softmax_rows(logits) @ v  # [B,h,Q,d]
    return linear(out.transpose(1, 2).reshape(B, Q, D), params, prefix + ".out_proj")  # head-major channels


# ----------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention (§4.4), explicit bilinear sampling
# ----------------------------------------------------------------------------------------------------------

def bilinear_sample(value_level, H, W, loc):
    """Bilinear interpolation with zero outside the map.

    value_level [B,h,H·W,dh] (row-major within the level), loc [B,h,N,2] normalised (x, y)
    -> [B,h,N,dh]. Pixel coordinates are ``x·W − 0.5``, ``y·H − 0.5``; each of the 4 neighbours that lies
    outside [0,W)×[0,H) contributes zero."""
    px = loc[..., 0] * W - 0.5
    py = loc[..., 1] * H - 0.5
    x0 = torch.floor(px)
    y0 = torch.floor(py)
    fx = px - x0
    fy = py - y0
    dh = value_level.shape[-1]
    out = 0
    for dx, dy, weight in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                           (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = (x0 + dx).long()
        yi = (y0 + dy).long()
        inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
        flat = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1))  # [B,h,N]
        gathered = torch.gather(value_level, 2, flat[..., None].expand(*flat.shape, dh))  # [B,h,N,dh]
        out = out + gathered * (weight * inside.to(weight.dtype))[..., None]
    return out


def msda(params, prefix, query, reference, value_in, spatial_shapes, padding_mask, nheads, n_points):
    """§4.4 MSDeformAttn.

    query [B,Lq,D]; reference [B,Lq,L,2] (points, encoder) or [B,Lq,L,4] (boxes, decoder), normalised;
    value_in [B,S,D]; spatial_shapes: list of (H_l, W_l); padding_mask [B,S] (True = pad) -> [B,Lq,D]."""
    B, Lq, D = query.shape
    L, P, dh = len(spatial_shapes), n_points, D // nheads
    value = linear(value_in, params, prefix + ".value_proj")
    value = value.masked_fill(padding_mask[..., None], 0.0)
    value = value.reshape(B, -1, nheads, dh).permute(0, 2, 1, 3)  # [B,h,S,dh], head j = channels j·dh..
    offsets = linear(query, params, prefix + ".sampling_offsets").reshape(B, Lq, nheads, L, P, 2)
    weights = linear(query, params, prefix + ".attention_weights").reshape(B, Lq, nheads, L * P)
    weights = softmax_rows(weights).reshape(B, Lq, nheads, L, P)

    ref = reference[:, :, None, :, None, :]  # [B,Lq,1,L,1,2|4]
    if reference.shape[-1] == 2:
        normaliser = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype)  # [L,2] (W_l, H_l)
        loc = ref + offsets / normaliser[None, None, None, :, None, :]
    elif reference.shape[-1] == 4:
        loc = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
    else:
        raise ValueError(f"oracle: reference must end in 2 or 4 coordinates, got {tuple(reference.shape)}")

    out = 0
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes):
        value_level = value[:, :, start:start + H * W]  # [B,h,H·W,dh]
        start += H * W
        loc_l = loc[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(B, nheads, Lq * P, 2)  # [B,h,Lq·P,2]
        sampled = bilinear_sample(value_level, H, W, loc_l).reshape(B, nheads, Lq, P, dh)
        a = weights[:, :, :, lvl].permute(0, 2, 1, 3)  # [B,h,Lq,P]
        out = out + (sampled * a[..., None]).sum(dim=3)  # [B,h,Lq,dh]
    out = out.permute(0, 2, 1, 3).reshape(B, Lq, D)  # head-major channels
    return linear(out, params, prefix + ".output_proj")


# ----------------------------------------------------------------------------------------------------------
# Backbone levels (§1.9, §4.3 steps 1-2)
# ----------------------------------------------------------------------------------------------------------

class ResNetStages(torch.nn.Module):
    """torchvision ResNet truncated after layer4, returning the requested stage outputs in order."""

    def __init__(self, resnet, stages):
        super().__init__()
        self.body = resnet
        self.stages = stages

    def forward(self, x):
        r = self.body
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        outputs = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(r, name)(x)
            if name in self.stages:
                outputs.append(x)
        return outputs


def backbone_stages(params, cfg, batch, stages):
    """The outputs of ResNet ``stages`` of the FrozenBatchNorm2d ResNet."""
    return base.run_backbone(params, cfg, batch, lambda resnet: ResNetStages(resnet, stages))


def resize_mask(img_mask, size):
    """§1.9: nearest-resize of the image mask (F.interpolate default mode on the float mask, then bool)."""
    return F.interpolate(img_mask[None].float(), size=size)[0].to(torch.bool)


def feature_levels(params, cfg, batch, img_mask):
    """§4.3 steps 1-2: per level the projected map [B,D,H_l,W_l], its mask and its flavour-B PE.

    Levels 0..2 are input_proj[l](C3, C4, C5) (1×1 conv + GroupNorm); level 3 is the 3×3/2 conv + GN of the
    **raw** C5; every further level is the 3×3/2 conv + GN of the previous *projected* level. Extra levels
    take their mask from the full-resolution image mask. With one level: input_proj[0](C5) only."""
    dtype = batch.dtype
    stages = BACKBONE_STAGES if cfg.num_feature_levels > 1 else ("layer4",)
    feats = backbone_stages(params, cfg, batch, stages)
    srcs, masks = [], []
    for lvl, c in enumerate(feats[:cfg.num_feature_levels]):
        p = f"input_proj.{lvl}"
        conv = F.conv2d(c, params[p + ".0.weight"], params[p + ".0.bias"])
        srcs.append(group_norm(conv, params, p + ".1"))
        masks.append(resize_mask(img_mask, c.shape[-2:]))
    previous = feats[-1]  # raw C5 for the first extra level
    for lvl in range(len(srcs), cfg.num_feature_levels):
        p = f"input_proj.{lvl}"
        conv = F.conv2d(previous, params[p + ".0.weight"], params[p + ".0.bias"], stride=2, padding=1)
        src = group_norm(conv, params, p + ".1")
        srcs.append(src)
        masks.append(resize_mask(img_mask, src.shape[-2:]))
        previous = src
    extra_keys = [k for k in params if k.startswith(f"input_proj.{cfg.num_feature_levels}.")]
    if extra_keys:
        raise AssertionError(f"oracle: unexpected input projection keys {extra_keys[:3]}")
    pes = [image_sine_pe_flavour_b(m, cfg.hidden_dim).to(dtype) for m in masks]
    return srcs, masks, pes


def valid_ratios(mask):
    """§4.3 step 4: (valid width / W, valid height / H) from the first row / first column of the mask.

    The spec gives no dtype; float32 like the other mask-derived quantities (cumulative sums, §1.6)."""
    H, W = mask.shape[-2:]
    valid_h = (~mask[:, :, 0]).sum(dim=1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(dim=1).to(torch.float32)
    return torch.stack([valid_w / W, valid_h / H], dim=-1)  # [B,2]


def encoder_reference_points(spatial_shapes, ratios):
    """§4.3 step 5: pixel centres divided by (valid ratio · size) per level, concatenated, then multiplied by
    every target level's valid ratio -> [B,S,L,2] (x, y). ratios [B,L,2]."""
    per_level = []
    for lvl, (H, W) in enumerate(spatial_shapes):
        ys = (torch.arange(H, dtype=torch.float32) + 0.5)[:, None].expand(H, W).reshape(-1)  # row-major
        xs = (torch.arange(W, dtype=torch.float32) + 0.5)[None, :].expand(H, W).reshape(-1)
        y = ys[None] / (ratios[:, None, lvl, 1] * H)
        x = xs[None] / (ratios[:, None, lvl, 0] * W)
        per_level.append(torch.stack([x, y], dim=-1))  # [B,H·W,2]
    points = torch.cat(per_level, dim=1)  # [B,S,2]
    return points[:, :, None, :] * ratios[:, None, :, :]


# ----------------------------------------------------------------------------------------------------------
# Encoder (§4.3 step 6), queries (§3, §3.7), decoder (§4.3 steps 7-8)
# ----------------------------------------------------------------------------------------------------------

def ffn(x, params, prefix, kind="relu"):
    """linear2(act(linear1(x))); ``kind`` as :func:`tests.spec_oracle.activation` (PReLU reads
    ``<prefix>.activation.weight``)."""
    return linear(base.activation(linear(x, params, prefix + ".linear1"), params, prefix, kind), params,
                  prefix + ".linear2")


def encoder(params, cfg, src, lvl_pos, reference, spatial_shapes, mask):
    x = src
    for i in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        a = msda(params, p + ".self_attn", x + lvl_pos, reference, x, spatial_shapes, mask, cfg.nheads,
                 cfg.enc_n_points)
        x = layer_norm(x + a, params, p + ".norm1")
        x = layer_norm(x + ffn(x, params, p, cfg.activation), params, p + ".norm2")
    return x


def build_queries(params, cfg, targets, batch_size, training, noised=None):
    """§3 with the §3.7 differences: content [B,Q,D], anchor logits [B,Q,4] (batch-first), attention mask.

    The DN rows, the mask and the bookkeeping come from the single-scale construction (identical, §3.7); the
    matching rows are replaced by ``[tgt_embed.weight ‖ 0]`` plus the numerically-null
    ``label_enc.weight[0,0]·0`` term, with the un-repeated ``refpoint_embed`` anchors."""
    content, anchors, attn_mask, dn = base.build_queries(params, cfg, targets, batch_size, training, noised)
    pad = dn["pad"]
    tgt = params["tgt_embed.weight"]
    match_content = torch.cat([tgt, torch.zeros(tgt.shape[0], 1, dtype=tgt.dtype)], dim=1)  # [nq,D]
    match_content = match_content + params["label_enc.weight"][0, 0] * 0
    content = torch.cat([content[:pad].transpose(0, 1), match_content[None].expand(batch_size, -1, -1)], dim=1)
    anchors = torch.cat([anchors[:pad].transpose(0, 1),
                         params["refpoint_embed.weight"][None].expand(batch_size, -1, -1)], dim=1)
    return content, anchors, attn_mask, dn


def decoder(params, cfg, content, anchors, memory, spatial_shapes, mask, ratios, attn_mask):
    """§4.3 steps 7-9: returns per-layer logits and boxes [B,Q,C] / [B,Q,4]."""
    D = cfg.hidden_dim
    r0 = sigmoid(anchors)  # init reference, not detached
    r = r0
    out = content
    box_ratios = torch.cat([ratios, ratios], dim=-1)  # [B,L,4]: (w, h, w, h) ratios for (x, y, w, h)
    logits, boxes = [], []
    for l in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{l}"
        ref_in = r[:, :, None, :] * box_ratios[:, None, :, :]  # [B,Q,L,4]
        e = base.anchor_sine(ref_in[:, :, 0, :], D)  # [B,Q,2D] from the level-0-scaled box
        raw = mlp(e, params, "transformer.decoder.ref_point_head", 2)
        query_pos = raw if l == 0 else mlp(out, params, "transformer.decoder.query_scale", 2) * raw

        qk = out + query_pos
        a = mha_with_attn_mask(qk, out, params, p + ".self_attn", cfg.nheads, attn_mask)
        x = layer_norm(out + a, params, p + ".norm2")
        c = msda(params, p + ".cross_attn", x + query_pos, ref_in, memory, spatial_shapes, mask, cfg.nheads,
                 cfg.dec_n_points)
        x = layer_norm(x + c, params, p + ".norm1")
        out = layer_norm(x + ffn(x, params, p), params, p + ".norm3")

        # The box head is one module under two names (§4.1); the decoder's name is the one that owns the
        # parameter, so gradients are collected there.
        delta = mlp(out, params, f"transformer.decoder.bbox_embed.{l}", 3)
        rho = r0 if l == 0 else r  # heads: non-detached r0 at layer 0, detached references after (§4.3 step 9)
        logits.append(linear(out, params, f"class_embed.{l}"))
        boxes.append(sigmoid(delta + inverse_sigmoid(rho)))
        r = sigmoid(delta + inverse_sigmoid(r)).detach()  # refinement feeds the next layer detached
    return logits, boxes


def oracle_forward(params, cfg, images, targets=None, training=False, noised=None):
    """§4.3 forward. ``noised = (labels, boxes)`` replaces the clean DN inputs (group-major entries), e.g. with
    the draws of ``oracle_dn_noise``; without it the DN queries are the clean GT (noise scales 0)."""
    dtype = params["label_enc.weight"].dtype
    batch, img_mask = base.pad_images([img.to(dtype) for img in images])
    B, D = batch.shape[0], cfg.hidden_dim
    srcs, masks, pes = feature_levels(params, cfg, batch, img_mask)

    content, anchors, attn_mask, dn = build_queries(params, cfg, targets, B, training, noised)

    spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
    level_embed = params["transformer.level_embed"]
    if level_embed.shape[0] != len(srcs):
        raise AssertionError(f"oracle: level_embed has {level_embed.shape[0]} rows for {len(srcs)} levels")
    src = torch.cat([s.reshape(B, D, -1).transpose(1, 2) for s in srcs], dim=1)  # [B,S,D]
    mask = torch.cat([m.reshape(B, -1) for m in masks], dim=1)  # [B,S]
    lvl_pos = torch.cat([pe.reshape(B, D, -1).transpose(1, 2) + level_embed[lvl]
                         for lvl, pe in enumerate(pes)], dim=1)
    ratios = torch.stack([valid_ratios(m) for m in masks], dim=1)  # [B,L,2]
    reference = encoder_reference_points(spatial_shapes, ratios)
    memory = encoder(params, cfg, src, lvl_pos, reference, spatial_shapes, mask)

    logits, boxes = decoder(params, cfg, content, anchors, memory, spatial_shapes, mask, ratios, attn_mask)

    pad = dn["pad"]
    out = {"dn": dn, "all_logits": logits, "all_boxes": boxes, "spatial_shapes": spatial_shapes,
           "valid_ratios": ratios}
    if pad > 0:
        out["dn_pred_logits"] = torch.stack([x[:, :pad] for x in logits])
        out["dn_pred_boxes"] = torch.stack([x[:, :pad] for x in boxes])
    out["pred_logits"] = logits[-1][:, pad:]
    out["pred_boxes"] = boxes[-1][:, pad:]
    out["aux_outputs"] = [{"pred_logits": logits[l][:, pad:], "pred_boxes": boxes[l][:, pad:]}
                          for l in range(cfg.dec_layers - 1)] if cfg.aux_loss else []
    return out


# ----------------------------------------------------------------------------------------------------------
# Losses (§5.2 with the deformable differences, §3.6), weights (§5.4), post-processor (§5.5)
# ----------------------------------------------------------------------------------------------------------

def matching_losses(pred_logits, pred_boxes, targets, cfg, num_boxes, suffix, with_class_error):
    """§5.2 for one layer: matched with focal α fixed at 0.25 (§8.21), ``loss_ce`` with ``--focal_alpha``,
    no ``loss_xy`` / ``loss_hw``."""
    matcher_cfg = replace(cfg, focal_alpha=MATCHER_FOCAL_ALPHA)
    losses = base.matching_losses(pred_logits, pred_boxes, targets, matcher_cfg, num_boxes, suffix,
                                  with_class_error)
    del losses["loss_xy" + suffix], losses["loss_hw" + suffix]
    indices = base.hungarian_match(pred_logits.detach(), pred_boxes.detach(), targets, matcher_cfg)
    onehot = torch.zeros_like(pred_logits)
    for b, (rows, cols) in enumerate(indices):
        for qi, ti in zip(rows, cols):
            onehot[b, qi, int(targets[b]["labels"][ti])] = 1.0
    losses["loss_ce" + suffix] = base.focal_loss_literal(pred_logits, onehot, num_boxes, cfg.focal_alpha)
    return losses


def outputs_in_dtype(out, dtype):
    """The prediction tensors of ``out`` cast to ``dtype`` (differentiably), bookkeeping unchanged."""
    cast = dict(out)
    for key in ("pred_logits", "pred_boxes", "dn_pred_logits", "dn_pred_boxes"):
        if key in out:
            cast[key] = out[key].to(dtype)
    cast["aux_outputs"] = [{k: v.to(dtype) for k, v in aux.items()} for aux in out["aux_outputs"]]
    return cast


def oracle_losses(out, targets, cfg, training=True, dtype=None):
    """Loss dict (world size 1); ``training`` is the criterion's mode (DN terms only in training).

    ``dtype`` (e.g. float32, the precision the project's criterion works in whatever the model dtype) casts
    the predictions first: GIoU of tiny boxes against the +1e-6 terms of §1.5 is precision-sensitive."""
    if dtype is not None:
        out = outputs_in_dtype(out, dtype)
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    losses = matching_losses(out["pred_logits"], out["pred_boxes"], targets, cfg, num_boxes, "", True)
    for i, aux in enumerate(out["aux_outputs"]):
        losses.update(matching_losses(aux["pred_logits"], aux["pred_boxes"], targets, cfg, num_boxes, f"_{i}",
                                      False))
    if cfg.use_dn:
        losses.update(base.dn_losses(out, targets, cfg, training))
    return losses


def oracle_weight_dict(cfg):
    """§5.4 weights that can meet a loss (the official ``_enc`` copies never do without two-stage)."""
    return base.oracle_weight_dict(cfg)


def oracle_total_loss(losses, cfg):
    return base.oracle_total_loss(losses, cfg)


def oracle_postprocess(out, target_sizes):
    return base.oracle_postprocess(out, target_sizes, NUM_SELECT)
