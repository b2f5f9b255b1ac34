"""A naive, literal transcription of the DN-DETR spec (``dn_dab_detr``) used as a test oracle.

Written from /work/shared/spec/DN-DETR-SPEC.md only (§1, §2, §3, §5, §8), independently of ``models/``, so
that the equivalence tests catch misreadings of the spec.  Everything is spelled out with plain tensor ops,
explicit per-image / per-head / per-group loops and explicit formulas; speed is irrelevant here.

The oracle works on a *parameter dict* (state-dict names -> tensors, usually float64 leaves that require
grad) and mirrors the model's interface:

* ``oracle_forward(params, cfg, images, targets=None, training=False, noised=None)`` -> dict with
  ``pred_logits``, ``pred_boxes``, ``aux_outputs`` and, in DN training, the DN bookkeeping and predictions.
* ``oracle_losses(out, targets, cfg, training=True)`` -> the §5.3 loss dict.
* ``oracle_total_loss(losses, cfg)`` -> Σ weight × loss (§5.4).
* ``oracle_postprocess(out, target_sizes, num_select)`` -> list of {scores, labels, boxes} (§5.5).
* ``oracle_dn_noise(targets, cfg, num_classes)`` -> noised labels/boxes drawn with the RNG order of
  Appendix B (for comparing against a seeded model forward).
"""
import math
from dataclasses import dataclass

import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch.func import functional_call
from torchvision.ops.misc import FrozenBatchNorm2d

INVERSE_SIGMOID_EPS = 1e-3
FOCAL_GAMMA = 2.0
BOX_EPS = 1e-6


@dataclass
class OracleConfig:
    hidden_dim: int
    nheads: int
    enc_layers: int
    dec_layers: int
    num_queries: int
    num_classes: int
    num_patterns: int
    activation: str
    backbone: str
    dilation: bool
    pe_temperature_h: float
    pe_temperature_w: float
    use_dn: bool
    scalar: int
    label_noise_scale: float
    box_noise_scale: float
    aux_loss: bool
    focal_alpha: float
    set_cost_class: float
    set_cost_bbox: float
    set_cost_giou: float
    cls_loss_coef: float
    bbox_loss_coef: float
    giou_loss_coef: float
    num_select: int


def config_from_args(args) -> OracleConfig:
    return OracleConfig(
        hidden_dim=args.hidden_dim, nheads=args.nheads, enc_layers=args.enc_layers, dec_layers=args.dec_layers,
        num_queries=args.num_queries, num_classes=args.num_classes, num_patterns=args.num_patterns,
        activation=args.transformer_activation, backbone=args.backbone, dilation=args.dilation,
        pe_temperature_h=args.pe_temperatureH, pe_temperature_w=args.pe_temperatureW,
        use_dn=args.use_dn, scalar=args.scalar, label_noise_scale=args.label_noise_scale,
        box_noise_scale=args.box_noise_scale, aux_loss=args.aux_loss, focal_alpha=args.focal_alpha,
        set_cost_class=args.set_cost_class, set_cost_bbox=args.set_cost_bbox, set_cost_giou=args.set_cost_giou,
        cls_loss_coef=args.cls_loss_coef, bbox_loss_coef=args.bbox_loss_coef, giou_loss_coef=args.giou_loss_coef,
        num_select=args.num_select,
    )


# ----------------------------------------------------------------------------------------------------------
# §1 shared building blocks
# ----------------------------------------------------------------------------------------------------------

def inverse_sigmoid(x):
    """§1.3: clamp to [0,1]; log(max(x, eps) / max(1 - x, eps)) with eps = 1e-3."""
    x = torch.clamp(x, 0.0, 1.0)
    a = torch.clamp(x, min=INVERSE_SIGMOID_EPS)
    b = torch.clamp(1.0 - x, min=INVERSE_SIGMOID_EPS)
    return torch.log(a / b)


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def linear(x, params, prefix):
    return x @ params[prefix + ".weight"].T + params[prefix + ".bias"]


def mlp(x, params, prefix, num_layers):
    """§1.4: Linear layers ``layers.0..n-1`` with ReLU after all but the last."""
    for i in range(num_layers):
        x = linear(x, params, f"{prefix}.layers.{i}")
        if i < num_layers - 1:
            x = torch.clamp(x, min=0.0)
    return x


def layer_norm(x, params, prefix, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * params[prefix + ".weight"] + params[prefix + ".bias"]


def activation(x, params, prefix, kind):
    if kind == "relu":
        return torch.clamp(x, min=0.0)
    if kind == "prelu":
        slope = params[prefix + ".activation.weight"]
        return torch.where(x >= 0, x, slope * x)
    raise ValueError(f"oracle: activation {kind!r} not transcribed")


def softmax_rows(logits):
    """Explicit softmax over the last axis (masked entries are -inf and get weight 0)."""
    row_max = logits.max(dim=-1, keepdim=True).values
    e = torch.exp(logits - row_max)
    return e / e.sum(dim=-1, keepdim=True)


def cxcywh_to_xyxy(b):
    cx, cy, w, h = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def pairwise_giou(a, b):
    """§1.5 GIoU between xyxy boxes a [N,4] and b [M,4] -> [N,M], with the +1e-6 terms."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    ax0, ay0, ax1, ay1 = (a[:, None, c] for c in range(4))
    bx0, by0, bx1, by1 = (b[None, :, c] for c in range(4))
    inter_w = torch.clamp(torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0), min=0)
    inter_h = torch.clamp(torch.minimum(ay1, by1) - torch.maximum(ay0, by0), min=0)
    inter = inter_w * inter_h
    union = area_a[:, None] + area_b[None, :] - inter
    iou = inter / (union + BOX_EPS)
    encl_w = torch.clamp(torch.maximum(ax1, bx1) - torch.minimum(ax0, bx0), min=0)
    encl_h = torch.clamp(torch.maximum(ay1, by1) - torch.minimum(ay0, by0), min=0)
    enclosing = encl_w * encl_h
    return iou - (enclosing - union) / (enclosing + BOX_EPS)


def sine_features(u, num_feats, temperature):
    """The §1.6 per-axis vector for already-scaled values ``u [...]`` -> ``[..., num_feats]``:
    channel 2m = sin(u / tau_2m), channel 2m+1 = cos(u / tau_2m+1), tau_k = T^(2*floor(k/2)/F).
    The temperature ladder is built in float32 as §1.6 prescribes."""
    k_index = torch.arange(num_feats, dtype=torch.float32)
    taus = (temperature ** (2 * torch.div(k_index, 2, rounding_mode="floor") / num_feats)).to(u.dtype)
    feats = []
    for k in range(num_feats):
        feats.append(torch.sin(u / taus[k]) if k % 2 == 0 else torch.cos(u / taus[k]))
    return torch.stack(feats, dim=-1)


def image_sine_pe(mask, hidden_dim, temperature_h, temperature_w):
    """§1.6 flavour A (SineHW): mask [B,H,W] (True = pad) -> [B,D,H,W] float32 (caller casts)."""
    B, H, W = mask.shape
    valid = (~mask).to(torch.float32)
    y_rows = [valid[:, 0, :]]
    for i in range(1, H):
        y_rows.append(y_rows[-1] + valid[:, i, :])
    Y = torch.stack(y_rows, dim=1)
    x_cols = [valid[:, :, 0]]
    for j in range(1, W):
        x_cols.append(x_cols[-1] + valid[:, :, j])
    X = torch.stack(x_cols, dim=2)
    y_hat = Y / (Y[:, H - 1:H, :] + 1e-6) * (2 * math.pi)
    x_hat = X / (X[:, :, W - 1:W] + 1e-6) * (2 * math.pi)
    F_ = hidden_dim // 2
    y_feat = sine_features(y_hat, F_, temperature_h)
    x_feat = sine_features(x_hat, F_, temperature_w)
    return torch.cat([y_feat, x_feat], dim=-1).permute(0, 3, 1, 2)


def anchor_sine(r, hidden_dim):
    """§1.7: r [..., 4] = (x, y, w, h) -> [E(y) ‖ E(x) ‖ E(w) ‖ E(h)], E with T = 10000 on 2π·u."""
    F_ = hidden_dim // 2
    parts = [sine_features(2 * math.pi * r[..., c], F_, 10000) for c in (1, 0, 2, 3)]
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Backbone (torchvision's ResNet, §1.8 / §1.9), padding (§1.10)
# ----------------------------------------------------------------------------------------------------------

def pad_images(images):
    """§1.10: zero-pad bottom/right to [B,3,maxH,maxW]; mask True on padding."""
    max_h = max(img.shape[1] for img in images)
    max_w = max(img.shape[2] for img in images)
    batch, masks = [], []
    for img in images:
        padded = torch.zeros(3, max_h, max_w, dtype=img.dtype)
        padded[:, :img.shape[1], :img.shape[2]] = img
        m = torch.ones(max_h, max_w, dtype=torch.bool)
        m[:img.shape[1], :img.shape[2]] = False
        batch.append(padded)
        masks.append(m)
    return torch.stack(batch), torch.stack(masks)


class ResNetTrunk(torch.nn.Module):
    """torchvision ResNet truncated after layer4 (no avgpool / fc), as in §1.9."""

    def __init__(self, resnet):
        super().__init__()
        self.body = resnet

    def forward(self, x):
        r = self.body
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))


def run_backbone(params, cfg, batch, make_trunk):
    """``make_trunk(resnet)`` (a module holding the FrozenBatchNorm2d ResNet as ``body``) run functionally on
    the ``backbone.0.body.*`` entries, so that gradients reach those tensors."""
    resnet = torchvision.models.__dict__[cfg.backbone](
        weights=None, norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, cfg.dilation])
    prefix = "backbone.0.body."
    body = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    if set(body) != expected:
        raise AssertionError(f"oracle: backbone keys differ: missing {sorted(expected - set(body))[:5]}, "
                             f"unexpected {sorted(set(body) - expected)[:5]}")
    trunk = make_trunk(resnet.to(batch.dtype))
    return functional_call(trunk, {"body." + k: v for k, v in body.items()}, (batch,))


def backbone_c5(params, cfg, batch):
    """C5 of the FrozenBatchNorm2d ResNet."""
    return run_backbone(params, cfg, batch, ResNetTrunk)


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------

def stock_mha(query, key, value, params, prefix, nheads, key_padding_mask):
    """torch.nn.MultiheadAttention math from in_proj_weight / in_proj_bias / out_proj (sequence-first)."""
    E = query.shape[-1]
    w, b = params[prefix + ".in_proj_weight"], params[prefix + ".in_proj_bias"]
    q = query @ w[:E].T + b[:E]
    k = key @ w[E:2 * E].T + b[E:2 * E]
    v = value @ w[2 * E:].T + b[2 * E:]
    d = E // nheads
    per_batch = []
    for bi in range(query.shape[1]):
        heads = []
        for j in range(nheads):
            qj = q[:, bi, j * d:(j + 1) * d] * d ** -0.5
            kj = k[:, bi, j * d:(j + 1) * d]
            logits = qj @ kj.T
            logits = logits.masked_fill(key_padding_mask[bi][None, :], float("-inf"))
            heads.append(softmax_rows(logits) @ v[:, bi, j * d:(j + 1) * d])
        per_batch.append(torch.cat(heads, dim=-1))
    out = torch.stack(per_batch, dim=1)
    return linear(out, params, prefix + ".out_proj")


def attn_no_in_proj(q, k, v, params, prefix, nheads, attn_mask=None, key_padding_mask=None):
    """§2.3 AttnNoInProj: q [L,B,E], k [S,B,E], v [S,B,Ev]; scale q by d^-1/2; masks set -inf."""
    E, Ev = q.shape[-1], v.shape[-1]
    d, dv = E // nheads, Ev // nheads
    per_batch = []
    for bi in range(q.shape[1]):
        heads = []
        for j in range(nheads):
            qj = q[:, bi, j * d:(j + 1) * d] * d ** -0.5
            kj = k[:, bi, j * d:(j + 1) * d]
            logits = qj @ kj.T
            if attn_mask is not None:
                logits = logits.masked_fill(attn_mask, float("-inf"))
            if key_padding_mask is not None:
                logits = logits.masked_fill(key_padding_mask[bi][None, :], float("-inf"))
            heads.append(softmax_rows(logits) @ v[:, bi, j * dv:(j + 1) * dv])
        per_batch.append(torch.cat(heads, dim=-1))
    out = torch.stack(per_batch, dim=1)
    return linear(out, params, prefix + ".out_proj")


# ----------------------------------------------------------------------------------------------------------
# Encoder (§2.3 step 5)
# ----------------------------------------------------------------------------------------------------------

def encoder(params, cfg, src, pos, mask):
    x = src
    for i in range(cfg.enc_layers):
        p = f"transformer.encoder.layers.{i}"
        s = mlp(x, params, "transformer.encoder.query_scale", 2)
        qk = x + pos * s
        a = stock_mha(qk, qk, x, params, p + ".self_attn", cfg.nheads, mask)
        x = layer_norm(x + a, params, p + ".norm1")
        ffn = linear(activation(linear(x, params, p + ".linear1"), params, p, cfg.activation), params, p + ".linear2")
        x = layer_norm(x + ffn, params, p + ".norm2")
    if "transformer.encoder.norm.weight" in params:
        x = layer_norm(x, params, "transformer.encoder.norm")
    return x


# ----------------------------------------------------------------------------------------------------------
# Query preparation (§3.2 - §3.4)
# ----------------------------------------------------------------------------------------------------------

def oracle_dn_noise(targets, cfg):
    """Noised labels/boxes for the scalar·N DN entries (group-major), drawing random numbers in the order
    of Appendix B (float32 uniforms, int64 class draw). Call right after seeding like the model forward."""
    labels = torch.cat([t["labels"] for t in targets]).repeat(cfg.scalar)
    boxes = torch.cat([t["boxes"] for t in targets]).repeat(cfg.scalar, 1)
    noised_labels = labels.clone()
    noised_boxes = boxes.clone()
    if cfg.label_noise_scale > 0:
        p = torch.rand(labels.shape[0], dtype=torch.float32)
        chosen = [i for i in range(labels.shape[0]) if p[i] < cfg.label_noise_scale]
        new_labels = torch.randint(0, cfg.num_classes, (len(chosen),), dtype=torch.int64)
        for slot, i in enumerate(chosen):
            noised_labels[i] = new_labels[slot]
    if cfg.box_noise_scale > 0:
        u = torch.rand(boxes.shape[0], 4, dtype=torch.float32) * 2 - 1.0
        for i in range(boxes.shape[0]):
            cx, cy, w, h = boxes[i]
            lam = cfg.box_noise_scale
            new = torch.stack([cx + u[i, 0] * (w / 2) * lam, cy + u[i, 1] * (h / 2) * lam,
                               w + u[i, 2] * w * lam, h + u[i, 3] * h * lam])
            noised_boxes[i] = torch.clamp(new, 0.0, 1.0)
    return noised_labels, noised_boxes


def build_queries(params, cfg, targets, batch_size, training, noised=None):
    """Content [Q,B,D] (patterns not yet added), anchor logits [Q,B,4], attention mask [Q,Q] or None and
    the DN bookkeeping (entries in group-major, image-major, GT order)."""
    D, C, nq = cfg.hidden_dim, cfg.num_classes, cfg.num_queries
    num_pat = max(cfg.num_patterns, 1)
    label_enc = params["label_enc.weight"]
    refpoints = params["refpoint_embed.weight"]
    dtype = label_enc.dtype
    zero = torch.zeros(1, dtype=dtype)
    one = torch.ones(1, dtype=dtype)
    match_content = torch.cat([label_enc[C], zero])
    dn_active = training and cfg.use_dn
    counts = [len(t["labels"]) for t in targets] if dn_active else [0] * batch_size
    n_max = max(counts) if counts else 0
    pad = n_max * cfg.scalar if dn_active else 0
    entries = []
    if dn_active:
        for g in range(cfg.scalar):
            for b in range(batch_size):
                for t in range(counts[b]):
                    entries.append({"group": g, "batch": b, "gt": t, "row": g * n_max + t,
                                    "label": targets[b]["labels"][t], "box": targets[b]["boxes"][t]})
    if noised is None:
        noised_labels = [e["label"] for e in entries]
        noised_boxes = [e["box"] for e in entries]
    else:
        noised_labels = list(noised[0])
        noised_boxes = list(noised[1])

    content_rows = [[torch.zeros(D, dtype=dtype) for _ in range(pad)] for _ in range(batch_size)]
    anchor_rows = [[torch.zeros(4, dtype=dtype) for _ in range(pad)] for _ in range(batch_size)]
    for e, lab, box in zip(entries, noised_labels, noised_boxes):
        content_rows[e["batch"]][e["row"]] = torch.cat([label_enc[lab], one])
        anchor_rows[e["batch"]][e["row"]] = inverse_sigmoid(box).to(dtype)  # in the box dtype, then cast
    for b in range(batch_size):
        for j in range(num_pat):
            for qi in range(nq):
                content_rows[b].append(match_content)
                anchor_rows[b].append(refpoints[qi])
    content = torch.stack([torch.stack(rows) for rows in content_rows], dim=1)  # [Q,B,D]
    anchors = torch.stack([torch.stack(rows) for rows in anchor_rows], dim=1)  # [Q,B,4]

    Q = pad + nq * num_pat
    attn_mask = None
    if dn_active:
        attn_mask = torch.zeros(Q, Q, dtype=torch.bool)
        for i in range(Q):
            for j in range(Q):
                if i >= pad:
                    attn_mask[i, j] = j < pad
                else:
                    attn_mask[i, j] = j < pad and (j // n_max) != (i // n_max)
    dn = {"pad": pad, "n_max": n_max, "entries": entries, "noised_labels": noised_labels,
          "noised_boxes": noised_boxes, "active": dn_active}
    return content, anchors, attn_mask, dn


# ----------------------------------------------------------------------------------------------------------
# Decoder (§2.3 step 7)
# ----------------------------------------------------------------------------------------------------------

def decoder_layer(params, cfg, l, out, memory, attn_mask, mask, pos, query_pos, sine_q):
    p = f"transformer.decoder.layers.{l}"
    q = linear(out, params, p + ".sa_qcontent_proj") + linear(query_pos, params, p + ".sa_qpos_proj")
    k = linear(out, params, p + ".sa_kcontent_proj") + linear(query_pos, params, p + ".sa_kpos_proj")
    v = linear(out, params, p + ".sa_v_proj")
    a = attn_no_in_proj(q, k, v, params, p + ".self_attn", cfg.nheads, attn_mask=attn_mask)
    out = layer_norm(out + a, params, p + ".norm1")

    qc = linear(out, params, p + ".ca_qcontent_proj")
    kc = linear(memory, params, p + ".ca_kcontent_proj")
    v = linear(memory, params, p + ".ca_v_proj")
    kp = linear(pos, params, p + ".ca_kpos_proj")
    if l == 0:
        q = qc + linear(query_pos, params, p + ".ca_qpos_proj")
        k = kc + kp
    else:
        if p + ".ca_qpos_proj.weight" in params:
            raise AssertionError(f"spec §8.12: {p}.ca_qpos_proj must not exist")
        q, k = qc, kc
    qs = linear(sine_q, params, p + ".ca_qpos_sine_proj")
    d = cfg.hidden_dim // cfg.nheads
    q_parts, k_parts = [], []
    for j in range(cfg.nheads):
        q_parts += [q[..., j * d:(j + 1) * d], qs[..., j * d:(j + 1) * d]]
        k_parts += [k[..., j * d:(j + 1) * d], kp[..., j * d:(j + 1) * d]]
    q_star, k_star = torch.cat(q_parts, dim=-1), torch.cat(k_parts, dim=-1)
    a = attn_no_in_proj(q_star, k_star, v, params, p + ".cross_attn", cfg.nheads, key_padding_mask=mask)
    out = layer_norm(out + a, params, p + ".norm2")

    ffn = linear(activation(linear(out, params, p + ".linear1"), params, p, cfg.activation), params, p + ".linear2")
    return layer_norm(out + ffn, params, p + ".norm3")


def decoder(params, cfg, tgt, anchors, memory, attn_mask, mask, pos, layer_fn=None):
    """``layer_fn`` (same signature as :func:`decoder_layer`) replaces the single-map layer, e.g. by the
    encoder-only model's multi-scale layer; everything around the layer is shared."""
    layer_fn = layer_fn or decoder_layer
    D = cfg.hidden_dim
    out = tgt
    r = sigmoid(anchors)
    refs = [r]
    hs = []
    bbox = "transformer.decoder.bbox_embed"
    for l in range(cfg.dec_layers):
        e = anchor_sine(r, D)  # [Q,B,2D]
        query_pos = mlp(e, params, "transformer.decoder.ref_point_head", 2)
        if l == 0:
            sine_q = e[..., :D]
        else:
            sine_q = e[..., :D] * mlp(out, params, "transformer.decoder.query_scale", 2)
        m = sigmoid(mlp(out, params, "transformer.decoder.ref_anchor_head", 2))
        y_part = sine_q[..., :D // 2] * (m[..., 1] / r[..., 3])[..., None]
        x_part = sine_q[..., D // 2:] * (m[..., 0] / r[..., 2])[..., None]
        sine_q = torch.cat([y_part, x_part], dim=-1)
        out = layer_fn(params, cfg, l, out, memory, attn_mask, mask, pos, query_pos, sine_q)
        delta = mlp(out, params, bbox, 3)
        r_new = sigmoid(delta + inverse_sigmoid(r))
        if l < cfg.dec_layers - 1:
            refs.append(r_new)
        r = r_new.detach()
        hs.append(layer_norm(out, params, "transformer.decoder.norm"))
    return hs, refs


# ----------------------------------------------------------------------------------------------------------
# Full forward (§2.3), DN split (§3.5)
# ----------------------------------------------------------------------------------------------------------

def oracle_forward(params, cfg, images, targets=None, training=False, noised=None):
    """§2.3 forward. ``noised = (labels, boxes)`` replaces the clean DN inputs (group-major entries), e.g.
    with the draws of ``oracle_dn_noise``; without it the DN queries are the clean GT (noise scales 0)."""
    dtype = params["label_enc.weight"].dtype
    batch, img_mask = pad_images([img.to(dtype) for img in images])
    B = batch.shape[0]
    c5 = backbone_c5(params, cfg, batch)
    H5, W5 = c5.shape[-2:]
    mask5 = torch.nn.functional.interpolate(img_mask[None].float(), size=(H5, W5))[0].to(torch.bool)
    pos = image_sine_pe(mask5, cfg.hidden_dim, cfg.pe_temperature_h, cfg.pe_temperature_w).to(dtype)
    src = torch.einsum("bchw,dc->bdhw", c5, params["input_proj.weight"][:, :, 0, 0]) \
        + params["input_proj.bias"][None, :, None, None]

    content, anchors, attn_mask, dn = build_queries(params, cfg, targets, B, training, noised)

    S = H5 * W5
    src_seq = src.reshape(B, cfg.hidden_dim, S).permute(2, 0, 1)  # [S,B,D], row-major over (H5, W5)
    pos_seq = pos.reshape(B, cfg.hidden_dim, S).permute(2, 0, 1)
    mask_seq = mask5.reshape(B, S)
    memory = encoder(params, cfg, src_seq, pos_seq, mask_seq)

    pad, nq = dn["pad"], cfg.num_queries
    if cfg.num_patterns > 0:
        rows = [content[:pad]]
        for j in range(cfg.num_patterns):
            rows.append(content[pad + j * nq: pad + (j + 1) * nq] + params["transformer.patterns.weight"][j])
        content = torch.cat(rows, dim=0)

    hs, refs = decoder(params, cfg, content, anchors, memory, attn_mask, mask_seq, pos_seq)
    logits, boxes = [], []
    for l in range(cfg.dec_layers):
        h = hs[l].permute(1, 0, 2)  # [B,Q,D]
        logits.append(linear(h, params, "class_embed"))
        boxes.append(sigmoid(mlp(h, params, "transformer.decoder.bbox_embed", 3)
                             + inverse_sigmoid(refs[l].permute(1, 0, 2))))

    out = {"dn": dn, "all_logits": logits, "all_boxes": boxes}
    if pad > 0:
        out["dn_pred_logits"] = torch.stack([x[:, :pad] for x in logits])
        out["dn_pred_boxes"] = torch.stack([x[:, :pad] for x in boxes])
    out["pred_logits"] = logits[-1][:, pad:]
    out["pred_boxes"] = boxes[-1][:, pad:]
    out["aux_outputs"] = [{"pred_logits": logits[l][:, pad:], "pred_boxes": boxes[l][:, pad:]}
                          for l in range(cfg.dec_layers - 1)] if cfg.aux_loss else []
    return out


# ----------------------------------------------------------------------------------------------------------
# Matcher (§5.1), losses (§5.2, §3.6), weights (§5.4)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def hungarian_match(pred_logits, pred_boxes, targets, cfg):
    alpha, gamma = cfg.focal_alpha, FOCAL_GAMMA
    indices = []
    for b in range(pred_logits.shape[0]):
        labels, tboxes = targets[b]["labels"], targets[b]["boxes"].to(pred_boxes.dtype)
        if len(labels) == 0:
            indices.append(([], []))
            continue
        p = sigmoid(pred_logits[b])  # [Q',C]
        pc = p[:, labels]
        cost_class = alpha * (1 - pc) ** gamma * (-torch.log(pc + 1e-8)) \
            - (1 - alpha) * pc ** gamma * (-torch.log(1 - pc + 1e-8))
        cost_bbox = (pred_boxes[b][:, None, :] - tboxes[None, :, :]).abs().sum(-1)
        cost_giou = -pairwise_giou(cxcywh_to_xyxy(pred_boxes[b]), cxcywh_to_xyxy(tboxes))
        cost = cfg.set_cost_bbox * cost_bbox + cfg.set_cost_class * cost_class + cfg.set_cost_giou * cost_giou
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        indices.append((list(rows), list(cols)))
    return indices


def focal_loss_literal(logits, onehot, normaliser, alpha):
    """§5.2: BCE·(1-p_t)^2·α_t, mean over the query axis (dim 1), sum, / normaliser, × number of queries."""
    x, t = logits, onehot
    p = sigmoid(x)
    bce = torch.clamp(x, min=0) - x * t + torch.log1p(torch.exp(-x.abs()))
    p_t = p * t + (1 - p) * (1 - t)
    loss = bce * (1 - p_t) ** FOCAL_GAMMA
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return loss.mean(1).sum() / normaliser * x.shape[1]


def matched_giou_loss_sum(src, tgt):
    """Σ (1 − GIoU) over the matched pairs (the diagonal of the pairwise matrix)."""
    return (1 - torch.diag(pairwise_giou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt)))).sum()


def top1_accuracy(logits, labels):
    if len(labels) == 0:
        return 0.0
    correct = sum(int(torch.argmax(logits[i]) == labels[i]) for i in range(len(labels)))
    return correct * 100.0 / len(labels)


def matching_losses(pred_logits, pred_boxes, targets, cfg, num_boxes, suffix, with_class_error):
    indices = hungarian_match(pred_logits.detach(), pred_boxes.detach(), targets, cfg)
    B, Qp, C = pred_logits.shape
    onehot = torch.zeros(B, Qp, C, dtype=pred_logits.dtype)
    matched_logits, matched_labels, src_boxes, tgt_boxes = [], [], [], []
    for b, (rows, cols) in enumerate(indices):
        for qi, ti in zip(rows, cols):
            lab = int(targets[b]["labels"][ti])
            onehot[b, qi, lab] = 1.0
            matched_logits.append(pred_logits[b, qi])
            matched_labels.append(lab)
            src_boxes.append(pred_boxes[b, qi])
            tgt_boxes.append(targets[b]["boxes"][ti].to(pred_boxes.dtype))
    losses = {"loss_ce" + suffix: focal_loss_literal(pred_logits, onehot, num_boxes, cfg.focal_alpha)}
    if with_class_error:
        acc = top1_accuracy(torch.stack(matched_logits).detach() if matched_logits else None, matched_labels)
        losses["class_error"] = 100.0 - acc
    if src_boxes:
        sb, tb = torch.stack(src_boxes), torch.stack(tgt_boxes)
        l1 = (sb - tb).abs()
        losses["loss_bbox" + suffix] = l1.sum() / num_boxes
        losses["loss_giou" + suffix] = matched_giou_loss_sum(sb, tb) / num_boxes
        losses["loss_xy" + suffix] = l1[:, :2].sum().detach() / num_boxes
        losses["loss_hw" + suffix] = l1[:, 2:].sum().detach() / num_boxes
    else:
        losses["loss_bbox" + suffix] = pred_boxes.sum() * 0.0
        losses["loss_giou" + suffix] = pred_boxes.sum() * 0.0
        losses["loss_xy" + suffix] = torch.zeros((), dtype=pred_boxes.dtype)
        losses["loss_hw" + suffix] = torch.zeros((), dtype=pred_boxes.dtype)
    with torch.no_grad():
        card = []
        for b in range(B):
            n_pred = sum(int(torch.argmax(pred_logits[b, qi]) != C - 1) for qi in range(Qp))
            card.append(abs(n_pred - len(targets[b]["labels"])))
        losses["cardinality_error" + suffix] = sum(card) / B
    return losses


def dn_losses(out, targets, cfg, training):
    """§3.6 per-layer reconstruction losses (constant zeros when there are no DN predictions)."""
    suffixes = [""] + ([f"_{i}" for i in range(cfg.dec_layers - 1)] if cfg.aux_loss else [])
    names = ["tgt_loss_ce", "tgt_class_error", "tgt_loss_bbox", "tgt_loss_giou"]
    if not training or "dn_pred_logits" not in out:
        return {n + s: 0.0 for s in suffixes for n in names}
    entries = out["dn"]["entries"]
    num_tgt = len(entries)
    labels = [int(e["label"]) for e in entries]
    clean = torch.stack([e["box"] for e in entries]).to(out["dn_pred_boxes"].dtype)
    losses = {}
    for l in range(cfg.dec_layers):
        suffix = "" if l == cfg.dec_layers - 1 else f"_{l}"
        if suffix not in suffixes:
            continue
        lg = torch.stack([out["dn_pred_logits"][l, e["batch"], e["row"]] for e in entries])  # [scalar·N, C]
        bx = torch.stack([out["dn_pred_boxes"][l, e["batch"], e["row"]] for e in entries])
        onehot = torch.zeros_like(lg)
        for i, lab in enumerate(labels):
            onehot[i, lab] = 1.0
        losses["tgt_loss_ce" + suffix] = focal_loss_literal(lg[None], onehot[None], num_tgt, cfg.focal_alpha)
        losses["tgt_class_error" + suffix] = 100.0 - top1_accuracy(lg.detach(), labels)
        losses["tgt_loss_bbox" + suffix] = (bx - clean).abs().sum() / num_tgt
        losses["tgt_loss_giou" + suffix] = matched_giou_loss_sum(bx, clean) / num_tgt
    return losses


def oracle_losses(out, targets, cfg, training=True):
    """§5.3 loss dict (world size 1); ``training`` is the criterion's mode (DN terms only in training)."""
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    losses = matching_losses(out["pred_logits"], out["pred_boxes"], targets, cfg, num_boxes, "", True)
    for i, aux in enumerate(out["aux_outputs"]):
        losses.update(matching_losses(aux["pred_logits"], aux["pred_boxes"], targets, cfg, num_boxes, f"_{i}", False))
    if cfg.use_dn:
        losses.update(dn_losses(out, targets, cfg, training))
    return losses


def oracle_weight_dict(cfg):
    base = {"loss_ce": cfg.cls_loss_coef, "loss_bbox": cfg.bbox_loss_coef, "loss_giou": cfg.giou_loss_coef}
    if cfg.use_dn:
        base.update({"tgt_loss_ce": cfg.cls_loss_coef, "tgt_loss_bbox": cfg.bbox_loss_coef,
                     "tgt_loss_giou": cfg.giou_loss_coef})
    weights = dict(base)
    if cfg.aux_loss:
        for i in range(cfg.dec_layers - 1):
            weights.update({k + f"_{i}": v for k, v in base.items()})
    return weights


def oracle_total_loss(losses, cfg):
    weights = oracle_weight_dict(cfg)
    return sum(losses[k] * w for k, w in weights.items() if k in losses)


# ----------------------------------------------------------------------------------------------------------
# Post-processor (§5.5)
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def oracle_postprocess(out, target_sizes, num_select):
    logits, boxes = out["pred_logits"], out["pred_boxes"]
    B, Qp, C = logits.shape
    results = []
    for b in range(B):
        prob = sigmoid(logits[b]).reshape(Qp * C)
        scores, flat = torch.topk(prob, num_select, sorted=True)
        queries = flat // C
        labels = flat % C
        H, W = target_sizes[b]
        scale = torch.stack([W, H, W, H]).to(boxes.dtype)
        det = cxcywh_to_xyxy(boxes[b][queries]) * scale
        results.append({"scores": scores, "labels": labels, "boxes": det})
    return results
