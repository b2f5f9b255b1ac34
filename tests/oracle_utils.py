"""Helpers shared by the spec-oracle equivalence tests: inputs, parameter randomisation, running a model and
its oracle side by side, and the comparisons every model's equivalence test makes."""
import json
import os

import torch

from engine import weighted_loss
from models import build_model

# A tiny GT box in a corner: its DN anchor logits saturate the clamped inverse sigmoid (§1.3, eps 1e-3).
CORNER_BOX = [0.9994, 0.0006, 0.0009, 0.0008]
# Anchor logits beyond ±6.9 for query 0: σ⁻¹_ε(σ(z)) != z there (§8.5).
SATURATED_ANCHOR = [7.5, -8.0, 7.3, 7.1]


def make_inputs(seed, counts, sizes, num_classes, dtype, corner_box=False):
    """Random images of the given sizes and ``counts[b]`` random float32 GT boxes for image ``b``."""
    g = torch.Generator().manual_seed(1000 + seed)
    images = [torch.randn(3, h, w, generator=g).to(dtype) for h, w in sizes]
    targets = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g),
                        "boxes": torch.cat([centre, size], dim=1)})
    if corner_box:
        targets[1]["labels"] = torch.cat([targets[1]["labels"], torch.tensor([3])])
        targets[1]["boxes"] = torch.cat([targets[1]["boxes"], torch.tensor([CORNER_BOX])])
    return images, targets


@torch.no_grad()
def randomise_parameters(model, seed):
    """Perturb every non-backbone float tensor so that no head is at its special init (zero last box layer,
    prior bias, PReLU 0.25, ...); a shared tensor (the bbox head) is perturbed once."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, t in model.state_dict().items():
        if name.startswith("backbone") or not t.is_floating_point() or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        scale = 0.3 / t.shape[1] ** 0.5 if t.dim() >= 2 else 0.1
        t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)
    model.state_dict()["refpoint_embed.weight"][0] = torch.tensor(SATURATED_ANCHOR)


def oracle_params(model, dtype):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    params = {}
    for name, t in model.state_dict().items():
        leaf = t.detach().clone().to(dtype) if t.is_floating_point() else t.detach().clone()
        if name in trainable:
            leaf.requires_grad_(True)
        params[name] = leaf
    for name in list(params):
        if name.startswith("bbox_embed."):
            assert torch.equal(params[name], params["transformer.decoder." + name]), f"shared {name} differs"
    return params


def report_difference(what, diff, expected, dtype):
    """With ``ORACLE_REPORT=FILE`` in the environment, append the largest absolute and relative difference of
    each comparison to FILE as a JSON line (how the closing notes quote "the largest differences found")."""
    report = os.environ.get("ORACLE_REPORT")
    if not report or not diff.numel():
        return
    relative = diff / expected.abs().clamp(min=1e-12)
    with open(report, "a") as f:
        f.write(json.dumps({"what": what, "dtype": str(dtype), "max_abs": diff.max().item(),
                            "max_rel": relative.max().item(), "max_abs_expected": expected.abs().max().item()}) + "\n")


def assert_close(actual, expected, what, atol):
    dtype = torch.as_tensor(actual).dtype
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs oracle {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + atol * expected.abs()
    report_difference(what, diff, expected, dtype)
    if actual.numel() and not bool((diff <= bound).all()):
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(f"{what}: model differs from the spec oracle, max |diff| {diff.max():.3e} "
                             f"(model {actual.flatten()[worst]:.10g} vs oracle {expected.flatten()[worst]:.10g} "
                             f"at flat index {worst})")


# Forward quantities of a float64 model agree with the float64 oracle to ~1e-15. The criterion, matcher and
# post-processor compute in float32 whatever the model dtype, so losses, gradients and detections can only be
# compared at float32 precision (~1e-7 relative observed). The float32 case is held to the 1e-4.
F64_FORWARD_TOL = 1e-9
F64_LOSS_TOL = 1e-6
F32_TOL = 1e-4


def run_against_oracle(oracle, args, seed, counts, sizes, dtype, oracle_postprocess, loss_kwargs=None,
                       corner_box=False, oracle_noise=False):
    """Build the model of ``args`` with randomised weights, run it and ``oracle`` on the same inputs (eval forward,
    post-process, eval-mode losses, train forward, losses, backward) and return everything in one dict.

    ``oracle_postprocess(out, target_sizes, cfg)`` adapts the oracle's post-processor; ``loss_kwargs`` go to
    ``oracle.oracle_losses``. With ``oracle_noise`` the oracle draws the DN noise itself in the spec's
    random-number order (Appendix B) instead of reusing the model's."""
    loss_kwargs = loss_kwargs or {}
    torch.manual_seed(seed)
    model, criterion, postprocessors = build_model(args)
    randomise_parameters(model, seed)
    model.to(dtype)
    cfg = oracle.config_from_args(args)
    images, targets = make_inputs(seed, counts, sizes, cfg.num_classes, dtype, corner_box=corner_box)
    target_sizes = torch.tensor([[h, w] for h, w in sizes], dtype=dtype)
    params = oracle_params(model, torch.float64)
    r = {"cfg": cfg, "targets": targets, "dtype": dtype, "sizes": sizes, "model": model, "criterion": criterion}

    model.eval()
    with torch.no_grad():
        r["m_eval"] = model(images)
        r["m_post"] = postprocessors["bbox"](r["m_eval"], target_sizes)
        r["o_eval"] = oracle.oracle_forward(params, cfg, images)
        r["o_post"] = oracle_postprocess(r["o_eval"], target_sizes.double(), cfg)
        criterion.eval()
        r["m_eval_losses"] = criterion(r["m_eval"], targets)
        r["o_eval_losses"] = oracle.oracle_losses(r["o_eval"], targets, cfg, training=False, **loss_kwargs)

    model.train()
    criterion.train()
    torch.manual_seed(77)
    r["m_train"] = model(images, targets)
    r["m_losses"] = criterion(r["m_train"], targets)
    model.zero_grad()
    weighted_loss(r["m_losses"], criterion.weight_dict).backward()
    r["m_grads"] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    noised = None
    if oracle_noise:
        torch.manual_seed(77)
        r["o_noise"] = oracle.oracle_dn_noise(targets, cfg)
        noised = r["o_noise"]
    r["o_train"] = oracle.oracle_forward(params, cfg, images, targets, training=True, noised=noised)
    r["o_losses"] = oracle.oracle_losses(r["o_train"], targets, cfg, training=True, **loss_kwargs)
    oracle.oracle_total_loss(r["o_losses"], cfg).backward()
    r["o_grads"] = {n: p.grad for n, p in params.items() if p.requires_grad}
    return r


def tol(r, kind="forward"):
    """Tolerance for a forward quantity or for anything the criterion / post-processor computes."""
    if r["dtype"] != torch.float64:
        return F32_TOL
    return F64_FORWARD_TOL if kind == "forward" else F64_LOSS_TOL


def check_outputs(model_out, oracle_out, atol, what, aux_spec_ref):
    assert_close(model_out["pred_logits"], oracle_out["pred_logits"], f"{what} pred_logits", atol)
    assert_close(model_out["pred_boxes"], oracle_out["pred_boxes"], f"{what} pred_boxes", atol)
    model_aux = model_out.get("aux_outputs") or []
    assert len(model_aux) == len(oracle_out["aux_outputs"]), \
        f"{what}: {len(model_aux)} aux outputs, spec {aux_spec_ref} wants {len(oracle_out['aux_outputs'])}"
    for i, (m, o) in enumerate(zip(model_aux, oracle_out["aux_outputs"])):
        assert_close(m["pred_logits"], o["pred_logits"], f"{what} aux {i} pred_logits", atol)
        assert_close(m["pred_boxes"], o["pred_boxes"], f"{what} aux {i} pred_boxes", atol)


def check_detections(r, num_select=None):
    """Post-processed detections equal the oracle's; ``num_select``: the fixed count each image must keep."""
    for b, (m, o) in enumerate(zip(r["m_post"], r["o_post"])):
        if num_select is not None:
            assert len(m["scores"]) == num_select, f"the post-processor keeps a fixed top-{num_select} (§5.5)"
        assert torch.equal(m["labels"].cpu(), o["labels"]), f"image {b}: labels/order differ from spec §5.5"
        assert_close(m["scores"], o["scores"], f"image {b} scores", tol(r, "loss"))
        h, w = r["sizes"][b]
        scale = torch.tensor([w, h, w, h], dtype=torch.float64)
        assert_close(m["boxes"].double() / scale, o["boxes"] / scale, f"image {b} boxes / (W,H,W,H)", tol(r, "loss"))


def check_dn_meta(r):
    dn = r["o_train"]["dn"]
    meta = r["m_train"].get("dn_meta")
    if not r["cfg"].use_dn:
        assert meta is None, "without --use_dn the training forward must carry no DN meta (spec §9.3)"
        return
    predictions = r["m_train"].get("dn_outputs")
    if dn["pad"] == 0:
        assert meta is None or meta.pad_size == 0, "all-empty batch: pad must be 0 (spec §3.3)"
        assert predictions is None, "pad 0: no DN predictions are recorded (spec §3.5)"
        return
    entries = dn["entries"]
    assert meta.pad_size == dn["pad"], f"pad_size {meta.pad_size} vs spec {dn['pad']}"
    assert meta.num_groups == r["cfg"].scalar
    assert meta.group_size == dn["n_max"], f"group_size {meta.group_size} vs n_max {dn['n_max']}"
    assert meta.batch_idx.tolist() == [e["batch"] for e in entries], "DN batch indices (§3.3)"
    assert meta.query_idx.tolist() == [e["row"] for e in entries], "DN rows g·n_max + t (§3.3 step 5)"
    assert meta.labels.tolist() == [int(e["label"]) for e in entries], "clean DN labels, group-major"
    assert_close(meta.boxes, torch.stack([e["box"] for e in entries]), "clean DN boxes", 0)
    assert meta.noised_labels.tolist() == [int(x) for x in dn["noised_labels"]], "noised DN labels"
    assert_close(meta.noised_boxes, torch.stack(list(dn["noised_boxes"])), "noised DN boxes", 1e-6)
    assert_close(predictions.pred_logits, r["o_train"]["dn_pred_logits"], "dn_outputs.pred_logits", tol(r))
    assert_close(predictions.pred_boxes, r["o_train"]["dn_pred_boxes"], "dn_outputs.pred_boxes", tol(r))


def check_eval_mode_losses(r):
    m, o = r["m_eval_losses"], r["o_eval_losses"]
    assert set(m) == set(o), f"eval loss keys: extra {sorted(set(m) - set(o))}, missing {sorted(set(o) - set(m))}"
    for key in sorted(o):
        assert_close(m[key], o[key], f"eval-mode loss {key}", tol(r, "loss"))
        if key.startswith("tgt_"):
            assert not torch.as_tensor(m[key]).requires_grad, f"{key} must be a constant at eval (§3.6)"


def check_gradients(r, names):
    """Gradients of ``names`` and of every other trainable parameter equal the oracle's (relative to the
    gradient's scale); a parameter without gradient on one side must have none (or zero) on the other."""
    grads_m, grads_o = r["m_grads"], r["o_grads"]
    assert set(grads_m) == set(grads_o), "trainable parameter sets differ"
    scale = {n: float(g.abs().max()) for n, g in grads_o.items() if g is not None}
    for n in names:
        assert grads_o[n] is not None and grads_m[n] is not None, f"no gradient reached {n}"
        assert_close(grads_m[n], grads_o[n], f"grad {n}", tol(r, "loss") * max(1.0, scale[n]))
    bad = []
    for n in sorted(grads_o):
        go, gm = grads_o[n], grads_m[n]
        if go is None or float(go.abs().max()) == 0.0:
            if gm is not None and float(gm.abs().max()) != 0.0:
                bad.append(f"{n} (oracle has no gradient)")
            continue
        if gm is None:
            bad.append(f"{n} (model has no gradient)")
            continue
        d = float((gm.double() - go).abs().max())
        if d > tol(r, "loss") * max(1.0, scale[n]):
            bad.append(f"{n} (max |diff| {d:.2e}, max |grad| {scale[n]:.2e})")
    assert not bad, "gradients differ from the spec oracle: " + "; ".join(bad)


def check_noise_rng_order(r):
    """Seeded default-noise forward: the model's noised labels/boxes equal the Appendix-B draws."""
    meta = r["m_train"]["dn_meta"]
    labels, boxes = r["o_noise"]
    clean = torch.cat([t["labels"] for t in r["targets"]]).repeat(r["cfg"].scalar)
    assert bool((labels != clean).any()), "the seed should flip at least one label"
    assert meta.noised_labels.tolist() == labels.tolist(), "label noise draws differ from Appendix B order"
    assert_close(meta.noised_boxes, boxes, "noised boxes (Appendix B)", 1e-6)
