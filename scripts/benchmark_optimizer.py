"""Time of one AdamW step per implementation (``--adamw_impl``) over a model's trainable parameters.

    python scripts/benchmark_optimizer.py -m dn_dab_detr --threads 1 --out docs/results/adamw_impl_cpu.json

The model is built from ``main.py``'s flags with random weights; every implementation steps the same random
gradients, taking turns step by step (so that load changes on a shared machine hit them alike). Reports the
median step time and the largest weight difference from the for-loop reference after the timed steps.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import exit_on_user_errors, get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from util.benchmarking import interleaved_timed_runs_ms  # noqa: E402
from util.config import parse_args  # noqa: E402
from util.device import resolve_device  # noqa: E402
from util.optim import ADAMW_IMPLEMENTATIONS, build_optimizer  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.prog = "scripts/benchmark_optimizer.py"
    group = parser.add_argument_group("benchmark")
    group.add_argument("--steps", type=int, default=10, help="timed steps per implementation (after one untimed)")
    group.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    group.add_argument("--out", type=Path, default=None, help="write the numbers as JSON")
    return parser


def main(argv=None) -> dict:
    args = parse_args(get_parser(), argv)
    args.no_pretrained_backbone = True
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    setups = {}
    for impl in ADAMW_IMPLEMENTATIONS:
        torch.manual_seed(args.seed)
        args.adamw_impl = impl
        model = build_model(args)[0].to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        setups[impl] = (params, build_optimizer(model, args))
    generator = torch.Generator().manual_seed(args.seed)
    grads = [(torch.randn(p.shape, generator=generator) * 1e-3).to(device) for p in setups["for-loop"][0]]

    def step(impl):
        params, optimizer = setups[impl]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()

    for impl in setups:
        step(impl)
    times = interleaved_timed_runs_ms([lambda impl=impl: step(impl) for impl in setups], device, args.steps)
    reference = setups["for-loop"][0]
    result = {
        "model": args.modelname, "device": str(device), "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in reference), "steps": args.steps + 1,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "step_ms": {impl: statistics.median(t) for impl, t in zip(setups, times)},
        "max_weight_difference_from_for_loop": {
            impl: max(float((a - b).detach().abs().max()) for a, b in zip(setups[impl][0], reference))
            for impl in setups},
    }
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    with exit_on_user_errors("benchmark_optimizer.py"):
        main()
