#!/usr/bin/env bash
# One-command check of the CUDA path, for a machine with an NVIDIA GPU (never needed by the test suite).
#
#   scripts/gpu_check.sh [--out FILE] [--skip-compile] [--iters N]
#
# In order, each step recorded in one JSON report (default outputs/gpu_check/gpu_check.json, rewritten after
# every step so that an interrupted run keeps what it measured):
#   1. correctness: for dn_dab_detr and dn_dab_deformable_detr (R50 layout, random weights, 300 queries), CUDA
#      float32 outputs and losses against the CPU's on one fixed batch (TF32 off), in eval mode;
#   2. mixed precision: one float16 training step with a GradScaler (loss and gradients finite, parameters
#      updated; then a step with an infinite loss must be skipped and halve the scale) and one bfloat16 step
#      (finite, parameters updated), both models, with denoising;
#   3. the deformable attention op on CUDA against the CPU: float64 and float32 values and gradients, and the
#      bfloat16-autocast op against float32;
#   4. benchmarks at 800x1199, batch 2: scripts/benchmark_msda.py (current and previous op, bf16 autocast),
#      then scripts/benchmark.py for both models with and without DN: float32, --amp, and --compile (last;
#      --skip-compile leaves it out).
# Sized for well under 8 minutes on a recent data-centre GPU. Exits 2 at once without CUDA, 1 if a check
# failed (after writing the report), 0 otherwise.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON="$(command -v python3)"

OUT="outputs/gpu_check/gpu_check.json"
SKIP_COMPILE=0
ITERS=10
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --skip-compile) SKIP_COMPILE=1; shift ;;
        --iters) ITERS="$2"; shift 2 ;;
        -h|--help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is available here (torch.cuda.is_available() is False, or torch is" \
         "missing); this check needs an NVIDIA GPU. Nothing was run." >&2
    exit 2
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$(dirname "$OUT")"
echo "gpu_check: report -> $OUT"

# ------------------------------------------------------------------ steps 1-3: correctness (one Python process)
set +e
"$PYTHON" - "$WORK/checks.json" <<'PY'
import json
import sys
import time
import traceback

import torch

from main import get_args_parser
from models import build_model
from models.ops import ms_deform_attn_core

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
MODELS = ("dn_dab_detr", "dn_dab_deformable_detr")
report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
          "checks": {}}


def fixed_batch(device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, 320, 480, generator=generator), torch.randn(3, 288, 400, generator=generator)]
    targets = []
    for count in (5, 2):
        centres = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, 91, (count,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centres, sizes], 1).to(device)})
    return [image.to(device) for image in images], targets


def build(modelname, *flags):
    args = get_args_parser().parse_args(["-m", modelname, "--no_pretrained_backbone", *flags])
    torch.manual_seed(0)
    return build_model(args)


def tensors(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for key, value in tree.items():
            yield from tensors(value, f"{prefix}.{key}")
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from tensors(value, f"{prefix}[{index}]")


def max_abs_diff(a, b):
    a, b = dict(tensors(a)), dict(tensors(b))
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k].double().cpu() - b[k].double().cpu()).abs().max().item() for k in a if a[k].is_floating_point())


def check_fp32_cuda_vs_cpu(modelname):
    model, criterion, _ = build(modelname)
    model.eval()
    results = []
    for device in (CPU, CUDA):
        model.to(device)
        criterion.to(device)
        images, targets = fixed_batch(device)
        with torch.no_grad():
            outputs = model(images)
            losses = criterion(outputs, targets)
        results.append(({k: v for k, v in outputs.items() if k != "dn_meta"}, losses))
    (cpu_outputs, cpu_losses), (cuda_outputs, cuda_losses) = results
    output_diff = max_abs_diff(cpu_outputs, cuda_outputs)
    loss_diff = max_abs_diff(cpu_losses, cuda_losses)
    return {"max_abs_output_diff": output_diff, "max_abs_loss_diff": loss_diff,
            "passed": output_diff < 1e-3 and loss_diff < 1e-3}


def parameters_changed(model, before):
    return any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)


def train_step(model, criterion, optimizer, images, targets, dtype, scaler, loss_factor=1.0):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        outputs = model(images, targets)
        losses = criterion(outputs, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses) * loss_factor
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total.item(), grads_finite


def check_amp(modelname, dtype):
    model, criterion, _ = build(modelname, "--use_dn")
    model.to(CUDA).train()
    criterion.to(CUDA).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    images, targets = fixed_batch(CUDA)
    # GradScaler starts at a scale of 2**16, which often overflows float16 gradients: it then skips the
    # step and halves the scale. Steps are repeated until one is taken (at most 24: a scale of 2**-8).
    for attempt in range(24):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss, grads_finite = train_step(model, criterion, optimizer, images, targets, dtype, scaler)
        if grads_finite or scaler is None:
            break
    result = {"loss": loss, "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
              "grads_finite": grads_finite, "parameters_updated": parameters_changed(model, before),
              "overflow_steps_skipped_first": attempt}
    passed = result["loss_finite"] and grads_finite and result["parameters_updated"]
    if scaler is not None:
        scale = scaler.get_scale()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train_step(model, criterion, optimizer, images, targets, dtype, scaler, loss_factor=float("inf"))
        result.update(scale=scale, scale_after_inf_step=scaler.get_scale(),
                      inf_step_skipped=not parameters_changed(model, before))
        passed = passed and result["inf_step_skipped"] and result["scale_after_inf_step"] == scale / 2
    result["passed"] = passed
    return result


def check_msda_op():
    generator = torch.Generator().manual_seed(0)
    shapes = [(40, 60), (20, 30), (10, 15), (5, 8)]
    num_values = sum(h * w for h, w in shapes)
    result = {}
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        value = torch.randn(2, num_values, 8, 32, generator=generator, dtype=dtype)
        locations = torch.rand(2, 500, 8, 4, 4, 2, generator=generator, dtype=dtype) * 1.2 - 0.1
        weights = torch.rand(2, 500, 8, 4, 4, generator=generator, dtype=dtype)
        grad_output = torch.randn(2, 500, 256, generator=generator, dtype=dtype)
        runs = []
        for device in (CPU, CUDA):
            inputs = [t.to(device).requires_grad_(True) for t in (value, locations, weights)]
            output = ms_deform_attn_core(inputs[0], shapes, inputs[1], inputs[2])
            output.backward(grad_output.to(device))
            runs.append([output] + [t.grad for t in inputs])
        diffs = [((a.cpu() - b).abs().max() / b.abs().max()).item() for b, a in zip(*runs)]
        result[str(dtype)] = {"max_rel_diff_output_value_locations_weights": diffs,
                              "passed": max(diffs) < tolerance}
    value32 = value.float().to(CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = ms_deform_attn_core(value32, shapes, locations.float().to(CUDA), weights.float().to(CUDA))
    full = ms_deform_attn_core(value32, shapes, locations.float().to(CUDA), weights.float().to(CUDA))
    error = ((low.float() - full).abs().max() / full.abs().max()).item()
    result["bfloat16_autocast_vs_float32"] = {"dtype": str(low.dtype), "max_rel_error": error,
                                              "passed": low.dtype == torch.bfloat16 and error < 2e-2}
    result["passed"] = all(v["passed"] for v in result.values() if isinstance(v, dict))
    return result


checks = [(f"fp32_cuda_vs_cpu/{m}", check_fp32_cuda_vs_cpu, (m,)) for m in MODELS]
checks += [(f"amp_{name}_step/{m}", check_amp, (m, dtype)) for m in MODELS
           for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))]
checks += [("msda_op_cuda_vs_cpu", check_msda_op, ())]
for name, function, arguments in checks:
    start = time.perf_counter()
    try:
        result = function(*arguments)
    except Exception:  # a crash is a failed check, recorded with its traceback
        result = {"passed": False, "error": traceback.format_exc()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    report["checks"][name] = result
    print(f"gpu_check: {name}: {'ok' if result['passed'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    torch.cuda.empty_cache()
report["passed"] = all(r["passed"] for r in report["checks"].values())
with open(sys.argv[1], "w") as handle:
    json.dump(report, handle, indent=2, default=str)
sys.exit(0 if report["passed"] else 1)
PY
CHECKS_STATUS=$?
set -e

merge() {  # merge the checks and every benchmark JSON written so far into the report
    "$PYTHON" - "$WORK" "$OUT" <<'PY'
import json
import sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {"checks": None, "benchmarks": {}}
if (work / "checks.json").exists():
    report["checks"] = json.loads((work / "checks.json").read_text())
for path in sorted(work.glob("bench_*.json")):
    report["benchmarks"][path.stem[len("bench_"):]] = json.loads(path.read_text())
for path in sorted(work.glob("bench_*.failed")):
    report["benchmarks"][path.stem[len("bench_"):]] = {"failed": path.read_text()[-4000:]}
out.write_text(json.dumps(report, indent=2) + "\n")
PY
}
merge

# ------------------------------------------------------------------------------------- step 4: benchmarks
bench() {  # bench NAME SCRIPT ARGS...: run one benchmark, keep its JSON or its failure, update the report
    local name="$1" script="$2"
    shift 2
    echo "gpu_check: benchmark $name"
    if ! "$PYTHON" "$script" "$@" --out "$WORK/bench_$name.json" > "$WORK/bench_$name.log" 2>&1; then
        echo "gpu_check: benchmark $name FAILED (tail of its log in the report)" >&2
        cp "$WORK/bench_$name.log" "$WORK/bench_$name.failed"
        BENCH_FAILED=1
    else
        grep '^|' "$WORK/bench_$name.log" || true
    fi
    merge
}
BENCH_FAILED=0
bench msda scripts/benchmark_msda.py --device cuda --image-size 800 1199 --reference --autocast bfloat16
for model in dn_dab_detr dn_dab_deformable_detr; do
    config="configs/${model}_r50.py"
    bench "${model}_fp32" scripts/benchmark.py --config "$config" --device cuda --dn both --iters "$ITERS"
    bench "${model}_amp" scripts/benchmark.py --config "$config" --device cuda --dn both --iters "$ITERS" --amp
done
if [ "$SKIP_COMPILE" -eq 0 ]; then
    for model in dn_dab_detr dn_dab_deformable_detr; do
        bench "${model}_compile" scripts/benchmark.py --config "configs/${model}_r50.py" --device cuda --dn both \
            --iters "$ITERS" --compile
    done
fi

echo "gpu_check: wrote $OUT"
if [ "$CHECKS_STATUS" -ne 0 ] || [ "$BENCH_FAILED" -ne 0 ]; then
    echo "gpu_check: FAILED (see $OUT)" >&2
    exit 1
fi
echo "gpu_check: all checks passed"
