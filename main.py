"""DN-DETR training and evaluation entry point.

    python main.py -m dn_dab_detr --use_dn --coco_path /data/coco --output_dir logs/dn_r50
    python main.py --config configs/dn_dab_detr_r50.py --coco_path /data/coco --eval --resume ckpt.pth
    torchrun --nproc_per_node=8 main.py --config configs/dn_dab_detr_r50.py --coco_path /data/coco ...
"""
import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, SequentialSampler, Subset
from torch.utils.tensorboard import SummaryWriter

from cli import check_flag_values, exit_on_user_errors, get_args_parser, warn_ignored_flags
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import COCO_STAT_NAMES
from engine import evaluate, probe_matching, train_one_epoch
from models import build_model
from models.builder import adopt_state_dict_flags, resolve_num_classes
from util.checkpoint import (CheckpointError, adopt_checkpoint_model_args, args_to_dict, check_checkpoint_file,
                             checkpoint_state, finished_epochs, is_url, load_checkpoint, load_pretrained_weights,
                             remove_temp_files, restore_checkpoint, save_checkpoint, strip_ddp_prefix)
from util.compile import compile_model
from util.config import given_flags, parse_args, save_config
from util.device import resolve_device
from util.distributed import all_gather, get_rank, get_world_size, init_distributed_mode, is_main_process
from util.ema import ModelEMA
from util.logger import setup_logger
from util.matching_instability import matching_instability
from util.misc import collate_fn
from util.optim import build_lr_scheduler, build_optimizer
from util.preemption import StopOnSignal, merge_train_stats, preserved_rng_state, rng_state, set_rng_state

__all__ = ["get_args_parser", "main"]  # the parser lives in cli.py; main.py re-exports it (the DETR convention)


def main(args: argparse.Namespace) -> None:
    check_flag_values(args)
    if args.eval and not (args.resume or args.pretrain_model_path):
        raise SystemExit("--eval needs trained weights: give --resume CHECKPOINT or --pretrain_model_path FILE")
    check_output_dir(args)
    init_distributed_mode(args)
    output_dir = prepare_output_dir(args)
    logger = setup_logger(output_dir, distributed_rank=get_rank(), name="dn_detr")
    logger.info("Command: " + " ".join(sys.argv))
    device = resolve_device(args.device)

    checkpoint = load_resumed_checkpoint(args, logger)
    resolve_eval_batch_size(args, checkpoint, logger)
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    dataset = dataset_val if dataset_train is None else dataset_train
    try:
        resolve_num_classes(args, dataset_max_category_id=max(dataset.coco.getCatIds()))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    warn_ignored_flags(args, logger)
    if output_dir is not None and is_main_process():
        save_config(args, output_dir / "config.json")
    logger.info("Settings: " + json.dumps(vars(args), sort_keys=True, default=str))

    seed = args.seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    criterion.to(device)
    model_without_ddp = model
    if args.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                          find_unused_parameters=args.find_unused_params)
        model_without_ddp = model.module
    if args.compile:
        model = compile_model(model, logger)  # forward passes only: checkpoints hold model_without_ddp
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    logger.info(f"{args.modelname}: {n_parameters:,} trainable parameters, denoising {'on' if args.use_dn else 'off'}")

    optimizer = build_optimizer(model_without_ddp, args)
    lr_scheduler = build_lr_scheduler(optimizer, args)
    scaler = torch.amp.GradScaler(device.type) if args.amp and device.type == "cuda" else None

    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else SequentialSampler(dataset_val))
    loader_kwargs = {"collate_fn": collate_fn, "num_workers": args.num_workers, "pin_memory": device.type == "cuda"}
    # Its own generator: evaluating draws nothing from the global random stream, which training continues.
    data_loader_val = DataLoader(dataset_val, args.eval_batch_size, sampler=sampler_val, drop_last=False,
                                 generator=torch.Generator(), **loader_kwargs)
    base_ds = get_coco_api_from_dataset(dataset_val)
    debug_iters = 10 if args.debug else None

    try:
        if args.pretrain_model_path:
            load_pretrained_weights(model_without_ddp, args.pretrain_model_path, args.finetune_ignore, logger,
                                    model_without_ddp.class_dependent_keys(), args.ema_weights)
        if checkpoint is not None:
            restore_checkpoint(checkpoint, args, model_without_ddp, optimizer, lr_scheduler, scaler, logger)
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    ema = start_ema(args, model_without_ddp, checkpoint, logger)
    # With --use_ema the weight average is what gets evaluated and reported.
    evaluated_model = model if ema is None else ema.module

    writer = SummaryWriter(str(output_dir / "tensorboard")) if output_dir is not None and is_main_process() else None

    def log_line(stats: dict) -> None:
        if output_dir is not None and is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(stats) + "\n")

    if args.eval:
        results_file = output_dir / "results" / "eval.json" if args.save_results and output_dir else None
        test_stats, _ = evaluate(model, criterion, postprocessors, data_loader_val, base_ds, device, amp=args.amp,
                                 max_iters=debug_iters, results_file=results_file, logger=logger)
        log_line({**{f"test_{k}": v for k, v in test_stats.items()},
                  "epoch": checkpoint.get("epoch") if checkpoint else None, "n_parameters": n_parameters,
                  "eval_batch_size": args.eval_batch_size})
        logger.info(f"AP {test_stats['coco_eval_bbox'][0]:.4f}")
        return

    if output_dir is not None and is_main_process():
        for path in remove_temp_files(output_dir):
            logger.info(f"Removed {path}, left by an interrupted checkpoint write")
    stop_request = StopOnSignal(args.preempt_signal)

    # The batch order and the loader's seed depend on --seed, the rank and the epoch only, so that a resumed
    # epoch continues with the batches it had not trained yet.
    sampler_train = DistributedSampler(dataset_train, num_replicas=get_world_size(), rank=get_rank(), seed=args.seed)
    batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(dataset_train)} training images "
                         "of this process: no full batch to train on")
    num_batches = len(batch_sampler_train) if debug_iters is None else min(len(batch_sampler_train), debug_iters)
    loader_generator = torch.Generator()

    def train_loader(epoch: int, start_step: int) -> DataLoader:
        sampler_train.set_epoch(epoch)
        loader_generator.manual_seed(int(np.random.SeedSequence([args.seed, get_rank(), epoch]).generate_state(1)[0]))
        batches = batch_sampler_train if start_step == 0 else list(batch_sampler_train)[start_step:]
        return DataLoader(dataset_train, batch_sampler=batches, generator=loader_generator, **loader_kwargs)

    # --instability_probe: the matching of the probe images after the last trained epoch (before the first
    # epoch: the initial model's), against which the next epoch's instability is measured.
    probe_loader = build_probe_loader(args, loader_kwargs) if args.instability_probe else None
    probe_assignment = None if checkpoint is None else checkpoint.get("matching_probe_assignment")

    def probe():
        """The probe's matching; every random stream is left as it was (the resize of the evaluation transforms
        draws from Python's), so that measuring leaves training unchanged."""
        with preserved_rng_state(device):
            return probe_matching(model_without_ddp, criterion.matcher, probe_loader, device, args.amp)

    if probe_loader is not None and probe_assignment is None and checkpoint is None and args.start_epoch == 0:
        probe_assignment, _ = probe()

    def save_state(epoch: int, file_names, **progress) -> None:
        """The checkpoint of the last trained ``epoch`` with every process's random streams and ``progress``."""
        rng_states = all_gather(rng_state(device))
        if output_dir is None or not is_main_process():
            return
        state = {**checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args, ema),
                 "rng_states": rng_states, **progress}
        if probe_assignment is not None:
            state["matching_probe_assignment"] = probe_assignment
        for file_name in file_names:
            save_checkpoint(state, output_dir / file_name)

    def epoch_logged(epoch: int) -> bool:
        """Whether log.txt has ``epoch``'s training line (read by the main process, which writes it)."""
        return all_gather(is_main_process() and epoch in logged_training_epochs(output_dir))[0]

    def evaluate_and_log(epoch: int, train_stats: dict, train_time: float) -> None:
        eval_start = time.time()
        results_file = output_dir / "results" / f"epoch{epoch:04}.json" if args.save_results and output_dir else None
        # Training continues the same whether this epoch is evaluated now or (after a stop) on resume.
        with preserved_rng_state(device):
            test_stats, _ = evaluate(evaluated_model, criterion, postprocessors, data_loader_val, base_ds, device,
                                     amp=args.amp, max_iters=debug_iters, results_file=results_file, logger=logger)
        epoch_time = train_time + time.time() - eval_start
        log_line({**{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()},
                  "epoch": epoch, "n_parameters": n_parameters, "epoch_time": epoch_time,
                  "eval_batch_size": args.eval_batch_size})
        if writer is not None:
            for name, value in train_stats.items():
                writer.add_scalar(f"train/{name}", value, epoch)
            for name, value in zip(COCO_STAT_NAMES, test_stats["coco_eval_bbox"]):
                writer.add_scalar(f"test/{name}", value, epoch)
            writer.add_scalar("test/loss", test_stats["loss"], epoch)
            writer.flush()
        evaluated = "" if ema is None else " (EMA weights)"
        logger.info(f"Epoch {epoch} done in {epoch_time:.1f}s: AP{evaluated} {test_stats['coco_eval_bbox'][0]:.4f}")

    # checkpoint.pth is written after an epoch's training (with its train_stats) and before its evaluation,
    # or when a signal stops the run inside an epoch (epoch_in_progress: its batches done and their stats).
    start_step, partial = 0, None
    if checkpoint is not None:
        restore_rng_states(checkpoint, device, logger)
        if "train_stats" in checkpoint and not epoch_logged(checkpoint["epoch"]):
            logger.info(f"Epoch {checkpoint['epoch']} was trained but not evaluated: evaluating it first")
            evaluate_and_log(checkpoint["epoch"], checkpoint["train_stats"], checkpoint["train_time"])
        partial = checkpoint.get("epoch_in_progress")
        if partial is not None and (partial["epoch"], partial["num_batches"]) == (args.start_epoch, num_batches):
            start_step = partial["step"]
            logger.info(f"Resuming epoch {args.start_epoch} at batch {start_step}/{num_batches}")
        elif partial is not None:
            logger.warning(f"The checkpoint stopped in epoch {partial['epoch']} after batch {partial['step']}/"
                           f"{partial['num_batches']}; this run starts epoch {args.start_epoch} with its first batch")

    logger.info(f"Start training: epochs {args.start_epoch}..{args.epochs - 1}, {len(batch_sampler_train)} batches "
                f"of {args.batch_size} per epoch and process, {args.accumulation_steps} per optimizer step")
    stopped = f"Stopped by SIG{args.preempt_signal}"
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if stop_request.requested():
            logger.info(f"{stopped} before epoch {epoch}")
            break
        epoch_start = time.time()
        train_stats = train_one_epoch(model, criterion, train_loader(epoch, start_step), optimizer, device, epoch,
                                      args.clip_max_norm, scaler=scaler, amp=args.amp, max_iters=debug_iters,
                                      logger=logger, accumulation_steps=args.accumulation_steps, ema=ema,
                                      start_step=start_step, stop=stop_request)
        train_time = time.time() - epoch_start
        batches_done = min(start_step + train_stats["optimizer_steps"] * args.accumulation_steps, num_batches)
        if start_step > 0:
            train_stats = merge_train_stats(partial["train_stats"], start_step, train_stats, batches_done - start_step)
            train_time += partial["train_time"]
        if stop_request.stopped and batches_done < num_batches:
            save_state(epoch - 1, ["checkpoint.pth"], epoch_in_progress={
                "epoch": epoch, "step": batches_done, "num_batches": num_batches, "train_stats": train_stats,
                "train_time": train_time})
            logger.info(f"{stopped} in epoch {epoch} after batch {batches_done}/{num_batches}")
            break
        start_step = 0
        if probe_loader is not None:
            assignment, num_objects = probe()
            if probe_assignment is not None:
                train_stats.update(matching_instability(probe_assignment, assignment, num_objects))
            probe_assignment = assignment
        progress = {"train_stats": train_stats, "train_time": train_time}
        lr_drop_epoch = (epoch + 1) % args.lr_drop == 0
        keep_copies = args.save_checkpoint_interval > 0  # 0: checkpoint.pth only
        if lr_drop_epoch and keep_copies:
            save_state(epoch, [f"checkpoint{epoch:04}_beforedrop.pth"], **progress)
        lr_scheduler.step()
        interval_epoch = keep_copies and (lr_drop_epoch or (epoch + 1) % args.save_checkpoint_interval == 0)
        save_state(epoch, ["checkpoint.pth"] + ([f"checkpoint{epoch:04}.pth"] if interval_epoch else []), **progress)
        if stop_request.requested():
            logger.info(f"{stopped} after training epoch {epoch}; it is evaluated when the run resumes")
            break
        evaluate_and_log(epoch, train_stats, train_time)

    if writer is not None:
        writer.close()
    logger.info(f"Training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start_time))}")


def build_probe_loader(args: argparse.Namespace, loader_kwargs: dict) -> DataLoader:
    """The first ``--instability_probe`` training images, with the evaluation transforms (the same input every
    epoch), in a fixed order; its own generator leaves the training random stream untouched."""
    dataset = build_dataset("train", args, transforms_of="val")
    if args.instability_probe > len(dataset):
        raise SystemExit(f"--instability_probe {args.instability_probe} exceeds the {len(dataset)} training images "
                         f"of {args.coco_path}")
    return DataLoader(Subset(dataset, range(args.instability_probe)), args.eval_batch_size, shuffle=False,
                      generator=torch.Generator(), **loader_kwargs)


def check_output_dir(args: argparse.Namespace) -> None:
    """Refuse a training run that would replace the ``checkpoint.pth`` of an earlier run in ``--output_dir``
    (and append to its ``log.txt``): it must resume that file or be given ``--overwrite_output_dir``."""
    if args.eval or not args.output_dir or args.overwrite_output_dir:
        return
    existing = Path(args.output_dir) / "checkpoint.pth"
    if not existing.exists() or (args.resume and not is_url(args.resume)
                                 and Path(args.resume).resolve() == existing.resolve()):
        return
    run = f"resuming {args.resume}" if args.resume else "a new run"
    raise SystemExit(f"--output_dir {args.output_dir} already holds {existing}, which {run} would replace: pass "
                     f"--resume {existing} to continue that run, or --overwrite_output_dir to overwrite it")


def prepare_output_dir(args: argparse.Namespace) -> Optional[Path]:
    """``--output_dir`` created; a training run started over with ``--overwrite_output_dir`` (no ``--resume``)
    removes the earlier run's ``log.txt`` so that the log holds this run only."""
    if not args.output_dir:
        return None
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite_output_dir and not (args.resume or args.eval) and is_main_process():
        (output_dir / "log.txt").unlink(missing_ok=True)
    return output_dir


def resolve_eval_batch_size(args: argparse.Namespace, checkpoint: Optional[dict], logger) -> None:
    """Set ``args.eval_batch_size`` when not given: with ``--eval`` a given ``--batch_size`` (the original
    authors' evaluation command passes ``--batch_size 1``), else what the checkpoint's training run evaluated
    with (its ``eval_batch_size``, or its ``batch_size`` for checkpoints that predate the flag), else
    ``--batch_size``. The AP of a checkpoint is reproduced only at the batch size it was measured with."""
    if args.eval_batch_size is not None:
        return
    recorded = args_to_dict((checkpoint or {}).get("args") or {})
    if args.eval and "batch_size" in given_flags(args, get_args_parser()):
        args.eval_batch_size, source = args.batch_size, "--batch_size"
    elif recorded.get("eval_batch_size") is not None:
        args.eval_batch_size, source = recorded["eval_batch_size"], f"the evaluations of {args.resume}"
    elif "batch_size" in recorded:
        args.eval_batch_size, source = recorded["batch_size"], f"the training batch size of {args.resume}"
    else:
        args.eval_batch_size, source = args.batch_size, "--batch_size"
    logger.info(f"Evaluation batch size {args.eval_batch_size} (from {source})")


def load_resumed_checkpoint(args: argparse.Namespace, logger) -> Optional[dict]:
    """The ``--resume`` checkpoint (None without one), with the network flags it records or reveals taken where
    not given; a training run must have epochs left. ``--pretrain_model_path`` is checked to be a checkpoint
    file too, before any work. A file that cannot be used exits with a message naming it."""
    try:
        if args.pretrain_model_path and not is_url(args.pretrain_model_path):
            check_checkpoint_file(args.pretrain_model_path)
        checkpoint = load_checkpoint(args.resume) if args.resume else None
        check_epochs_left(args, checkpoint)
        if checkpoint is not None:
            defaults = get_args_parser()
            adopt_checkpoint_model_args(args, checkpoint.get("args"), defaults, args.resume, logger)
            if "model" in checkpoint:
                adopt_state_dict_flags(args, strip_ddp_prefix(checkpoint["model"]), defaults, args.resume, logger)
            # The checkpoint replaces every weight: skip the ImageNet download.
            args.no_pretrained_backbone = True
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    return checkpoint


def check_epochs_left(args: argparse.Namespace, checkpoint: Optional[dict]) -> None:
    """A training run must have epochs to train: ``--epochs`` beyond the epochs the resumed checkpoint
    finished, else beyond ``--start_epoch``; or the checkpoint's last epoch still to evaluate (a run that
    stopped between its training and its log line)."""
    finished = None if checkpoint is None else finished_epochs(checkpoint)
    if args.eval or args.epochs > (args.start_epoch if finished is None else finished):
        return
    if finished is None:
        raise SystemExit(f"--epochs {args.epochs} leaves nothing to train (--start_epoch {args.start_epoch})")
    output_dir = Path(args.output_dir) if args.output_dir else None
    if "train_stats" in checkpoint and checkpoint["epoch"] not in logged_training_epochs(output_dir):
        return  # its last epoch was trained but not evaluated: the run evaluates it
    raise SystemExit(f"{args.resume} already finished epoch {finished - 1} ({finished} epochs), so --epochs "
                     f"{args.epochs} leaves nothing to train: pass --epochs greater than {finished} to continue it")


def logged_training_epochs(output_dir: Optional[Path]) -> set:
    """The epochs that ``output_dir/log.txt`` has a training line for (none without the file)."""
    log_file = output_dir / "log.txt" if output_dir is not None else None
    if log_file is None or not log_file.exists():
        return set()
    entries = map(json.loads, log_file.read_text().splitlines())
    return {entry.get("epoch") for entry in entries if "train_loss" in entry}


def restore_rng_states(checkpoint: dict, device: torch.device, logger) -> None:
    """Continue the random streams saved in a resumed checkpoint (exact resume), if it has this process's."""
    states = checkpoint.get("rng_states")
    if states is None:
        return
    if len(states) != get_world_size():
        logger.warning(f"The checkpoint holds the random streams of {len(states)} processes, this run has "
                       f"{get_world_size()}: they start afresh")
        return
    set_rng_state(states[get_rank()], device)


def start_ema(args: argparse.Namespace, model: torch.nn.Module, checkpoint: Optional[dict], logger) -> Optional[ModelEMA]:
    """``--use_ema`` in training: the weight average, restored from a resumed checkpoint that has one,
    else started from the current weights."""
    if not args.use_ema or args.eval:
        return None
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup_steps)
    if checkpoint is not None and "ema_model" in checkpoint:
        ema.load_state_dict(checkpoint)
        logger.info(f"Resumed the weight average (ema_model, {ema.updates} updates) from {args.resume}")
    else:
        logger.info(f"Weight average (EMA) started from the current weights, decay {args.ema_decay}, warm-up "
                    f"{args.ema_warmup_steps} steps")
    return ema


if __name__ == "__main__":
    with exit_on_user_errors("main.py"):
        main(parse_args(get_args_parser(), sys.argv[1:]))
