"""Seeded training runs shared by the experiment scripts (``convergence.py``, ``ablate.py``).

A run is ``main.py`` with the experiment's shared flags, its own flags, a schedule (epochs, lr drop) and a
seed. It trains in ``WORK/<run key>`` (checkpoints: resumed after an interruption) and, once finished, its
``log.txt`` and a ``run.json`` of its settings are copied to ``RESULTS/<run key>/``: the small, committed
record. A run whose record is complete is never retrained, even on a machine without its checkpoints,
so an experiment can be finished over several sessions. A record made with other settings is an error
(never mixed into a table).
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from datasets.synthetic import generate_synthetic_coco  # noqa: E402
from main import logged_training_epochs  # noqa: E402
from plot_curves import field_value, plot_bands, read_log  # noqa: E402  (scripts/ is this module's folder)

# What the experiment tables report per epoch: COCO AP numbers and the matching instability (train_* keys).
EPOCH_FIELDS = ("AP", "AP50", "matching_instability", "matching_instability_per_object")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The working folder, shared settings and data options of every experiment script."""
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "convergence",
                        help="working folder: the generated data and every run's checkpoints")
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthetic_convergence.py"),
                        help="main.py settings shared by every run (each run sets --use_dn, schedule and seed)")
    parser.add_argument("--data", type=Path, default=None,
                        help="COCO-format folder (default: generate one in --out, per data setting)")
    parser.add_argument("--preset", default="easy", help="synthetic set difficulty when generating")
    parser.add_argument("--class_colours", action=argparse.BooleanOptionalAction, default=True,
                        help="paint each class in its own colour when generating (a cue besides the shape)")
    parser.add_argument("--num_train", type=int, default=200)
    parser.add_argument("--num_val", type=int, default=50)
    parser.add_argument("--data_seed", type=int, default=0)


def parse_with_main_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """``(args, flags after --)``: the script's arguments, and the main.py flags every run gets."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    return parser.parse_args(argv[:split]), argv[split + 1:]


@dataclass(frozen=True)
class Experiment:
    """What the runs of an experiment share."""

    flags: Tuple[str, ...]  # main.py flags of every run (--config and the flags after --)
    data: Path  # the COCO-format folder
    dataset: dict  # how the data was made (recorded with every run): generator settings, or the --data folder
    work_dir: Path  # every run's output folder (checkpoints) lives here
    records_dir: Path  # the finished runs' records


def prepare_experiment(args: argparse.Namespace, main_flags: Sequence[str], records_dir: Path) -> Experiment:
    """The shared settings of a script's runs; the synthetic set is generated once in ``--out/data_...`` (a
    folder per generator setting) unless ``--data`` is given."""
    args.out.mkdir(parents=True, exist_ok=True)
    flags = ("--config", args.config, *main_flags)
    if args.data is not None:
        return Experiment(flags, args.data, {"folder": project_relative(str(args.data.resolve()))}, args.out,
                          records_dir)
    settings = {"num_train": args.num_train, "num_val": args.num_val, "seed": args.data_seed, "preset": args.preset,
                "class_colours": args.class_colours}
    # One folder per generator setting: changing a data option never reuses data made with another.
    colours = "colours" if args.class_colours else "no_colours"
    data = args.out / f"data_{args.preset}_{colours}_{args.num_train}x{args.num_val}_seed{args.data_seed}"
    if not (data / "annotations" / "instances_val2017.json").exists():
        generate_synthetic_coco(data, **settings)
    return Experiment(flags, data, {"synthetic": settings}, args.out, records_dir)


class ExperimentError(RuntimeError):
    """A run cannot be used as asked (settings that differ from its record, a failed training)."""


@dataclass(frozen=True)
class RunSpec:
    arm: str  # the experiment arm (e.g. dn_half); runs of one arm differ in their seed only
    flags: Tuple[str, ...]  # main.py flags of the arm
    epochs: int
    lr_drop: int
    seed: int

    @property
    def key(self) -> str:
        return f"{self.arm}_seed{self.seed}"


def schedule(epochs: int) -> Tuple[int, int]:
    """``(epochs, lr_drop)``: ``epochs`` with the lr dropped once, after 80% of them (rounded)."""
    return epochs, max(round(0.8 * epochs), 1)


def project_relative(flag: str) -> str:
    """``flag`` written relative to the project if it is a path inside it (for the committed records)."""
    path = Path(flag)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else flag


def run_settings(spec: RunSpec, experiment: Experiment) -> dict:
    """What makes a run what it is (where its data and outputs lie aside)."""
    return {"arm": spec.arm, "seed": spec.seed, "epochs": spec.epochs, "lr_drop": spec.lr_drop,
            "flags": [project_relative(flag) for flag in (*experiment.flags, *spec.flags)], "data": experiment.dataset}


def logged_epochs(folder: Path) -> List[int]:
    """Epochs with a training line in ``folder/log.txt`` (none without the file)."""
    return sorted(logged_training_epochs(folder))


def recorded_run(spec: RunSpec, experiment: Experiment) -> Optional[Path]:
    """The finished record of ``spec`` (its folder), or None if there is none yet."""
    record = experiment.records_dir / spec.key
    if not (record / "run.json").exists():
        return None
    recorded = json.loads((record / "run.json").read_text())
    wanted = run_settings(spec, experiment)
    if recorded != wanted:
        raise ExperimentError(f"{record / 'run.json'} records run {spec.key} with other settings: {recorded} "
                              f"instead of {wanted}; remove that folder to rerun it, or use another results folder")
    if logged_epochs(record) != list(range(spec.epochs)):
        raise ExperimentError(f"{record / 'log.txt'} does not hold epochs 0..{spec.epochs - 1} of run {spec.key}")
    return record


def ensure_run(spec: RunSpec, experiment: Experiment) -> Path:
    """The record folder of ``spec``: trained (or resumed) first if it is not complete."""
    record = recorded_run(spec, experiment)
    if record is not None:
        print(f"[experiment] {spec.key}: finished ({record}), not retrained", flush=True)
        return record
    run_dir = experiment.work_dir / spec.key
    settings = run_settings(spec, experiment)
    command = [sys.executable, str(ROOT / "main.py"), *experiment.flags, *spec.flags, "--coco_path",
               str(experiment.data), "--output_dir", str(run_dir), "--seed", str(spec.seed),
               "--epochs", str(spec.epochs), "--lr_drop", str(spec.lr_drop)]
    checkpoint, started = run_dir / "checkpoint.pth", run_dir / "run.json"
    if checkpoint.exists():
        begun = json.loads(started.read_text()) if started.exists() else "not recorded"
        if begun != settings:
            raise ExperimentError(f"{run_dir} holds an unfinished run {spec.key} started with other settings "
                                  f"({begun}) instead of {settings}; remove that folder to start the run over, or "
                                  "use another --out")
        if logged_epochs(run_dir) == list(range(spec.epochs)):
            command = None  # trained and logged; only the record is missing
        else:
            command += ["--resume", str(checkpoint)]
    else:
        command += ["--overwrite_output_dir"]  # a folder without a checkpoint holds nothing to keep
        run_dir.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps(settings, indent=2) + "\n")  # resumed only with these settings
    if command is not None:
        print(f"[experiment] {spec.key}: {' '.join(command)}", flush=True)
        start = time.time()
        if subprocess.run(command, cwd=ROOT).returncode != 0:
            raise ExperimentError(f"run {spec.key} failed (its log: {run_dir / 'log.txt'}); rerun the script to "
                                  "resume it")
        print(f"[experiment] {spec.key}: trained in {time.time() - start:.0f} s", flush=True)
    record = experiment.records_dir / spec.key
    record.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "log.txt", record / "log.txt")
    (record / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    return record


def arm_curves(records: Sequence[Path], fields: Sequence[str] = EPOCH_FIELDS) -> dict:
    """Per-epoch values of the runs of one arm (``records``: their folders, one per seed): for each field,
    ``runs`` (one list per run), and ``mean`` and ``std`` (sample standard deviation; 0 for one run)
    over the runs, for the epochs that every run logs."""
    logs = [read_log(record / "log.txt") for record in records]
    epochs = sorted(set.intersection(*(set(log) for log in logs)))
    curves: Dict[str, dict] = {"epochs": epochs}
    for field in fields:
        runs = [[field_value(log[epoch], field) for epoch in epochs] for log in logs]
        if any(value is None for run in runs for value in run):
            continue  # a field that not every run logs at every epoch (IS of a run without the probe)
        per_epoch = list(zip(*runs))
        curves[field] = {"runs": runs, "mean": [statistics.fmean(values) for values in per_epoch],
                         "std": [statistics.stdev(values) if len(values) > 1 else 0.0 for values in per_epoch]}
    return curves


def write_report(results_dir: Path, files: Dict[str, object], curves: Dict[str, dict], fields: Sequence[str],
                 figure: str) -> None:
    """Write ``files`` (name -> text, or data saved as JSON) and the ``figure`` of ``curves`` (one subplot per
    field that some arm has) into ``results_dir``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=1) + "\n"
        (results_dir / name).write_text(text)
    plot_bands(curves, [f for f in fields if any(f in curve for curve in curves.values())], results_dir / figure)
    print(f"[experiment] wrote {results_dir}/: {', '.join([*files, figure])}", flush=True)


def run_script(main: Callable[[], None], prog: str) -> None:
    """Run an experiment script's ``main``; an :class:`ExperimentError` ends it with a one-line message."""
    try:
        main()
    except ExperimentError as error:
        raise SystemExit(f"{prog}: error: {error}") from None
