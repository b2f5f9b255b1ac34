"""A literal transcription of the DINO-variant spec (``dn_dab_dino_deformable_detr``), used as a test oracle.

Written from /work/shared/spec/DN-DINO-VARIANT-SPEC.md (cited ``§n``) and the main spec DN-DETR-SPEC.md (cited
``M§n``) only, independently of ``models/`` (nothing under models/ was read).  What the variant shares with
``dn_dab_deformable_detr`` (backbone levels, flavour-B PE, encoder, MSDA with explicit bilinear gathers,
decoder layers, matcher, matching losses, post-processor) is taken from the verified oracles
:mod:`tests.spec_oracle_deformable` and :mod:`tests.spec_oracle`; new here are:

* contrastive denoising (§4.2): doubled entries ``[real_b, copies_b]`` per image, group height
  ``P = 2·n_max``, dynamic group count for ``--scalar >= 100``, the *positional* positive/negative split
  (§9.2) or, opt-in, the per-image split of §10.1, corner-form box noise drawn as sign then magnitude (§8),
  the label-``C`` override of negatives, and the non-contrastive corner-noise path (§4.2, last paragraph);
* two-stage encoder proposals and mixed query selection (§4.5);
* look-forward-twice (§4.6-4.7), with a switch ``lft`` that changes gradients only;
* the contrastive DN losses (§5.3), the ``_enc`` losses (§5.2) and the weight dict with ``_enc`` copies (§5.5);
* the expected state-dict layout (§2.2, Appendix A; M Appendix A.2) for the manifest self-tests.

The oracle works on a *parameter dict* (state-dict names -> tensors, float64 leaves requiring grad):

* ``config_from_args(args)`` -> :class:`DinoOracleConfig` (the new flags are read with ``getattr`` defaults).
* ``oracle_forward(params, cfg, images, targets=None, training=False, noised=None)`` -> dict with
  ``pred_logits``, ``pred_boxes``, ``aux_outputs``, per-layer ``all_logits`` / ``all_boxes``,
  ``init_reference`` (the decoder's input boxes r0), the DN bookkeeping ``dn`` (see :func:`dn_entries`) and,
  when DN rows exist, ``dn_pred_logits`` / ``dn_pred_boxes`` ``[L,B,pad,·]``; with two-stage also
  ``enc_outputs`` (``pred_logits [B,S,C]``, ``pred_boxes [B,S,4]``), ``proposals`` (float32 ``[B,S,4]``),
  ``proposal_valid`` ``[B,S]`` and ``topk_indices`` ``[B,K]``; plus ``spatial_shapes`` and ``valid_ratios``.
  ``noised = (labels, boxes)`` are the DN *input* labels (after the negative override) and noised boxes of
  the ``G·M`` entries, e.g. from :func:`oracle_dn_noise` or from the model's DN meta; without it the DN
  queries are the clean boxes with the negatives' labels set to ``C``.
* ``oracle_losses(out, targets, cfg, training=True, dtype=None)``, ``oracle_weight_dict(cfg)``,
  ``oracle_total_loss(losses, cfg)``, ``oracle_postprocess(out, target_sizes, cfg)``.
* ``oracle_dn_noise(targets, cfg, draws=None)`` (§8 order; ``draws`` from :func:`oracle_dn_draws` can be
  injected), ``dn_entries``, ``dn_group_count``, ``encoder_proposals``, ``expected_state_dict_keys(cfg)``.

Decisions where the spec is silent or where the official code crashes (§1.3, §10), so the model must agree:

* ``--contrastive --box_noise_scale 0`` (§10.4): the split is computed anyway; no sign / magnitude draws and
  the boxes stay exactly the clean ones (no corner round trip).
* DN without ``--contrastive`` (§10.2): the §4.2 non-contrastive path; the group-count rule of §4.2 step 2 is
  applied with ``P = n_max`` (only ``--scalar < 100`` is tested; dynamic groups there are not specified).
* No ``--use_dn`` (§10.2): M§9.3 (no DN rows, mask, meta, ``tgt_*`` keys or weights); with two-stage the
  decoder gets the K mixed queries only.
* ``--num_patterns > 0`` with two-stage: ``patterns_embed`` exists (637-entry manifest) and is never read;
  without two-stage: a clear ValueError (nothing it could mean). Two-stage with fewer than K encoder tokens:
  ValueError naming ``--num_queries`` (§10.7).
* The proposal grid, validity and proposal logits are computed in float32 (mask-derived, like the valid
  ratios), then cast to the model dtype for the addition to the box head output.
* The weight dict carries the ``_enc`` copies whenever aux loss is on, with or without two-stage (§5.5 makes no
  distinction; M§5.4: the deformable builder adds them too).
"""
import math
from dataclasses import asdict, dataclass, replace

import torch

from tests import spec_oracle as base
from tests import spec_oracle_deformable as deform
from tests.spec_oracle import inverse_sigmoid, layer_norm, linear, mlp, sigmoid

__all__ = ["DinoOracleConfig", "config_from_args", "oracle_forward", "oracle_losses", "oracle_weight_dict",
           "oracle_total_loss", "oracle_postprocess", "oracle_dn_noise", "oracle_dn_draws", "dn_entries",
           "dn_group_count", "encoder_proposals", "expected_state_dict_keys", "PROPOSAL_BASE_SIZE"]

# §4.5 step 1: proposal size 0.05·2^l at level l; step 2: validity strictly inside (0.01, 0.99).
PROPOSAL_BASE_SIZE = 0.05
PROPOSAL_VALID_LOW, PROPOSAL_VALID_HIGH = 0.01, 0.99
# §4.2 step 2: --scalar at or above this value means "dynamic group count".
DYNAMIC_GROUPS_FROM = 100
# §6: post-processor default top-K of this variant.
DEFAULT_NUM_RESULTS = 300
# ResNet C3, C4, C5 channel counts (M§1.9) for the expected input projections.
BACKBONE_CHANNELS = {"resnet18": (128, 256, 512), "resnet34": (128, 256, 512),
                     "resnet50": (512, 1024, 2048), "resnet101": (512, 1024, 2048)}


@dataclass
class DinoOracleConfig(deform.DeformableOracleConfig):
    dim_feedforward: int
    two_stage: bool
    contrastive: bool
    num_results: int
    # §4.6: look-forward-twice is always on in the official code; ``lft=False`` is the oracle's switch for
    # showing that LFT changes gradients only (same values as dn_dab_deformable_detr's detached heads).
    lft: bool = True
    # §10.1 opt-in fix (proposed flag ``--cdn_split_per_image``): negatives are the copies (j_b >= n_b)
    # instead of the second half of each group's flat list.
    cdn_split_per_image: bool = False


def config_from_args(args) -> DinoOracleConfig:
    shared = asdict(base.config_from_args(args))
    two_stage = bool(getattr(args, "two_stage", False))
    if shared["num_patterns"] > 0 and not two_stage:
        # §1.3 / §10.5: crashes officially; without two-stage there is nothing a pattern could mean.
        raise ValueError("oracle: --num_patterns > 0 needs --two_stage (where it is unused), spec §10.5")
    if args.num_feature_levels == 2:
        raise ValueError("oracle: --num_feature_levels must be 1 or >= 3 (three backbone stages)")
    num_results = int(getattr(args, "num_results", DEFAULT_NUM_RESULTS))
    # §1.2: activation always ReLU; §6: the post-processor keeps --num_results (--num_select is ignored).
    shared.update(activation="relu", num_select=num_results)
    return DinoOracleConfig(**shared, num_feature_levels=args.num_feature_levels, enc_n_points=args.enc_n_points,
                            dec_n_points=args.dec_n_points, dim_feedforward=args.dim_feedforward,
                            two_stage=two_stage, contrastive=bool(getattr(args, "contrastive", False)),
                            num_results=num_results,
                            cdn_split_per_image=bool(getattr(args, "cdn_split_per_image", False)))


def head(params, kind, l):
    """Prefix of head ``kind`` (``class_embed`` / ``bbox_embed``) number ``l`` under the path that *owns* the
    parameter: the decoder's copy when it exists (§2.2: shared modules appear under their first path, which is
    ``transformer.decoder.*``), else the top-level one (class heads without two-stage, M§4.1)."""
    p = f"transformer.decoder.{kind}.{l}"
    probe = p + (".weight" if kind == "class_embed" else ".layers.0.weight")
    return p if probe in params else f"{kind}.{l}"


# ----------------------------------------------------------------------------------------------------------
# Contrastive denoising queries (§4.2, §4.3, §8, §9.1-9.6, §10.1, §10.4)
# ----------------------------------------------------------------------------------------------------------

def dn_group_count(scalar, group_height):
    """§4.2 step 2 / §9.3: 1 if P = 0; ``scalar // P`` if scalar >= 100; else ``scalar``; at least 1."""
    if group_height == 0:
        return 1
    groups = scalar // group_height if scalar >= DYNAMIC_GROUPS_FROM else scalar
    return max(groups, 1)


def dn_entries(targets, cfg):
    """DN bookkeeping of one training forward (§4.2 steps 1-4 and 9).

    Contrastive: per image ``2·n_b`` flat entries (``n_b`` real GT, then ``n_b`` copies labelled ``C``),
    image-major, ``M = 2N``; group height ``P = max 2·n_b``. Non-contrastive (§4.2 last paragraph): ``n_b``
    entries per image, ``P = n_max`` (the same group-count rule is applied with this ``P`` — the spec only
    says "groups of n_max rows"). Entries are group-major: entry ``g·M + j`` is flat entry ``j`` in group
    ``g``, placed at row ``g·P + j_b`` of its image. ``negative``: positional ``j >= N`` (official, §9.2) or
    ``copy`` with ``cfg.cdn_split_per_image`` (§10.1); always False without contrastive."""
    C = cfg.num_classes
    counts = [len(t["labels"]) for t in targets]
    N = sum(counts)
    flat = []
    for b, t in enumerate(targets):
        n = counts[b]
        reps = 2 if cfg.contrastive else 1
        for j in range(reps * n):
            copy = j >= n
            flat.append({"batch": b, "j_b": j, "gt": j % n, "copy": copy,
                         "label": C if copy else int(t["labels"][j % n]), "box": t["boxes"][j % n]})
    M = len(flat)
    P = max(((2 if cfg.contrastive else 1) * n for n in counts), default=0)
    G = dn_group_count(cfg.scalar, P)
    entries = []
    for g in range(G):
        for j, f in enumerate(flat):
            if not cfg.contrastive:
                negative = False
            elif cfg.cdn_split_per_image:
                negative = f["copy"]
            else:
                negative = j >= N
            entries.append(dict(f, group=g, flat=j, row=g * P + f["j_b"], negative=negative))
    return {"pad": G * P, "group_size": P, "num_groups": G, "num_entries_per_group": M, "num_gt": N,
            "num_tgt": G * N, "entries": entries, "contrastive": cfg.contrastive}


def oracle_dn_draws(num_entries, cfg):
    """The random draws of one DN forward, in the order of §8 (float32 / int64 on the CPU generator):
    label flips ``p ~ U[0,1) [E]`` then new labels ``randint(0, C) [#p < λ_l]`` (if λ_l > 0); then, if
    λ_b > 0, contrastive: signs ``randint(0, 2)`` produced as float32 ``[E,4]`` then magnitudes
    ``U[0,1) [E,4]``; non-contrastive: one ``U[0,1) [E,4]`` (used as ``2u − 1``)."""
    draws = {}
    if cfg.label_noise_scale > 0:
        draws["label_p"] = torch.rand(num_entries, dtype=torch.float32)
        n_flip = int((draws["label_p"] < cfg.label_noise_scale).sum())
        draws["label_new"] = torch.randint(0, cfg.num_classes, (n_flip,), dtype=torch.int64)
    if cfg.box_noise_scale > 0:
        if cfg.contrastive:
            draws["sign"] = torch.randint(0, 2, (num_entries, 4), dtype=torch.float32)
            draws["magnitude"] = torch.rand(num_entries, 4, dtype=torch.float32)
        else:
            draws["uniform"] = torch.rand(num_entries, 4, dtype=torch.float32)
    return draws


def oracle_dn_noise(targets, cfg, draws=None):
    """DN input labels ``[E]`` (int64, after label noise and the negative override) and noised boxes
    ``[E,4]`` (float32 cxcywh) of the ``G·M`` entries. ``draws=None`` draws now from the global generator in
    the §8 order (seed right before, like the model forward); with λ_b = 0 there is no box noise (the
    official code crashes there, §10.4)."""
    dn = dn_entries(targets, cfg)
    entries = dn["entries"]
    if draws is None:
        draws = oracle_dn_draws(len(entries), cfg)
    lam_l, lam_b = cfg.label_noise_scale, cfg.box_noise_scale
    labels = [int(e["label"]) for e in entries]  # clean doubled labels (C for copies), §4.2 step 5 input
    if lam_l > 0:
        slot = 0
        for i in range(len(entries)):
            if draws["label_p"][i] < lam_l:
                labels[i] = int(draws["label_new"][slot])
                slot += 1
    for i, e in enumerate(entries):  # §4.2 step 7: after label noise
        if e["negative"]:
            labels[i] = cfg.num_classes
    boxes = []
    for i, e in enumerate(entries):
        if lam_b <= 0:  # no box noise: the clean box itself
            boxes.append(e["box"].to(torch.float32))
            continue
        cx, cy, w, h = (v for v in e["box"].to(torch.float32))
        corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        half = [w / 2, h / 2, w / 2, h / 2]
        for c in range(4):
            if cfg.contrastive:
                sign = draws["sign"][i, c] * 2.0 - 1.0
                magnitude = draws["magnitude"][i, c] + (1.0 if e["negative"] else 0.0)
                corners[c] = corners[c] + sign * magnitude * half[c] * lam_b
            else:
                u = draws["uniform"][i, c] * 2.0 - 1.0
                corners[c] = corners[c] + u * half[c] * lam_b
        x0, y0, x1, y1 = [torch.clamp(v, 0.0, 1.0) for v in corners]
        boxes.append(torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]))
    noised_boxes = torch.stack(boxes) if boxes else torch.zeros(0, 4)
    return torch.tensor(labels, dtype=torch.int64), noised_boxes


def dn_attention_mask(pad, group_size, num_queries):
    """§4.3 / M§3.4, element by element: matching rows block DN columns; DN rows block DN columns of other
    groups (group height ``group_size``)."""
    Q = pad + num_queries
    mask = torch.zeros(Q, Q, dtype=torch.bool)
    for i in range(Q):
        for j in range(Q):
            if i >= pad:
                mask[i, j] = j < pad
            else:
                mask[i, j] = j < pad and (j // group_size) != (i // group_size)
    return mask


def build_dn_part(params, cfg, targets, batch_size, training, noised=None):
    """DN content ``[B,pad,D]``, DN anchor logits ``[B,pad,4]``, the mask (None at eval / without DN) and the
    bookkeeping ``dn`` with the input labels / boxes (§4.2 steps 8-9)."""
    D = cfg.hidden_dim
    label_enc = params["label_enc.weight"]
    dtype = label_enc.dtype
    dn_active = training and cfg.use_dn
    if dn_active:
        dn = dn_entries(targets, cfg)
    else:
        dn = {"pad": 0, "group_size": 0, "num_groups": 0, "num_entries_per_group": 0, "num_gt": 0, "num_tgt": 0,
              "entries": [], "contrastive": cfg.contrastive}
    entries = dn["entries"]
    if noised is None:
        in_labels = [cfg.num_classes if e["negative"] else int(e["label"]) for e in entries]
        in_boxes = [e["box"] for e in entries]
    else:
        in_labels = [int(x) for x in noised[0]]
        in_boxes = list(noised[1])
    pad = dn["pad"]
    one = torch.ones(1, dtype=dtype)
    content_rows = [[torch.zeros(D, dtype=dtype) for _ in range(pad)] for _ in range(batch_size)]
    anchor_rows = [[torch.zeros(4, dtype=dtype) for _ in range(pad)] for _ in range(batch_size)]
    for e, lab, box in zip(entries, in_labels, in_boxes):
        content_rows[e["batch"]][e["row"]] = torch.cat([label_enc[lab], one])  # indicator 1 (§9.6)
        anchor_rows[e["batch"]][e["row"]] = inverse_sigmoid(box).to(dtype)  # in the box dtype, then cast
    content = torch.stack([torch.stack(r) if r else torch.zeros(0, D, dtype=dtype) for r in content_rows])
    anchors = torch.stack([torch.stack(r) if r else torch.zeros(0, 4, dtype=dtype) for r in anchor_rows])
    attn_mask = dn_attention_mask(pad, max(dn["group_size"], 1), cfg.num_queries) if dn_active else None
    dn = dict(dn, active=dn_active, noised_labels=in_labels, noised_boxes=in_boxes)
    return content, anchors, attn_mask, dn


# ----------------------------------------------------------------------------------------------------------
# Two-stage proposals and mixed query selection (§4.5)
# ----------------------------------------------------------------------------------------------------------

def encoder_proposals(level_masks):
    """§4.5 steps 1-3 for per-level masks ``[B,H_l,W_l]`` (True = pad): proposals ``[B,S,4]`` (cxcywh),
    validity ``[B,S]`` and proposal logits ``[B,S,4]`` (+∞ where invalid).

    The grid is normalised by the integer valid **counts** (first column / first row of the level mask).
    The spec gives no dtype; like the valid ratios (M§4.3 step 4) everything mask-derived is float32."""
    props, pads = [], []
    for lvl, m in enumerate(level_masks):
        B, H, W = m.shape
        VH = (~m[:, :, 0]).sum(dim=1).to(torch.float32)  # [B]
        VW = (~m[:, 0, :]).sum(dim=1).to(torch.float32)
        rows = []
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    cx = (torch.tensor(j, dtype=torch.float32) + 0.5) / VW[b]
                    cy = (torch.tensor(i, dtype=torch.float32) + 0.5) / VH[b]
                    size = torch.tensor(PROPOSAL_BASE_SIZE * 2 ** lvl, dtype=torch.float32)
                    rows.append(torch.stack([cx, cy, size, size]))
        props.append(torch.stack(rows).reshape(B, H * W, 4))
        pads.append(m.reshape(B, H * W))
    prop = torch.cat(props, dim=1)
    padded = torch.cat(pads, dim=1)
    valid = ((prop > PROPOSAL_VALID_LOW) & (prop < PROPOSAL_VALID_HIGH)).all(dim=-1) & ~padded
    logits = torch.log(prop / (1 - prop))
    logits = torch.where(valid[..., None], logits, torch.full_like(logits, math.inf))
    return prop, valid, logits


def mixed_query_selection(params, cfg, memory, level_masks):
    """§4.5 steps 1-7 and 9: encoder outputs for all tokens, the top-K (class-0 logit) detached anchors and
    the learned content."""
    L, K = cfg.dec_layers, cfg.num_queries
    prop, valid, prop_logits = encoder_proposals(level_masks)
    S = memory.shape[1]
    if S < K:
        raise ValueError(f"oracle: two-stage needs at least --num_queries={K} encoder tokens, got {S} (§10.7)")
    features = torch.where(valid[..., None], memory, torch.zeros_like(memory))
    om = layer_norm(linear(features, params, "transformer.enc_output"), params, "transformer.enc_output_norm")
    enc_logits = linear(om, params, head(params, "class_embed", L))
    enc_box_logits = mlp(om, params, head(params, "bbox_embed", L), 3) + prop_logits.to(memory.dtype)
    topk = torch.topk(enc_logits[..., 0], K, dim=1).indices  # [B,K], descending class-0 logit
    selected = torch.stack([enc_box_logits[b, topk[b]] for b in range(memory.shape[0])]).detach()
    anchors = sigmoid(selected) + params["transformer.tgt_embed.weight"][0, 0] * 0  # null term (§4.5 step 6)
    content = params["transformer.tgt_embed.weight"]  # [K,D], the same for every image (step 7)
    enc_outputs = {"pred_logits": enc_logits, "pred_boxes": sigmoid(enc_box_logits)}
    return content, anchors, enc_outputs, {"proposals": prop, "proposal_valid": valid, "topk_indices": topk}


# ----------------------------------------------------------------------------------------------------------
# Decoder with look-forward-twice (§4.6, §4.7)
# ----------------------------------------------------------------------------------------------------------

def decoder(params, cfg, content, r0, memory, spatial_shapes, mask, ratios, attn_mask):
    """M§4.3 step 8 layers; heads of layer l >= 1 use the non-detached refined box of layer l−1 when
    ``cfg.lft`` (§4.6), else the detached one (dn_dab_deformable_detr). Returns per-layer logits / boxes."""
    D = cfg.hidden_dim
    r = r0
    r_tilde = None
    out = content
    box_ratios = torch.cat([ratios, ratios], dim=-1)  # [B,L,4]
    logits, boxes = [], []
    for l in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{l}"
        ref_in = r[:, :, None, :] * box_ratios[:, None, :, :]
        e = base.anchor_sine(ref_in[:, :, 0, :], D)
        raw = mlp(e, params, "transformer.decoder.ref_point_head", 2)
        query_pos = raw if l == 0 else mlp(out, params, "transformer.decoder.query_scale", 2) * raw
        qk = out + query_pos
        a = deform.mha_with_attn_mask(qk, out, params, p + ".self_attn", cfg.nheads, attn_mask)
        x = layer_norm(out + a, params, p + ".norm2")
        c = deform.msda(params, p + ".cross_attn", x + query_pos, ref_in, memory, spatial_shapes, mask, cfg.nheads,
                        cfg.dec_n_points)
        x = layer_norm(x + c, params, p + ".norm1")
        out = layer_norm(x + deform.ffn(x, params, p), params, p + ".norm3")

        delta = mlp(out, params, head(params, "bbox_embed", l), 3)
        if l == 0:
            rho = r0
        else:
            rho = r_tilde if cfg.lft else r
        logits.append(linear(out, params, head(params, "class_embed", l)))
        boxes.append(sigmoid(delta + inverse_sigmoid(rho)))
        r_tilde = sigmoid(delta + inverse_sigmoid(r))  # kept with its graph (LFT)
        r = r_tilde.detach()  # what the next layer uses
    return logits, boxes


# ----------------------------------------------------------------------------------------------------------
# Forward (§4)
# ----------------------------------------------------------------------------------------------------------

def oracle_forward(params, cfg, images, targets=None, training=False, noised=None):
    dtype = params["label_enc.weight"].dtype
    batch, img_mask = base.pad_images([img.to(dtype) for img in images])
    B, D = batch.shape[0], cfg.hidden_dim
    srcs, masks, pes = deform.feature_levels(params, cfg, batch, img_mask)

    dn_content, dn_anchors, attn_mask, dn = build_dn_part(params, cfg, targets, B, training, noised)

    spatial_shapes = [tuple(s.shape[-2:]) for s in srcs]
    level_embed = params["transformer.level_embed"]
    if level_embed.shape[0] != len(srcs):
        raise AssertionError(f"oracle: level_embed has {level_embed.shape[0]} rows for {len(srcs)} levels")
    src = torch.cat([s.reshape(B, D, -1).transpose(1, 2) for s in srcs], dim=1)
    mask = torch.cat([m.reshape(B, -1) for m in masks], dim=1)
    lvl_pos = torch.cat([pe.reshape(B, D, -1).transpose(1, 2) + level_embed[lvl] for lvl, pe in enumerate(pes)], dim=1)
    ratios = torch.stack([deform.valid_ratios(m) for m in masks], dim=1)
    reference = deform.encoder_reference_points(spatial_shapes, ratios)
    memory = deform.encoder(params, cfg, src, lvl_pos, reference, spatial_shapes, mask)

    null = params["label_enc.weight"][0, 0] * 0
    out = {"dn": dn, "spatial_shapes": spatial_shapes, "valid_ratios": ratios}
    if cfg.two_stage:
        mqs_content, mqs_anchors, enc_outputs, extra = mixed_query_selection(params, cfg, memory, masks)
        content = torch.cat([dn_content + null, mqs_content[None].expand(B, -1, -1)], dim=1)
        r0 = torch.cat([sigmoid(dn_anchors), mqs_anchors], dim=1)
        out["enc_outputs"] = enc_outputs
        out.update(extra)
    else:
        # §4.2 step 10: [tgt_embed ‖ 0] + 0·label_enc[0,0]; anchors refpoint_embed; step 11: null again.
        tgt = params["tgt_embed.weight"]
        match_content = torch.cat([tgt, torch.zeros(tgt.shape[0], 1, dtype=dtype)], dim=1) + null
        content = torch.cat([dn_content, match_content[None].expand(B, -1, -1)], dim=1) + null
        anchors = torch.cat([dn_anchors, params["refpoint_embed.weight"][None].expand(B, -1, -1)], dim=1)
        r0 = sigmoid(anchors)
    out["init_reference"] = r0

    logits, boxes = decoder(params, cfg, content, r0, memory, spatial_shapes, mask, ratios, attn_mask)
    pad = dn["pad"]
    out.update(all_logits=logits, all_boxes=boxes)
    if pad > 0:
        out["dn_pred_logits"] = torch.stack([x[:, :pad] for x in logits])
        out["dn_pred_boxes"] = torch.stack([x[:, :pad] for x in boxes])
    out["pred_logits"] = logits[-1][:, pad:]
    out["pred_boxes"] = boxes[-1][:, pad:]
    out["aux_outputs"] = [{"pred_logits": logits[l][:, pad:], "pred_boxes": boxes[l][:, pad:]}
                          for l in range(cfg.dec_layers - 1)] if cfg.aux_loss else []
    return out


# ----------------------------------------------------------------------------------------------------------
# Losses (§5), weights (§5.5), post-processor (§6)
# ----------------------------------------------------------------------------------------------------------

def dn_losses(out, cfg, training):
    """§5.3 (contrastive) / M§3.6 (non-contrastive): focal over all entries (a copy's target row is all-zero),
    L1 / GIoU over the non-negative entries, everything ÷ ``num_tgt = G·N``."""
    suffixes = [""] + ([f"_{i}" for i in range(cfg.dec_layers - 1)] if cfg.aux_loss else [])
    names = ["tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou"]
    if not training or "dn_pred_logits" not in out:
        return {n + s: 0.0 for s in suffixes for n in names}
    dn = out["dn"]
    entries = dn["entries"]
    num_tgt = dn["num_tgt"]
    C = cfg.num_classes
    labels = [int(e["label"]) for e in entries]
    clean = torch.stack([e["box"] for e in entries]).to(out["dn_pred_boxes"].dtype)
    positives = [i for i, e in enumerate(entries) if not e["negative"]]
    losses = {}
    for l in range(cfg.dec_layers):
        suffix = "" if l == cfg.dec_layers - 1 else f"_{l}"
        if suffix not in suffixes:
            continue
        lg = torch.stack([out["dn_pred_logits"][l, e["batch"], e["row"]] for e in entries])
        bx = torch.stack([out["dn_pred_boxes"][l, e["batch"], e["row"]] for e in entries])
        onehot = torch.zeros_like(lg)
        for i, lab in enumerate(labels):
            if lab < C:
                onehot[i, lab] = 1.0
        losses["tgt_loss_ce" + suffix] = base.focal_loss_literal(lg[None], onehot[None], num_tgt, cfg.focal_alpha)
        losses["tgt_class_error" + suffix] = 100.0 - base.top1_accuracy(lg.detach(), labels)
        bp, cp = bx[positives], clean[positives]
        losses["tgt_loss_bbox" + suffix] = (bp - cp).abs().sum() / num_tgt
        losses["tgt_loss_giou" + suffix] = base.matched_giou_loss_sum(bp, cp) / num_tgt
    return losses


def outputs_in_dtype(out, dtype):
    cast = deform.outputs_in_dtype(out, dtype)
    if "enc_outputs" in out:
        cast["enc_outputs"] = {k: v.to(dtype) for k, v in out["enc_outputs"].items()}
    return cast


def binary_targets(targets):
    """§5.2: a copy of the targets with every label set to 0 (boxes unchanged)."""
    return [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]


def oracle_losses(out, targets, cfg, training=True, dtype=None):
    """Loss dict (world size 1): matching (last + aux), ``_enc`` (two-stage, also at eval), DN (training)."""
    if dtype is not None:
        out = outputs_in_dtype(out, dtype)
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    losses = deform.matching_losses(out["pred_logits"], out["pred_boxes"], targets, cfg, num_boxes, "", True)
    for i, aux in enumerate(out["aux_outputs"]):
        losses.update(deform.matching_losses(aux["pred_logits"], aux["pred_boxes"], targets, cfg, num_boxes,
                                             f"_{i}", False))
    if "enc_outputs" in out:
        enc = out["enc_outputs"]
        losses.update(deform.matching_losses(enc["pred_logits"], enc["pred_boxes"], binary_targets(targets), cfg,
                                             num_boxes, "_enc", False))
    if cfg.use_dn:
        losses.update(dn_losses(out, cfg, training))
    return losses


def oracle_weight_dict(cfg):
    """§5.5: base (+ tgt_* with DN); with aux loss every base key also with ``_0 … _{L−2}`` and ``_enc``
    (the ``tgt_*_enc`` weights are dead). With --no_aux_loss the ``_enc`` losses are unweighted."""
    base_w = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    if cfg.use_dn:
        base_w.update({"tgt_loss_ce": cfg.cls_loss_coef, "tgt_loss_bbox": cfg.bbox_loss_coef,
                       "tgt_loss_giou": cfg.giou_loss_coef})
    weights = dict(base_w)
    if cfg.aux_loss:
        for suffix in [f"_{i}" for i in range(cfg.dec_layers - 1)] + ["_enc"]:
            weights.update({k + suffix: v for k, v in base_w.items()})
    return weights


def oracle_total_loss(losses, cfg):
    weights = oracle_weight_dict(cfg)
    return sum(losses[k] * w for k, w in weights.items() if k in losses)


def oracle_postprocess(out, target_sizes, cfg):
    """§6: top ``--num_results`` over K·C sigmoid scores."""
    return base.oracle_postprocess(out, target_sizes, cfg.num_results)


# ----------------------------------------------------------------------------------------------------------
# Expected state-dict layout (§2, Appendix A; M Appendix A.2), non-backbone entries in order
# ----------------------------------------------------------------------------------------------------------

def expected_state_dict_keys(cfg):
    """``[(name, shape)]`` of the non-backbone state-dict entries, in order."""
    D, F_, h, Lv, C, K = (cfg.hidden_dim, cfg.dim_feedforward, cfg.nheads, cfg.num_feature_levels,
                          cfg.num_classes, cfg.num_queries)
    keys = [("transformer.level_embed", (Lv, D))]

    def lin(prefix, out_f, in_f):
        keys.extend([(prefix + ".weight", (out_f, in_f)), (prefix + ".bias", (out_f,))])

    def norm(prefix):
        keys.extend([(prefix + ".weight", (D,)), (prefix + ".bias", (D,))])

    def msda_keys(prefix, points):
        lin(prefix + ".sampling_offsets", h * Lv * points * 2, D)
        lin(prefix + ".attention_weights", h * Lv * points, D)
        lin(prefix + ".value_proj", D, D)
        lin(prefix + ".output_proj", D, D)

    for i in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        msda_keys(p + ".self_attn", cfg.enc_n_points)
        norm(p + ".norm1")
        lin(p + ".linear1", F_, D)
        lin(p + ".linear2", D, F_)
        norm(p + ".norm2")
    for i in range(cfg.dec_layers):
        p = f"transformer.decoder.layers.{i}"
        msda_keys(p + ".cross_attn", cfg.dec_n_points)
        norm(p + ".norm1")
        keys.extend([(p + ".self_attn.in_proj_weight", (3 * D, D)), (p + ".self_attn.in_proj_bias", (3 * D,))])
        lin(p + ".self_attn.out_proj", D, D)
        norm(p + ".norm2")
        lin(p + ".linear1", F_, D)
        lin(p + ".linear2", D, F_)
        norm(p + ".norm3")
    for i in range(2):
        lin(f"transformer.decoder.query_scale.layers.{i}", D, D)
    lin("transformer.decoder.ref_point_head.layers.0", D, 2 * D)
    lin("transformer.decoder.ref_point_head.layers.1", D, D)
    num_heads = cfg.dec_layers + (1 if cfg.two_stage else 0)

    def box_head(prefix):
        lin(prefix + ".layers.0", D, D)
        lin(prefix + ".layers.1", D, D)
        lin(prefix + ".layers.2", 4, D)

    for i in range(num_heads):
        box_head(f"transformer.decoder.bbox_embed.{i}")
    if cfg.two_stage:
        for i in range(num_heads):
            lin(f"transformer.decoder.class_embed.{i}", C, D)
        lin("transformer.enc_output", D, D)
        norm("transformer.enc_output_norm")
        keys.append(("transformer.tgt_embed.weight", (K, D)))
    for i in range(num_heads):
        lin(f"class_embed.{i}", C, D)
    for i in range(num_heads):
        box_head(f"bbox_embed.{i}")
    keys.append(("label_enc.weight", (C + 1, D - 1)))
    if cfg.two_stage:
        if cfg.num_patterns > 0:
            keys.append(("patterns_embed.weight", (cfg.num_patterns, D)))
    else:
        keys.extend([("tgt_embed.weight", (K, D - 1)), ("refpoint_embed.weight", (K, 4))])
    channels = BACKBONE_CHANNELS[cfg.backbone]
    inputs = list(channels) if Lv > 1 else [channels[-1]]
    for lvl in range(Lv):
        p = f"input_proj.{lvl}"
        if lvl < len(inputs):
            keys.extend([(p + ".0.weight", (D, inputs[lvl], 1, 1)), (p + ".0.bias", (D,))])
        else:
            in_ch = channels[-1] if lvl == len(inputs) else D
            keys.extend([(p + ".0.weight", (D, in_ch, 3, 3)), (p + ".0.bias", (D,))])
        norm(p + ".1")
    return keys


def shared_duplicates(cfg):
    """Top-level names that are the same tensors as a ``transformer.decoder.*`` entry (§2.2)."""
    num_heads = cfg.dec_layers + (1 if cfg.two_stage else 0)
    dup = {}
    for name, _ in expected_state_dict_keys(cfg):
        if name.startswith("bbox_embed.") or (cfg.two_stage and name.startswith("class_embed.")):
            dup[name] = "transformer.decoder." + name
    assert len({k.split(".")[1] for k in dup}) == num_heads
    return dup


def with_lft(cfg, lft):
    return replace(cfg, lft=lft)
