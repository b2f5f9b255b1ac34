"""Plot training curves of one or more runs from their ``log.txt`` (one JSON line per epoch, main.py).

    python scripts/plot_curves.py outputs/dn_run outputs/baseline_run --out curves.png
    python scripts/plot_curves.py outputs/*/ --out curves.png --fields AP AP50 loss tgt_loss_bbox
    python scripts/plot_curves.py outputs/dn_run outputs/baseline_run --table
    python scripts/plot_curves.py --merged docs/results/convergence/epochs.json --out curves.png \
        --fields AP matching_instability

Each argument is a run folder (its ``log.txt`` is read) or a log file. Fields: the COCO numbers
``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl`` (from ``test_coco_eval_bbox``, plotted in percent),
a training term by its name (``loss``, ``tgt_loss_bbox`` -> ``train_<name>``), or any log key as written
(``test_loss``, ``epoch_time``). Logged loss terms are weighted by their coefficients; ``<name>_unscaled``
(e.g. ``tgt_loss_bbox_unscaled``) is the raw term. One subplot per field, one line per run, the legend
names the run folders.
``--table`` prints a markdown table of a COCO number (``--table_metric``, default AP, in percent) per
epoch and run. When an epoch appears in several lines (an ``--eval`` line, a restarted run), its later
lines' values win.
``--merged`` plots the per-epoch JSON of an experiment script (``convergence.py``, ``ablate.py``): one line
per arm, its mean over the seeds with a band of plus or minus one standard deviation.
"""
import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datasets.coco_eval import COCO_STAT_NAMES  # noqa: E402
from util.visualization import palette_color  # noqa: E402

COCO_STATS_KEY = "test_coco_eval_bbox"
DEFAULT_FIELDS = ["AP", "AP50", "loss"]
SUBPLOT_SIZE_INCHES = (5.0, 3.5)
MAX_COLUMNS = 3
DPI = 100


class LogError(ValueError):
    """A log is missing or unusable; the message names the file."""


class Run:
    """One run's epochs: ``records[epoch]`` is the merged dict of that epoch's log lines."""

    def __init__(self, name: str, log_file: Path, records: Dict[int, dict]):
        self.name = name
        self.log_file = log_file
        self.records = records

    @property
    def epochs(self) -> List[int]:
        return sorted(self.records)

    def values(self, field: str) -> Dict[int, float]:
        """``{epoch: value}`` of ``field`` for the epochs that log it."""
        return {epoch: value for epoch in self.epochs
                if (value := field_value(self.records[epoch], field)) is not None}


def field_value(record: dict, field: str) -> Optional[float]:
    """A COCO number (fraction), ``train_<field>`` or the key ``field`` itself, or None if the line lacks it."""
    if field in COCO_STAT_NAMES:
        stats = record.get(COCO_STATS_KEY)
        return float(stats[COCO_STAT_NAMES.index(field)]) if isinstance(stats, list) and len(stats) == 12 else None
    for key in (f"train_{field}", field):
        if isinstance(record.get(key), (int, float)):
            return float(record[key])
    return None


def resolve_log_file(path: Path) -> Path:
    log_file = path / "log.txt" if path.is_dir() else path
    if not log_file.is_file():
        where = f"run folder {path} has no log.txt" if path.is_dir() else f"log file {path} does not exist"
        raise LogError(f"{where} (main.py writes <output_dir>/log.txt after each epoch)")
    return log_file


def read_log(log_file: Path) -> Dict[int, dict]:
    """Epoch records of a log; an unparsable last line (a run writing it right now) is ignored."""
    lines = log_file.read_text().splitlines()
    records: Dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                print(f"warning: {log_file}: ignoring the incomplete last line {number}", file=sys.stderr)
                continue
            raise LogError(f"{log_file}, line {number}: not a JSON line ({error})") from error
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, int):
            records.setdefault(epoch, {}).update(record)
    if not records:
        raise LogError(f"{log_file} has no epoch records (lines with an integer 'epoch'): has the run finished "
                       "an epoch yet?")
    return records


def run_names(paths: Sequence[Path]) -> List[str]:
    """Run folder names (a log file's parent folder); the paths as given where those names repeat."""
    names = [(p if p.is_dir() else p.parent).resolve().name or str(p) for p in paths]
    counts = Counter(names)
    return [str(p) if counts[name] > 1 else name for p, name in zip(paths, names)]


def load_runs(paths: Sequence[str]) -> List[Run]:
    paths = [Path(p) for p in paths]
    log_files = [resolve_log_file(p) for p in paths]
    return [Run(name, log_file, read_log(log_file)) for name, log_file in zip(run_names(paths), log_files)]


def figure_grid(num_fields: int):
    columns = min(num_fields, MAX_COLUMNS)
    rows = math.ceil(num_fields / columns)
    return rows, columns


def plot_grid(fields: Sequence[str], out: Path, draw: Callable[[plt.Axes, str], None]) -> None:
    """One subplot per field, ``draw(ax, field)`` filling it (lines with labels, title); saved at a fixed size:
    ``columns * SUBPLOT_SIZE_INCHES[0] * DPI`` by ``rows * SUBPLOT_SIZE_INCHES[1] * DPI`` pixels."""
    rows, columns = figure_grid(len(fields))
    figure, axes = plt.subplots(rows, columns, squeeze=False, dpi=DPI,
                                figsize=(columns * SUBPLOT_SIZE_INCHES[0], rows * SUBPLOT_SIZE_INCHES[1]))
    for ax, field in zip(axes.flat, fields):
        draw(ax, field)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.flat[len(fields):]:
        ax.set_visible(False)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    plt.close(figure)


def plot_runs(runs: Sequence[Run], fields: Sequence[str], out: Path) -> None:
    """One subplot per field (COCO numbers in percent), one line per run (see :func:`plot_grid`)."""
    for field in fields:
        if not any(run.values(field) for run in runs):
            available = sorted(set().union(*(r.records[r.epochs[-1]] for r in runs)))
            raise LogError(f"--fields {field}: no run logs it; COCO fields are {' '.join(COCO_STAT_NAMES)}, "
                           f"log keys of the last epochs: {' '.join(available)}")

    def draw(ax, field: str) -> None:
        percent = field in COCO_STAT_NAMES
        for index, run in enumerate(runs):
            values = run.values(field)
            if not values:
                continue
            ys = [100 * v if percent else v for v in values.values()]
            ax.plot(list(values), ys, marker="o" if len(values) < 30 else None, markersize=3,
                    color=[c / 255 for c in palette_color(index)], label=run.name)
        ax.set_title(f"{field} (%)" if percent else field)

    plot_grid(fields, out, draw)


def plot_bands(arms: Dict[str, dict], fields: Sequence[str], out: Path) -> None:
    """Like :func:`plot_runs` for the per-epoch means of experiment arms: ``arms[name]`` holds ``epochs`` and,
    per field, ``mean`` and ``std`` lists (as ``scripts/experiment.py`` merges them); each arm is drawn as its
    mean with a band of one standard deviation. Arms without a field are left out of its subplot."""
    for field in fields:
        if not any(field in arm for arm in arms.values()):
            raise LogError(f"--fields {field}: no arm has it (arm fields: "
                           f"{' '.join(sorted(set().union(*arms.values()) - {'epochs'}))})")

    def draw(ax, field: str) -> None:
        scale = 100 if field in COCO_STAT_NAMES else 1
        for index, (name, arm) in enumerate(arms.items()):
            if field not in arm:
                continue
            color = [c / 255 for c in palette_color(index)]
            mean = [scale * v for v in arm[field]["mean"]]
            std = [scale * v for v in arm[field]["std"]]
            runs = len(arm[field].get("runs", [])) or 1
            ax.plot(arm["epochs"], mean, color=color, label=f"{name} (n={runs})",
                    marker="o" if len(mean) < 30 else None, markersize=3)
            ax.fill_between(arm["epochs"], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, linewidth=0)
        ax.set_title(f"{field} (%), mean ± std" if scale == 100 else f"{field}, mean ± std")

    plot_grid(fields, out, draw)


def markdown_table(runs: Sequence[Run], metric: str = "AP") -> str:
    """``| epoch | run1 | run2 |`` rows of ``metric`` in percent with one decimal; ``-`` where a run lacks it."""
    values = [run.values(metric) for run in runs]
    epochs = sorted(set().union(*values))
    lines = [f"| epoch | {' | '.join(run.name for run in runs)} |", "|---" * (len(runs) + 1) + "|"]
    for epoch in epochs:
        cells = [f"{100 * v[epoch]:.1f}" if epoch in v else "-" for v in values]
        lines.append(f"| {epoch} | {' | '.join(cells)} |")
    return f"{metric} (%) per epoch\n\n" + "\n".join(lines)


def read_merged(path: Path) -> Dict[str, dict]:
    """The ``arms`` of an experiment's per-epoch JSON."""
    try:
        arms = json.loads(path.read_text())["arms"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise LogError(f"{path}: not an experiment's per-epoch JSON with an 'arms' entry ({error})") from None
    return arms


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("scripts/plot_curves.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR_OR_LOG", help="run folders or log.txt files")
    parser.add_argument("--merged", type=Path, default=None,
                        help="per-epoch JSON of an experiment script (its 'arms'): plot seed means with bands")
    parser.add_argument("--out", type=Path, default=None, help="PNG file to write the curves to")
    parser.add_argument("--fields", nargs="+", default=DEFAULT_FIELDS, help="what to plot, one subplot each")
    parser.add_argument("--table", action="store_true", help="print a markdown table of --table_metric per epoch")
    parser.add_argument("--table_metric", default="AP", choices=COCO_STAT_NAMES)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.merged is not None:
        if args.runs or args.table or args.out is None:
            parser.error("--merged plots an experiment's JSON: give --out FILE.png, and no run folders or --table")
        try:
            plot_bands(read_merged(args.merged), args.fields, args.out)
        except LogError as error:
            raise SystemExit(f"plot_curves.py: error: {error}") from None
        print(f"wrote {args.out}")
        return
    if not args.runs:
        parser.error("give run folders or log files (or --merged FILE)")
    if args.out is None and not args.table:
        parser.error("nothing to do: give --out FILE.png and/or --table")
    try:
        runs = load_runs(args.runs)
        if args.out is not None:
            plot_runs(runs, args.fields, args.out)
            print(f"wrote {args.out}")
    except LogError as error:
        raise SystemExit(f"plot_curves.py: error: {error}") from None
    if args.table:
        print(markdown_table(runs, args.table_metric))


if __name__ == "__main__":
    main()
