"""Time and memory of multi-scale deformable attention (the pure-PyTorch op of ``models/ops``).

Four cases at the default ``dn_dab_deformable_detr`` shape (batch 2, an 800x1066 image through a ResNet:
levels at strides 8/16/32/64, 8 heads x 32 channels, 4 points; ``--image-size`` changes the image):

* ``core/decoder``, ``core/encoder``: ``ms_deform_attn_core`` alone with 300 queries / one query per pixel;
* ``module/decoder``, ``module/encoder``: the full ``MSDeformAttn`` (projections included), the decoder with
  4-D box references (cross-attention), the encoder with 2-D point references (self-attention, ``Lq = S``).

For each case: median wall time of forward + backward and of forward alone (no grad) over ``--iters`` runs after
``--warmup`` runs; the bytes the forward saves for the backward (the distinct tensor storages autograd keeps,
counted with ``torch.autograd.graph.saved_tensors_hooks``: what every layer of a model holds until its backward);
and the peak memory of one forward + backward: CUDA max-allocated above the allocation before the step, or on
CPU the process peak-RSS rise (free heap memory is first returned to the OS with glibc's ``malloc_trim`` and the
kernel's high-water mark reset through ``/proc/self/clear_refs`` where available, else the lifetime
``ru_maxrss`` is used and the figure is a lower bound).

``--reference`` also runs every case with the previous formulation of the op (one ``F.grid_sample`` per level
and a weighted sum, kept in ``tests/msda_reference.py``) swapped in, and ``--autocast bfloat16`` also runs each op
under ``torch.autocast``; the variants take turns run by run, so that load changes on a shared machine hit them
alike, and the table gives each one's ratio to the current op. Prints a markdown table; ``--out`` also writes
the figures as JSON.

Usage: ``python scripts/benchmark_msda.py [--device cuda] [--iters 5] [--reference] [--autocast bfloat16]
[--out msda.json]``
"""
import argparse
import contextlib
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models.ops.ms_deform_attn as msda_module  # noqa: E402
from models.ops import MSDeformAttn  # noqa: E402
from util.benchmarking import (PeakMemory, device_name, interleaved_timed_runs_ms, synchronize,  # noqa: E402
                               timed_runs_ms)

CASES = ("core/decoder", "core/encoder", "module/decoder", "module/encoder")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, nargs=2, default=[800, 1066], metavar=("H", "W"))
    parser.add_argument("--levels", type=int, default=4, help="feature levels from stride 8 upwards")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--queries", type=int, default=300, help="decoder queries")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--reference", action="store_true",
                        help="also run the previous per-level grid_sample formulation, interleaved, with ratios")
    parser.add_argument("--autocast", choices=["bfloat16", "float16"], default=None,
                        help="also run every op under torch.autocast with this dtype, interleaved, with ratios")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return parser.parse_args()


def level_shapes(image_height: int, image_width: int, num_levels: int):
    """ResNet feature sizes: every stride-2 stage maps ``n`` to ``ceil(n / 2)``; the first level is stride 8."""
    height, width = image_height, image_width
    for _ in range(3):
        height, width = -(-height // 2), -(-width // 2)
    shapes = []
    for _ in range(num_levels):
        shapes.append((height, width))
        height, width = -(-height // 2), -(-width // 2)
    return shapes


def make_case(name: str, args, shapes, device, dtype):
    """Returns ``(step, clear_grads, num_queries, num_values)``; ``step(with_backward)`` runs one forward, and
    the backward of a fixed output gradient if asked; ``clear_grads()`` drops the leaves' gradients."""
    generator = torch.Generator(device="cpu").manual_seed(args.seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    batch, heads, head_dim, points = args.batch, args.heads, args.head_dim, args.points
    num_levels, num_values, d_model = len(shapes), sum(h * w for h, w in shapes), args.heads * args.head_dim
    num_queries = args.queries if name.endswith("decoder") else num_values

    if name.startswith("core"):
        value = rand(batch, num_values, heads, head_dim).requires_grad_(True)
        locations = torch.rand(batch, num_queries, heads, num_levels, points, 2, generator=generator)
        locations = locations.to(device=device, dtype=dtype).requires_grad_(True)
        logits = rand(batch, num_queries, heads, num_levels * points).requires_grad_(True)
        leaves = [value, locations, logits]

        def forward():
            weights = logits.softmax(-1).view(batch, num_queries, heads, num_levels, points)
            return msda_module.ms_deform_attn_core(value, shapes, locations, weights)
    else:
        module = MSDeformAttn(d_model, num_levels, heads, points).to(device=device, dtype=dtype)
        memory = rand(batch, num_values, d_model).requires_grad_(True)
        padding_mask = torch.zeros(batch, num_values, dtype=torch.bool, device=device)
        sizes = torch.tensor([h * w for h, w in shapes])
        start_index = (torch.cumsum(sizes, 0) - sizes).to(device)
        if name.endswith("decoder"):
            query = rand(batch, num_queries, d_model).requires_grad_(True)
            centres = torch.rand(batch, num_queries, 1, 2, generator=generator) * 0.8 + 0.1
            sizes_wh = torch.rand(batch, num_queries, 1, 2, generator=generator) * 0.3 + 0.02
            references = torch.cat([centres, sizes_wh], -1).expand(-1, -1, num_levels, -1)
        else:
            query = memory
            references = torch.cat([_pixel_centres(h, w) for h, w in shapes], 0)[None, :, None, :]
            references = references.expand(batch, -1, num_levels, -1)
        references = references.to(device=device, dtype=dtype)
        leaves = [memory] + ([query] if query is not memory else []) + list(module.parameters())

        def forward():
            return module(query, references, memory, shapes, start_index, padding_mask)

    grad_output = rand(batch, num_queries, d_model)

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    def step(with_backward: bool):
        if not with_backward:
            with torch.no_grad():
                forward()
            return
        clear_grads()
        forward().backward(grad_output)

    def saved_bytes() -> int:
        """Bytes of the distinct storages the forward saves for the backward (parameters and inputs included)."""
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
        del output
        return sum(storages.values())

    return step, clear_grads, saved_bytes, num_queries, num_values


@contextlib.contextmanager
def variant_context(variant, device):
    """Run a variant: ``(op, autocast dtype or None)``; op "reference" swaps the previous formulation
    (per-level grid_sample, from the tests) in for ``ms_deform_attn_core``."""
    op, autocast_dtype = variant
    current = msda_module.ms_deform_attn_core
    if op == "reference":
        from tests.msda_reference import grid_sample_msda
        msda_module.ms_deform_attn_core = grid_sample_msda
    try:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            yield
    finally:
        msda_module.ms_deform_attn_core = current


def variant_name(variant) -> str:
    op, autocast_dtype = variant
    return op if autocast_dtype is None else f"{op}, autocast {str(autocast_dtype).replace('torch.', '')}"


def measure(step, clear_grads, saved_bytes, device, variant) -> dict:
    with variant_context(variant, device):
        step(True)  # first-call allocations (allocator caches, thread pools) stay out of the measurement
        clear_grads()
        with PeakMemory(device) as peak:
            step(True)
        clear_grads()
        saved = saved_bytes()
    return {"peak_mib": peak.peak_bytes / 2 ** 20, "peak_exact": peak.exact, "saved_mib": saved / 2 ** 20}


def variant_run(step, variant, device, with_backward: bool):
    def run():
        with variant_context(variant, device):
            step(with_backward)
    return run


def median_times(runs, device, warmup: int, iters: int):
    """Median ms of each function in ``runs``: alone with ``timed_runs_ms``, or taking turns when several."""
    if len(runs) == 1:
        return [statistics.median(timed_runs_ms(runs[0], device, warmup, iters))]
    for run in runs:
        for _ in range(warmup):
            run()
    synchronize(device)
    return [statistics.median(times) for times in interleaved_timed_runs_ms(runs, device, iters)]


def _pixel_centres(height: int, width: int) -> torch.Tensor:
    rows, cols = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                                indexing="ij")
    return torch.stack([cols.reshape(-1), rows.reshape(-1)], -1)  # [H*W, 2] (x, y)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    shapes = level_shapes(*args.image_size, args.levels)
    autocast_dtype = getattr(torch, args.autocast) if args.autocast else None
    variants = [("current", None)] + ([("reference", None)] if args.reference else [])
    if autocast_dtype is not None:
        variants += [(op, autocast_dtype) for op, _ in variants]

    results = []
    for name in args.cases:
        step, clear_grads, saved_bytes, num_queries, num_values = make_case(name, args, shapes, device, dtype)
        rows = [{"case": name, "variant": variant_name(variant), "queries": num_queries, "values": num_values,
                 **measure(step, clear_grads, saved_bytes, device, variant)} for variant in variants]

        for key, with_backward in (("fwd_bwd_ms", True), ("fwd_ms", False)):
            times = median_times([variant_run(step, variant, device, with_backward) for variant in variants],
                                 device, args.warmup, args.iters)
            for row, time_ms in zip(rows, times):
                row[key] = time_ms
        results += rows
        del step, clear_grads, saved_bytes
        gc.collect()

    config = {"device": str(device), "device_name": device_name(device), "dtype": args.dtype,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
              "image_size": list(args.image_size), "level_shapes": shapes, "heads": args.heads,
              "head_dim": args.head_dim, "points": args.points, "iters": args.iters, "warmup": args.warmup,
              "variants": [variant_name(variant) for variant in variants]}
    print(f"MSDA benchmark: {config['device_name']}, {args.dtype}, torch {torch.__version__}, "
          f"{config['threads']} threads, batch {args.batch}, image {args.image_size[0]}x{args.image_size[1]}, "
          f"levels {shapes}, {args.heads}x{args.head_dim}, {args.points} points, median of {args.iters} after "
          f"{args.warmup} warm-up" + (", variants taking turns" if len(variants) > 1 else "") + "\n")
    memory_kind = "CUDA max allocated" if device.type == "cuda" else "peak RSS rise"
    columns = ["fwd+bwd (ms)", "fwd, no grad (ms)", "saved for backward (MiB)",
               f"peak memory, fwd+bwd (MiB, {memory_kind})"]
    keys = ["fwd_bwd_ms", "fwd_ms", "saved_mib", "peak_mib"]
    with_variants = len(variants) > 1
    header = ["case"] + (["op"] if with_variants else []) + ["Lq", "S"] + columns
    print("| " + " | ".join(header) + " |")
    print("|---|" + ("---|" if with_variants else "") + "---:|---:|" + "---:|" * len(columns))
    baseline = {}
    for row in results:
        baseline.setdefault(row["case"], row)
        cells = [row["case"]] + ([row["variant"]] if with_variants else []) + [str(row["queries"]),
                                                                               str(row["values"])]
        for key in keys:
            digits = 0 if key == "peak_mib" else 1
            cell = f"{row[key]:.{digits}f}"
            first = baseline[row["case"]]
            if row is not first and first[key] > 0:
                cell += f" ({row[key] / first[key]:.2f}x)"
            if key == "peak_mib" and not row["peak_exact"]:
                cell += " (lower bound)"
            cells.append(cell)
        print("| " + " | ".join(cells) + " |")
    if with_variants:
        print(f"\n(ratios: to the {variant_name(variants[0])} op of the same case)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config, "results": results}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
