"""Training speed, inference throughput, memory, size and FLOPs of a DN-DETR model, with and without denoising.

    python scripts/benchmark.py -m dn_dab_detr
    python scripts/benchmark.py --config configs/dn_dab_deformable_detr_r50.py --amp --out results.json
    python scripts/benchmark.py -m dn_dab_detr --backbone resnet18 --dn on --profile --device cpu
    python scripts/benchmark.py --config configs/dn_dab_dino_deformable_detr_r50.py  # contrastive DN overhead

The model is built from ``main.py``'s flags (``-m``, ``--config``, ``--backbone``, ``--num_queries`` ...; the
data and run flags are ignored) with random weights (``--no_pretrained_backbone`` is forced: weights do not
change the speed). ``--dn both|on|off`` decides the denoising setting (``--use_dn`` is ignored); both settings
are built from the same seed and fed the same synthetic batch: ``--batch_size`` random ``--image_size H W``
images (default 800x1199, a typical COCO training size, on CUDA; 320x480, the same aspect ratio, elsewhere,
so that a CPU run takes minutes) with ``--num_objects`` random valid boxes each (default 7, about COCO's
average) and labels below ``--num_classes`` (default 91).

Per model x denoising setting:

* train step: median wall time of forward + criterion + backward + AdamW step (main.py's two parameter
  groups, gradient clipping at ``--clip_max_norm``) over ``--iters`` steps after ``--warmup`` untimed ones;
  both settings stay built and take turns step by step, so that load changes on a shared machine hit them
  alike. With ``--amp``: float16 autocast and a GradScaler on CUDA, bfloat16 autocast elsewhere
  (engine.autocast);
* inference: images per second of the model plus the post-processor in eval mode without gradients (the
  settings also take turns);
* peak memory of one training step: on CUDA the max allocated of the setting (its weights, gradients and
  optimizer state plus the rise during the step), elsewhere the process peak-RSS rise during the step (its
  activations and gradients; see util.benchmarking);
* parameters (total, trainable) and GFLOPs per image of one inference forward, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (FLOP = 2 x multiply-accumulate);
* the DN overhead: median train step with denoising / without.

``--compare "FLAGS"`` measures every setting a second time with these ``main.py`` flags added (one quoted
string: ``--compare=--compile``, ``--compare "--checkpoint_encoder --checkpoint_decoder"``; a single flag
needs the ``=``, or argparse reads it as an option of its own): both versions are built side by side, their
steps take turns like the denoising settings', and the report adds the ratios compared / plain of the train
step, the inference throughput and the peak memory. Back-to-back runs of the script on a shared CPU differ
by 10% and more; taken in turns, the ratio is far steadier.

The device is synchronised after every timed call. ``--compile`` wraps the model in ``torch.compile`` and
falls back to eager mode with a message if compiling fails. ``--profile`` runs ``torch.profiler`` over a few
training steps and prints the top operators by self time (CPU, and CUDA on a GPU) plus the time of each
phase. Prints a markdown table; ``--out`` also writes every number and the environment as JSON.

On a CPU that other jobs share, ``--threads 1`` gives far steadier times: with as many threads as cores, a
step slows down many times over whenever another process takes a core (seen: 1.7 s -> 40 s per step).
"""
import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import autocast, backward, clip_and_step, weighted_loss  # noqa: E402
from cli import exit_on_user_errors, get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from models.builder import build_dn_config, resolve_num_classes  # noqa: E402
from util.benchmarking import PeakMemory, device_name, interleaved_timed_runs_ms, synchronize  # noqa: E402
from util.config import parse_args  # noqa: E402
from util.device import resolve_device  # noqa: E402
from util.optim import build_optimizer  # noqa: E402
from util.misc import NestedTensor, nested_tensor_from_tensor_list  # noqa: E402

CUDA_IMAGE_SIZE = (800, 1199)
OTHER_IMAGE_SIZE = (320, 480)
DN_SETTINGS = {"both": (False, True), "on": (True,), "off": (False,)}
FLOP_NOTE = ("GFLOPs: torch.utils.flop_counter.FlopCounterMode counts matrix multiplications, convolutions and "
             "attention only; grid_sample (the sampling of deformable attention), element-wise ops, norms and "
             "softmax are not counted. One multiply-accumulate counts as 2 FLOPs; tables made with fvcore (as in "
             "the DETR-family papers) count it as 1, so their 'GFLOPs' are about half of these")
PHASES = ("benchmark/forward", "benchmark/criterion", "benchmark/backward", "benchmark/optimizer")


def get_benchmark_parser() -> argparse.ArgumentParser:
    """``main.py``'s parser (model flags, ``--config``, ``--batch_size``, ``--amp``, ``--device``, ``--seed``)
    plus the benchmark's own options."""
    parser = get_args_parser()
    parser.prog = Path(__file__).name
    parser.description = __doc__.split("\n\n")[0]
    group = parser.add_argument_group("benchmark")
    group.add_argument("--dn", default="both", choices=sorted(DN_SETTINGS),
                       help="denoising settings to measure (overrides --use_dn); 'both' also gives the DN overhead")
    group.add_argument("--image_size", type=int, nargs=2, default=None, metavar=("H", "W"),
                       help=f"synthetic image size (default {CUDA_IMAGE_SIZE[0]} {CUDA_IMAGE_SIZE[1]} on CUDA, "
                            f"{OTHER_IMAGE_SIZE[0]} {OTHER_IMAGE_SIZE[1]} elsewhere)")
    group.add_argument("--num_objects", type=int, default=7, help="ground-truth boxes per image")
    group.add_argument("--iters", type=int, default=10, help="timed steps (the median is reported)")
    group.add_argument("--warmup", type=int, default=3, help="untimed steps first (at least one always runs)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU intra-op threads (torch.set_num_threads; default: PyTorch's choice); fewer "
                            "threads than cores avoids oversubscription when the CPU is shared")
    group.add_argument("--profile", action="store_true", help="profile training steps, print the top ops")
    group.add_argument("--profile_steps", type=int, default=3, help="training steps under the profiler")
    group.add_argument("--profile_rows", type=int, default=20, help="operators listed per profiler table")
    group.add_argument("--compare", default=None, metavar="FLAGS",
                       help="also measure every setting with these main.py flags added (one quoted string, e.g. "
                            "--compare=--compile); the two take turns and the report gives the ratios")
    group.add_argument("--out", type=Path, default=None, help="write all numbers and the environment as JSON")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {"--iters": args.iters, "--batch_size": args.batch_size, "--num_objects": args.num_objects,
                "--profile_steps": args.profile_steps, "--profile_rows": args.profile_rows}
    if args.threads is not None:
        positive["--threads"] = args.threads
    if args.image_size is not None:
        positive["--image_size"] = min(args.image_size)
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")


def synthetic_batch(batch_size: int, image_size, num_objects: int, num_classes: int, seed: int):
    """Random normalised images ``[B, 3, H, W]`` (no padding) and targets with ``num_objects`` boxes each.

    Boxes are normalised cxcywh with sides in [0.05, 0.5] lying inside the image; labels are in
    ``[0, num_classes)``.
    """
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    images = [torch.randn(3, height, width, generator=generator) for _ in range(batch_size)]
    targets = []
    for _ in range(batch_size):
        size = torch.rand(num_objects, 2, generator=generator) * 0.45 + 0.05  # (w, h)
        centre = size / 2 + torch.rand(num_objects, 2, generator=generator) * (1 - size)
        labels = torch.randint(0, num_classes, (num_objects,), generator=generator)
        targets.append({"labels": labels, "boxes": torch.cat([centre, size], dim=1)})
    return nested_tensor_from_tensor_list(images), targets


class Setup:
    """One model x denoising setting on the device: the model (and its compiled wrapper), criterion,
    post-processor, optimizer and scaler."""

    def __init__(self, args: argparse.Namespace, use_dn: bool, device: torch.device):
        run_args = copy.copy(args)
        run_args.use_dn = use_dn
        self.args = run_args
        torch.manual_seed(args.seed)  # identical initial weights with and without denoising
        model, criterion, postprocessors = build_model(run_args)
        self.model = model.to(device)
        self.criterion = criterion.to(device)
        self.postprocess = postprocessors["bbox"]
        self.optimizer = build_optimizer(self.model, args)
        self.scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
        self.net = self.model
        self.compile_error: Optional[str] = None
        if args.compile:
            try:
                self.net = torch.compile(self.model)
            except Exception as error:  # torch.compile itself may refuse (unsupported Python/platform)
                self.fall_back_to_eager(error, "wrapping the model")

    @property
    def compiled(self) -> bool:
        return self.net is not self.model

    def fall_back_to_eager(self, error: Exception, where: str) -> None:
        # The first paragraph of a compiler error names the cause; what follows is advice on logging.
        summary = " ".join(str(error).strip().split("\n\n")[0].split())[:400]
        self.compile_error = f"{type(error).__name__}: {summary}"
        print(f"torch.compile failed while {where} ({self.compile_error}); falling back to eager mode",
              file=sys.stderr)
        self.net = self.model


def make_train_step(setup: Setup, samples: NestedTensor, targets, device: torch.device):
    """One optimisation step as engine.train_one_epoch runs it, minus the loss logging."""
    model, criterion, optimizer, scaler = setup.model, setup.criterion, setup.optimizer, setup.scaler
    amp, max_norm = setup.args.amp, setup.args.clip_max_norm

    def step():
        with autocast(device, amp):
            with record_function(PHASES[0]):
                outputs = setup.net(samples, targets)
            with record_function(PHASES[1]):
                loss_dict = criterion(outputs, targets)
        losses = weighted_loss(loss_dict, criterion.weight_dict)
        optimizer.zero_grad(set_to_none=True)
        with record_function(PHASES[2]):
            backward(losses, scaler)
        with record_function(PHASES[3]):
            clip_and_step(model, optimizer, max_norm, scaler)

    return step


def make_inference(setup: Setup, samples: NestedTensor, device: torch.device):
    """Detections of one batch as engine.evaluate computes them (model + post-processor, no gradients)."""
    batch, _, height, width = samples.tensors.shape
    target_sizes = torch.tensor([[height, width]] * batch, device=device)

    @torch.no_grad()
    def infer():
        with autocast(device, setup.args.amp):
            outputs = setup.net(samples)
        setup.postprocess(outputs, target_sizes)

    return infer


def first_call(setup: Setup, make_run, what: str):
    """Build the run function and call it once; a compiled model that fails here falls back to eager."""
    run = make_run()
    try:
        run()
    except Exception as error:
        if not setup.compiled:
            raise
        setup.fall_back_to_eager(error, f"running the first {what}")
        run = make_run()
        run()
    return run


@torch.no_grad()
def inference_gflops_per_image(model: torch.nn.Module, samples: NestedTensor) -> float:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(samples)
    return counter.get_total_flops() / 1e9 / samples.tensors.shape[0]


def profile_training(step, device: torch.device, steps: int, rows: int, title: str) -> Dict:
    """Profile ``steps`` training steps; print the top ops by self time and each phase's time per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        synchronize(device)
    averages = profiler.key_averages()
    print(f"\n### Profile: {title}, {steps} training steps, top {rows} ops by self CPU time\n")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    sort_keys = ["self_cpu_time_total"]
    if device.type == "cuda":
        print(f"\n### Profile: {title}, top {rows} ops by self CUDA time\n")
        print(averages.table(sort_by="self_device_time_total", row_limit=rows))
        sort_keys.append("self_device_time_total")
    phases = {event.key.split("/", 1)[1]: event.cpu_time_total / 1e3 / steps
              for event in averages if event.key in PHASES}
    print("CPU time per step by phase: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in phases.items()))

    def summary(event) -> Dict:
        return {"name": event.key, "calls_per_step": event.count / steps,
                "self_cpu_ms_per_step": event.self_cpu_time_total / 1e3 / steps,
                "self_device_ms_per_step": event.self_device_time_total / 1e3 / steps}

    top = {key: [summary(e) for e in sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]]
           for key in sort_keys}
    return {"steps": steps, "phase_cpu_ms_per_step": phases, "top_ops": top}


def dn_query_count(args: argparse.Namespace, num_objects: int) -> int:
    """Denoising queries per image of a batch whose images have ``num_objects`` objects each (contrastive
    denoising doubles them; ``--scalar`` can be a query budget for the DINO-style variant)."""
    dn_args = copy.copy(args)
    dn_args.use_dn = True
    config = build_dn_config(dn_args)
    group_size = num_objects * (2 if config.contrastive else 1)
    return config.group_count(group_size) * group_size


def prepare_setting(args: argparse.Namespace, use_dn: bool, device: torch.device, samples: NestedTensor,
                    targets) -> Tuple[Setup, Callable[[], None], Dict]:
    """Build one setting (denoising on or off, ``args.compare`` its extra flags or None), count its
    parameters and FLOPs, warm its training step up and measure the step's peak memory. Returns the setup,
    its training step and the numbers so far."""
    held_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    setup = Setup(args, use_dn, device)
    result = {
        "model": args.modelname, "compared_flags": args.compare, "use_dn": use_dn,
        "dn_queries": dn_query_count(args, args.num_objects) if use_dn else 0,
        "params_total": sum(p.numel() for p in setup.model.parameters()),
        "params_trainable": sum(p.numel() for p in setup.model.parameters() if p.requires_grad),
        "gflops_per_image": inference_gflops_per_image(setup.model, samples),
    }
    setup.model.train()
    setup.criterion.train()
    torch.manual_seed(args.seed)  # the same denoising noise in every run
    step = first_call(setup, partial(make_train_step, setup, samples, targets, device), "training step")
    result["compiled_train"] = setup.compiled
    for _ in range(args.warmup - 1):
        step()
    with PeakMemory(device) as peak:
        step()
    if device.type == "cuda":
        # What this setting holds (weights, gradients, optimizer state) + the rise during its step; memory
        # of another setting alive at the same time is not counted.
        peak_bytes = peak.start_bytes - held_before + peak.peak_bytes
    else:
        peak_bytes = peak.peak_bytes
    result.update({"peak_memory_mib": peak_bytes / 2 ** 20, "peak_memory_exact": peak.exact})
    return setup, step, result


def benchmark_settings(variants: List[argparse.Namespace], device: torch.device, samples: NestedTensor,
                       targets) -> List[Dict]:
    """Measure every requested denoising setting of every variant (the plain arguments, and those with the
    ``--compare`` flags). The timed training steps (and inference calls) of all settings alternate
    (``interleaved_timed_runs_ms``), so that load changes on a shared machine do not bias their ratios."""
    prepared = [prepare_setting(args, use_dn, device, samples, targets)
                for args in variants for use_dn in DN_SETTINGS[args.dn]]
    setups = [setup for setup, _, _ in prepared]
    results = [result for _, _, result in prepared]
    step_times = interleaved_timed_runs_ms([step for _, step, _ in prepared], device, variants[0].iters)
    for (setup, step, result), times in zip(prepared, step_times):
        result.update({"train_step_ms": statistics.median(times), "train_step_ms_runs": times})
        if setup.args.profile:
            label = f"{setup.args.modelname}{variant_label(result)}, DN {'on' if result['use_dn'] else 'off'}"
            result["profile"] = profile_training(step, device, setup.args.profile_steps, setup.args.profile_rows,
                                                 label)

    infers = []
    for setup in setups:
        setup.model.eval()
        infer = first_call(setup, partial(make_inference, setup, samples, device), "inference")
        for _ in range(setup.args.warmup - 1):
            infer()
        infers.append(infer)
    batch = samples.tensors.shape[0]
    iters = variants[0].iters
    for setup, result, times in zip(setups, results, interleaved_timed_runs_ms(infers, device, iters)):
        median = statistics.median(times)
        result.update({"inference_ms": median, "inference_ms_runs": times, "images_per_s": batch / (median / 1e3),
                       "compiled_inference": setup.compiled, "compile_error": setup.compile_error})
    return results


def environment(device: torch.device) -> Dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "device": str(device), "device_name": device_name(device),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if hasattr(os, "sched_getaffinity"):
        env["cpus_available"] = len(os.sched_getaffinity(0))
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = list(os.getloadavg())
    return env


def variant_label(result: Dict) -> str:
    return f" [{result['compared_flags']}]" if result["compared_flags"] else ""


def dn_overheads(results: List[Dict]) -> Dict[Optional[str], float]:
    """Per variant (its ``--compare`` flags, None for the plain one): median train step with DN / without."""
    steps = {(row["compared_flags"], row["use_dn"]): row["train_step_ms"] for row in results}
    return {flags: steps[flags, True] / steps[flags, False] for flags, use_dn in steps if use_dn
            and (flags, False) in steps}


def comparisons(results: List[Dict]) -> List[Dict]:
    """Per denoising setting measured with ``--compare``: the compared version's figures / the plain one's."""
    plain = {row["use_dn"]: row for row in results if row["compared_flags"] is None}
    return [{"compared_flags": row["compared_flags"], "use_dn": row["use_dn"],
             "train_step_ratio": row["train_step_ms"] / plain[row["use_dn"]]["train_step_ms"],
             "images_per_s_ratio": row["images_per_s"] / plain[row["use_dn"]]["images_per_s"],
             "peak_memory_ratio": row["peak_memory_mib"] / plain[row["use_dn"]]["peak_memory_mib"]}
            for row in results if row["compared_flags"] is not None]


def compared_args(parser: argparse.ArgumentParser, argv: Optional[List[str]], args: argparse.Namespace
                  ) -> argparse.Namespace:
    """The arguments of ``--compare``'s variant: the command line with the compared flags appended."""
    compared = parse_args(parser, list(sys.argv[1:] if argv is None else argv) + shlex.split(args.compare))
    for flag in ("dn", "image_size", "batch_size", "num_objects", "num_classes", "iters", "warmup", "seed", "device",
                 "threads", "modelname"):
        if getattr(compared, flag) != getattr(args, flag):
            parser.error(f"--compare {args.compare!r} changes --{flag}: it may change the model and its training "
                         "only, so that both versions run the same batch the same way")
    return compared


def memory_kind(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "peak RSS rise of a step"


def print_report(settings: Dict, env: Dict, results: List[Dict]) -> None:
    height, width = settings["image_size"]
    load = f", load average {env['load_average_start'][0]:.2f}" if "load_average_start" in env else ""
    print(f"\nBenchmark: {env['device_name']}, torch {env['torch']}, {env['torch_threads']} threads{load}; "
          f"{settings['model']} ({settings['backbone']}), batch {settings['batch_size']} x {height}x{width}, "
          f"{settings['num_objects']} objects/image, amp {'on' if settings['amp'] else 'off'}, "
          f"compile {'on' if settings['compile'] else 'off'}; median of {settings['iters']} after "
          f"{settings['warmup']} warm-up\n")
    print(f"| model | DN | train step (ms) | inference (img/s) | peak train memory (MiB, "
          f"{settings['peak_memory_kind']}) | params (M, total / trainable) | GFLOPs/img | "
          "DN overhead (step) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    overheads = dn_overheads(results)
    for row in results:
        dn = f"on ({row['dn_queries']} DN queries)" if row["use_dn"] else "off"
        dn_overhead = overheads.get(row["compared_flags"]) if row["use_dn"] else None
        overhead = "" if dn_overhead is None else f"{dn_overhead:.3f}x"
        approx = "" if row["peak_memory_exact"] else " (lower bound)"
        compiled = {(True, True): " (compiled)", (True, False): " (compiled: training only)",
                    (False, False): ""}[row["compiled_train"], row["compiled_inference"]]
        print(f"| {row['model']}{variant_label(row)}{compiled} | {dn} | {row['train_step_ms']:.1f} | "
              f"{row['images_per_s']:.2f} | {row['peak_memory_mib']:.0f}{approx} | {row['params_total'] / 1e6:.2f} / "
              f"{row['params_trainable'] / 1e6:.2f} | {row['gflops_per_image']:.1f} | {overhead} |")
    if None in overheads:
        print(f"\nDN overhead (median train step with DN / without): {overheads[None]:.3f}x")
    else:
        print("\nDN overhead: not measured (needs --dn both)")
    for ratio in comparisons(results):
        print(f"[{ratio['compared_flags']}] / plain, DN {'on' if ratio['use_dn'] else 'off'}: train step "
              f"{ratio['train_step_ratio']:.3f}x, inference throughput {ratio['images_per_s_ratio']:.3f}x, "
              f"peak train memory {ratio['peak_memory_ratio']:.3f}x")
    print(f"Note: {FLOP_NOTE}.")


def main(argv=None) -> None:
    parser = get_benchmark_parser()
    args = parse_args(parser, argv)
    check_args(parser, args)
    plain = copy.copy(args)
    plain.compare = None
    variants = [plain] + ([compared_args(parser, argv, args)] if args.compare else [])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    image_size = args.image_size or list(CUDA_IMAGE_SIZE if device.type == "cuda" else OTHER_IMAGE_SIZE)
    for run_args in [args] + variants:
        run_args.no_pretrained_backbone = True
        run_args.image_size = image_size
        num_classes = resolve_num_classes(run_args)
    env = environment(device)

    samples, targets = synthetic_batch(args.batch_size, args.image_size, args.num_objects, num_classes, args.seed)
    samples = samples.to(device)
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

    results = benchmark_settings(variants, device, samples, targets)
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = list(os.getloadavg())

    settings = {"model": args.modelname, "config": args.config, "backbone": args.backbone,
                "image_size": list(args.image_size), "batch_size": args.batch_size, "num_objects": args.num_objects,
                "num_classes": num_classes, "amp": args.amp, "compile": args.compile, "dn": args.dn,
                "compare": args.compare,
                "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
                "peak_memory_kind": memory_kind(device)}
    print_report(settings, env, results)
    if args.out is not None:
        report = {"environment": env, "settings": settings, "results": results,
                  "dn_overhead": {"train_step_ratio": dn_overheads(results).get(None)},
                  "comparisons": comparisons(results), "notes": [FLOP_NOTE],
                  "args": {k: v for k, v in vars(args).items() if k != "out"}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    with exit_on_user_errors("benchmark.py"):
        main()
