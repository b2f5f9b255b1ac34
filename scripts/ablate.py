"""Ablations of denoising training (in the spirit of the paper's Table 6): variants x seeds, resumable.

    python scripts/ablate.py                          # the committed ablation (one seed, the half schedule)
    python scripts/ablate.py --only dn_half no_attn_mask_half --seeds 0 1
    python scripts/ablate.py --variant "more_groups=--use_dn --scalar 10" --variant dn_half=--use_dn

Each variant is a set of ``main.py`` flags; every variant runs once per ``--seeds`` value with the same
shared settings (``--config`` and the flags after ``--``) and schedule (``--epochs``, lr drop after 80% of
them). The default variants:

* ``dn_half``: full denoising (the default noise, 5 groups, the attention mask);
* ``no_label_noise_half``: ``--label_noise_scale 0`` (box noise only);
* ``one_group_half``: ``--scalar 1``;
* ``no_attn_mask_half``: ``--no-dn_attn_mask``: the matching queries see the denoising queries (and the
  groups each other), so the ground truth leaks into matching during training but not at inference;
* ``baseline_half``: no denoising.

Runs are kept, resumed and recorded as by ``scripts/convergence.py`` (same ``--out`` and ``--results``
defaults, so a variant that is one of its runs, like ``dn_half``, is not trained twice; ``--runs`` shares
its records with another results folder). Writes
``ablation.md`` (final AP and IS per variant), ``ablation.json`` (the same numbers and the per-epoch
curves) and ``ablation.png`` (AP and IS per epoch) into ``--results``.
"""
import argparse
import shlex
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# scripts/ (this script's folder) is on the path: experiment.py is its neighbour.
from experiment import (RunSpec, add_common_arguments, arm_curves, ensure_run,  # noqa: E402
                        parse_with_main_flags, prepare_experiment, run_script, schedule, write_report)

DEFAULT_VARIANTS = {
    "dn_half": "--use_dn",
    "no_label_noise_half": "--use_dn --label_noise_scale 0",
    "one_group_half": "--use_dn --scalar 1",
    "no_attn_mask_half": "--use_dn --no-dn_attn_mask",
    "baseline_half": "--no-use_dn",
}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("scripts/ablate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_common_arguments(parser)
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "convergence",
                        help="the committed record: ablation.md/.json/.png, and the run logs unless --runs")
    parser.add_argument("--runs", type=Path, default=None,
                        help="where finished runs are recorded (default: RESULTS/runs); share it to reuse runs")
    parser.add_argument("--epochs", type=int, default=10, help="the schedule of every run (lr drop after 80%%)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", type=variant, action="append", metavar="NAME=FLAGS", default=None,
                        help="a variant and its main.py flags, e.g. 'bf16=--use_dn --amp'; repeat it for more; "
                             "replaces the default variants")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these variants")
    return parser


def variant(text: str) -> Tuple[str, str]:
    """``NAME=FLAGS`` of ``--variant`` -> ``(NAME, FLAGS)`` (one value, so that flags starting with -- parse)."""
    name, separator, flags = text.partition("=")
    if not separator or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=FLAGS (e.g. 'bf16=--use_dn --amp')")
    return name.strip(), flags


def chosen_variants(args: argparse.Namespace) -> Dict[str, Tuple[str, ...]]:
    """``{name: main.py flags}`` of the variants to run, in order."""
    variants = dict(args.variant) if args.variant else dict(DEFAULT_VARIANTS)
    if args.only is not None:
        unknown = sorted(set(args.only) - set(variants))
        if unknown:
            raise SystemExit(f"--only {' '.join(unknown)}: no such variant; the variants are {', '.join(variants)}")
        variants = {name: flags for name, flags in variants.items() if name in args.only}
    return {name: tuple(shlex.split(flags)) for name, flags in variants.items()}


def variant_row(name: str, flags: Sequence[str], curve: dict) -> dict:
    finals = [run[-1] for run in curve["AP"]["runs"]]
    row = {"variant": name, "flags": " ".join(flags), "seeds": len(finals), "final_ap_mean": curve["AP"]["mean"][-1],
           "final_ap_std": curve["AP"]["std"][-1], "final_ap_runs": finals, "best_ap_mean": max(curve["AP"]["mean"]),
           "final_ap50_mean": curve["AP50"]["mean"][-1]}
    if "matching_instability" in curve:
        row["mean_matching_instability"] = statistics.fmean(curve["matching_instability"]["mean"])
        row["mean_matching_instability_per_object"] = statistics.fmean(
            curve["matching_instability_per_object"]["mean"])
    return row


def markdown(rows: List[dict], epochs: int) -> str:
    lines = [f"Final AP after {epochs} epochs (lr drop after {schedule(epochs)[1]}); the difference is to "
             f"{rows[0]['variant']}; IS: mean over the epochs of the matching instability per image (per object).",
             "", "| variant | flags | seeds | final AP (%) | best AP (%) | final AP50 (%) | difference | mean IS |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        spread = f" ± {100 * row['final_ap_std']:.1f}" if row["seeds"] > 1 else ""
        difference = row.get("final_ap_minus_first_variant")
        instability = (f"{row['mean_matching_instability']:.2f} ({row['mean_matching_instability_per_object']:.2f})"
                       if "mean_matching_instability" in row else "-")
        lines.append(f"| {row['variant']} | `{row['flags']}` | {row['seeds']} | "
                     f"{100 * row['final_ap_mean']:.1f}{spread} | "
                     f"{100 * row['best_ap_mean']:.1f} | {100 * row['final_ap50_mean']:.1f} | "
                     f"{'-' if difference is None else f'{100 * difference:+.1f}'} | {instability} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, extra = parse_with_main_flags(get_parser(), argv)
    variants = chosen_variants(args)
    if not variants:
        raise SystemExit("no variant to run")
    experiment = prepare_experiment(args, extra, args.runs or args.results / "runs")
    epochs, lr_drop = schedule(args.epochs)
    records: Dict[str, List[Path]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name, flags in variants.items():
            spec = RunSpec(name, flags, epochs, lr_drop, seed)
            records[name].append(ensure_run(spec, experiment))

    curves = {name: arm_curves(folders) for name, folders in records.items()}
    rows = [variant_row(name, flags, curves[name]) for name, flags in variants.items()]
    for row in rows[1:]:
        row["final_ap_minus_first_variant"] = row["final_ap_mean"] - rows[0]["final_ap_mean"]
    table = markdown(rows, epochs)
    write_report(args.results, {"ablation.json": {"epochs": epochs, "rows": rows, "arms": curves},
                                "ablation.md": table}, curves, ["AP", "matching_instability"], "ablation.png")
    print(table)


if __name__ == "__main__":
    run_script(main, "scripts/ablate.py")
