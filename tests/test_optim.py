"""AdamW's implementations (--adamw_impl): the fused default updates the weights as the for-loop reference does,
up to float rounding; foreach is identical to it; a restored optimizer takes the requested implementation."""
import json
import sys
from pathlib import Path

import torch

from models import build_model
from tests.model_utils import TINY_FLAGS, tiny_args
from util.optim import ADAMW_IMPLEMENTATIONS, build_optimizer, use_adamw_impl


def weights_after_steps(impl, steps=5):
    torch.manual_seed(0)
    args = tiny_args("dn_dab_deformable_detr", "--adamw_impl", impl, "--lr", "1e-3", "--lr_backbone", "1e-4")
    model, _, _ = build_model(args)
    optimizer = build_optimizer(model, args)
    generator = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
        optimizer.step()
    return [p.detach() for p in params], optimizer


def test_fused_and_foreach_match_the_for_loop_reference():
    reference, _ = weights_after_steps("for-loop")
    foreach, _ = weights_after_steps("foreach")
    fused, optimizer = weights_after_steps("fused")
    assert all(g["fused"] for g in optimizer.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(foreach, reference))
    moved = max(float((a - b).abs().max()) for a, b in zip(fused, reference))
    assert 0 < moved < 1e-6  # float rounding, far below the 5e-3 the weights moved in 5 steps at lr 1e-3


def test_restored_optimizer_takes_the_requested_implementation():
    _, optimizer = weights_after_steps("for-loop", steps=1)
    use_adamw_impl(optimizer, "fused")
    assert all(g["fused"] and not g["foreach"] for g in optimizer.param_groups)
    assert set(ADAMW_IMPLEMENTATIONS) == {"fused", "foreach", "for-loop"}


def test_optimizer_benchmark_reports_every_implementation(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import benchmark_optimizer

    out = tmp_path / "adamw.json"
    result = benchmark_optimizer.main(["-m", "dn_dab_detr", *TINY_FLAGS, "--steps", "2", "--device", "cpu",
                                       "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["step_ms"]) == set(ADAMW_IMPLEMENTATIONS) and all(t > 0 for t in result["step_ms"].values())
    assert result["max_weight_difference_from_for_loop"]["foreach"] == 0
