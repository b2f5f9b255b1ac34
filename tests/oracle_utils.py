"""Helpers shared by the spec-oracle equivalence tests: inputs, parameter randomisation, comparisons."""
import torch

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


def assert_close(actual, expected, what, atol):
    actual = torch.as_tensor(actual).detach().double()
    expected = torch.as_tensor(expected).detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs oracle {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bound = atol + atol * expected.abs()
    if actual.numel() and not bool((diff <= bound).all()):
        worst = int(torch.argmax(diff - bound))
        raise AssertionError(f"{what}: model differs from the spec oracle, max |diff| {diff.max():.3e} "
                             f"(model {actual.flatten()[worst]:.10g} vs oracle {expected.flatten()[worst]:.10g} "
                             f"at flat index {worst})")
