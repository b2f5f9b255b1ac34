"""DN-DETR vs its baseline: the same model trained twice, with and without denoising (paper Fig. 7).

    python scripts/convergence.py                       # defaults: ~35 min on 2 CPU cores
    python scripts/convergence.py --out outputs/conv --epochs 30 -- --lr 1e-4   # flags after -- go to main.py

Generates the synthetic COCO set (the easy preset with class colours, 200 + 50 images, unless ``--data``
is given or it exists), trains ``--config`` once with ``--use_dn`` and
once without (identical seed, data order and settings otherwise), evaluating COCO AP after every
epoch, then writes into ``--out``:

* ``convergence.png``: AP and AP50 against epoch for both runs;
* ``convergence.md``: AP per epoch and the epoch at which the DN run first reaches the baseline's
  final AP (the paper's "same AP in about half the epochs");
* ``convergence.json``: the same numbers.

An interrupted experiment picks up where it stopped: a finished run is not retrained, an unfinished
one resumes from its ``checkpoint.pth``.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cli import get_args_parser  # noqa: E402
from datasets.synthetic import generate_synthetic_coco  # noqa: E402
from plot_curves import load_runs, plot_runs  # noqa: E402  (scripts/ is this script's folder)
from util.checkpoint import finished_epochs, load_checkpoint  # noqa: E402
from util.config import parse_args  # noqa: E402

RUNS = {"dn_detr": ["--use_dn"], "baseline": ["--no-use_dn"]}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("scripts/convergence.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "convergence")
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic_convergence.py"),
                        help="training settings shared by both runs (their --use_dn is overridden)")
    parser.add_argument("--data", type=Path, default=None, help="COCO-format folder (default: generate one in --out)")
    parser.add_argument("--preset", default="easy", help="synthetic set difficulty when generating")
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_val", type=int, default=50)
    parser.add_argument("--data_seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--seed", type=int, default=42, help="training seed, the same for both runs")
    return parser


def train(name: str, run_flags: List[str], args, data: Path, extra: Sequence[str]) -> Path:
    run_dir = args.out / name
    flags = ["--config", args.config, "--coco_path", str(data), "--output_dir", str(run_dir), "--seed",
             str(args.seed), *extra, *run_flags]
    if args.epochs is not None:
        flags += ["--epochs", str(args.epochs)]
    checkpoint = run_dir / "checkpoint.pth"
    if checkpoint.exists():
        if finished_epochs(load_checkpoint(checkpoint)) >= parse_args(get_args_parser(), flags).epochs:
            print(f"[convergence] {name}: {checkpoint} has finished every epoch, not retrained", flush=True)
            return run_dir
        flags += ["--resume", str(checkpoint)]
    command = [sys.executable, str(ROOT / "main.py"), *flags]
    print(f"[convergence] {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=ROOT, check=True)
    return run_dir


def first_epoch_reaching(ap_per_epoch: Dict[int, float], target: float) -> Optional[int]:
    return next((epoch for epoch in sorted(ap_per_epoch) if ap_per_epoch[epoch] >= target), None)


def summarize(runs) -> dict:
    dn, baseline = (run.values("AP") for run in runs)
    baseline_epochs = len(baseline)
    final_baseline_ap = baseline[max(baseline)]
    reached = first_epoch_reaching(dn, final_baseline_ap)
    return {
        "ap": {run.name: {str(e): v for e, v in run.values("AP").items()} for run in runs},
        "ap50": {run.name: {str(e): v for e, v in run.values("AP50").items()} for run in runs},
        "baseline_final_ap": final_baseline_ap,
        "dn_final_ap": dn[max(dn)],
        "baseline_epochs": baseline_epochs,
        # Epochs are 0-based in the logs: reaching it at epoch e takes e + 1 epochs.
        "dn_epochs_to_baseline_final_ap": None if reached is None else reached + 1,
        "epoch_ratio": None if reached is None else (reached + 1) / baseline_epochs,
    }


def markdown(summary: dict) -> str:
    names = list(summary["ap"])
    epochs = sorted({int(e) for values in summary["ap"].values() for e in values})
    lines = ["| epoch | " + " | ".join(f"{n} AP" for n in names) + " | " + " | ".join(f"{n} AP50" for n in names) + " |",
             "|---" * (1 + 2 * len(names)) + "|"]
    for epoch in epochs:
        cells = [summary[key][n].get(str(epoch)) for key in ("ap", "ap50") for n in names]
        lines.append(f"| {epoch} | " + " | ".join("-" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    needed = summary["dn_epochs_to_baseline_final_ap"]
    verdict = (f"DN-DETR first reaches the baseline's final AP ({100 * summary['baseline_final_ap']:.1f}) after "
               f"{needed} of {summary['baseline_epochs']} epochs (ratio {summary['epoch_ratio']:.2f})."
               if needed is not None else
               f"DN-DETR never reaches the baseline's final AP ({100 * summary['baseline_final_ap']:.1f}); its final "
               f"AP is {100 * summary['dn_final_ap']:.1f}.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = get_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.data
    if data is None:
        data = args.out / "data"
        if not (data / "annotations" / "instances_val2017.json").exists():
            generate_synthetic_coco(data, num_train=args.num_train, num_val=args.num_val, seed=args.data_seed,
                                    preset=args.preset, class_colours=True)
    run_dirs = [train(name, flags, args, data, extra) for name, flags in RUNS.items()]

    runs = load_runs([str(d) for d in run_dirs])
    plot_runs(runs, ["AP", "AP50"], args.out / "convergence.png")
    summary = summarize(runs)
    (args.out / "convergence.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (args.out / "convergence.md").write_text(table)
    print(table)
    print(f"[convergence] wrote {args.out / 'convergence.png'}, convergence.md, convergence.json")


if __name__ == "__main__":
    main()
