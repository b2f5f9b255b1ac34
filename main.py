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

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from torch.utils.tensorboard import SummaryWriter

from datasets import build_dataset, get_coco_api_from_dataset
from datasets.coco_eval import COCO_STAT_NAMES
from engine import evaluate, train_one_epoch
from models import build_model
from util.checkpoint import load_checkpoint, save_checkpoint
from util.config import parse_args, save_config
from util.distributed import get_rank, init_distributed_mode, is_main_process
from util.logger import setup_logger
from util.misc import collate_fn

COCO_TRAIN_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DN-DETR", add_help=True)
    parser.add_argument("--config", type=str, default=None,
                        help="python config file (configs/*.py) whose variables set the defaults; "
                             "flags given on the command line override it")

    # model selection and denoising
    parser.add_argument("-m", "--modelname", type=str, default="dn_dab_detr",
                        choices=["dn_dab_detr", "dn_dab_deformable_detr"])
    parser.add_argument("--use_dn", action=argparse.BooleanOptionalAction, default=False,
                        help="train with denoising queries (--no-use_dn overrides a config's True)")
    parser.add_argument("--scalar", type=int, default=5, help="number of denoising groups")
    parser.add_argument("--label_noise_scale", type=float, default=0.2, help="label flip probability")
    parser.add_argument("--box_noise_scale", type=float, default=0.4, help="box noise scale lambda")
    parser.add_argument("--num_patterns", type=int, default=0, help="pattern embeddings (dn_dab_detr)")
    parser.add_argument("--random_refpoints_xy", action=argparse.BooleanOptionalAction, default=False,
                        help="initialise anchor x,y uniformly at random (they still train, as officially)")

    # optimisation
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr_backbone", type=float, default=1e-5)
    parser.add_argument("--batch_size", type=int, default=2, help="images per process")
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr_drop", type=int, default=40)
    parser.add_argument("--override_resumed_lr_drop", action="store_true")
    parser.add_argument("--drop_lr_now", action="store_true", help="on resume, multiply the lr by 0.1 now")
    parser.add_argument("--save_checkpoint_interval", type=int, default=10)
    parser.add_argument("--clip_max_norm", type=float, default=0.1, help="gradient clipping max norm (0: off)")

    # backbone
    parser.add_argument("--backbone", type=str, default="resnet50",
                        choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--dilation", action=argparse.BooleanOptionalAction, default=False,
                        help="DC5: dilate the last ResNet stage")
    parser.add_argument("--batch_norm_type", type=str, default="FrozenBatchNorm2d",
                        choices=["FrozenBatchNorm2d", "BatchNorm2d", "SyncBatchNorm"],
                        help="backbone normalisation (official checkpoints use FrozenBatchNorm2d)")
    parser.add_argument("--no_pretrained_backbone", action=argparse.BooleanOptionalAction, default=False,
                        help="do not load torchvision ImageNet weights into the backbone")
    parser.add_argument("--position_embedding", type=str, default="sine", choices=["sine", "learned"])
    parser.add_argument("--pe_temperatureH", type=int, default=20)
    parser.add_argument("--pe_temperatureW", type=int, default=20)

    # transformer
    parser.add_argument("--enc_layers", type=int, default=6)
    parser.add_argument("--dec_layers", type=int, default=6)
    parser.add_argument("--dim_feedforward", type=int, default=2048)
    parser.add_argument("--hidden_dim", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--nheads", type=int, default=8)
    parser.add_argument("--num_queries", type=int, default=300)
    parser.add_argument("--pre_norm", action=argparse.BooleanOptionalAction, default=False,
                        help="dn_dab_detr: add a final encoder LayerNorm (the official meaning of the flag)")
    parser.add_argument("--transformer_activation", type=str, default="prelu",
                        choices=["relu", "gelu", "prelu", "selu"])
    parser.add_argument("--num_select", type=int, default=300, help="detections kept per image (dn_dab_detr)")
    parser.add_argument("--num_feature_levels", type=int, default=4, help="dn_dab_deformable_detr")
    parser.add_argument("--enc_n_points", type=int, default=4, help="dn_dab_deformable_detr")
    parser.add_argument("--dec_n_points", type=int, default=4, help="dn_dab_deformable_detr")
    parser.add_argument("--two_stage", action="store_true",
                        help="not supported (the official release does not support it either)")

    # matcher and losses
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="disable the auxiliary decoding losses")
    parser.add_argument("--set_cost_class", type=float, default=2)
    parser.add_argument("--set_cost_bbox", type=float, default=5)
    parser.add_argument("--set_cost_giou", type=float, default=2)
    parser.add_argument("--cls_loss_coef", type=float, default=1)
    parser.add_argument("--bbox_loss_coef", type=float, default=5)
    parser.add_argument("--giou_loss_coef", type=float, default=2)
    parser.add_argument("--focal_alpha", type=float, default=0.25)

    # data
    parser.add_argument("--dataset_file", type=str, default="coco", choices=["coco"])
    parser.add_argument("--coco_path", type=str, default=None, help="COCO-format folder")
    parser.add_argument("--num_classes", type=int, default=None,
                        help="classification logits (default: max category id + 1 of the dataset, 91 for COCO)")
    parser.add_argument("--train_scales", type=int, nargs="+", default=COCO_TRAIN_SCALES,
                        help="training short-side sizes")
    parser.add_argument("--max_size", type=int, default=1333, help="long-side cap of the resize")
    parser.add_argument("--val_scale", type=int, default=800, help="evaluation short-side size")
    parser.add_argument("--crop_resize_scales", type=int, nargs="+", default=[400, 500, 600],
                        help="short-side sizes before the random crop")
    parser.add_argument("--crop_size", type=int, nargs=2, default=[384, 600], metavar=("MIN", "MAX"),
                        help="random crop side range")
    parser.add_argument("--num_workers", type=int, default=10)

    # run
    parser.add_argument("--output_dir", default="", help="where to save logs and checkpoints")
    parser.add_argument("--device", default=None, help="cuda, cpu, mps (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--resume", default="", help="checkpoint to resume from (or evaluate with --eval)")
    parser.add_argument("--pretrain_model_path", default=None, help="load model weights only (non-strict)")
    parser.add_argument("--finetune_ignore", type=str, nargs="+", default=None,
                        help="with --pretrain_model_path: drop weights whose name contains any of these")
    parser.add_argument("--start_epoch", type=int, default=0)
    parser.add_argument("--eval", action="store_true", help="evaluate only")
    parser.add_argument("--save_results", action="store_true", help="write detections as COCO results JSON")
    parser.add_argument("--debug", action="store_true", help="run a few iterations per epoch only")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                        help="mixed precision: float16 autocast + GradScaler on CUDA, bfloat16 autocast on CPU")
    parser.add_argument("--find_unused_params", action="store_true")

    # distributed
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--dist_url", default="env://")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser


# Flags that define the network and the image size it was trained for; a checkpoint's recorded values
# fill in the ones not given explicitly.
CHECKPOINT_FLAGS = (
    "modelname", "num_classes", "backbone", "dilation", "batch_norm_type", "position_embedding", "pe_temperatureH",
    "pe_temperatureW", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries",
    "pre_norm", "transformer_activation", "num_patterns", "num_feature_levels", "enc_n_points", "dec_n_points",
    "val_scale", "max_size",
)


def adopt_checkpoint_model_args(args: argparse.Namespace, checkpoint_args, logger) -> None:
    """Take the ``CHECKPOINT_FLAGS`` a checkpoint was trained with where neither the command line nor a
    config set them (they still hold the parser default), so ``--eval --resume CKPT`` rebuilds that
    network and feeds it images of the size it was trained for."""
    if not checkpoint_args:
        return
    defaults = get_args_parser()
    for flag in CHECKPOINT_FLAGS:
        if flag not in checkpoint_args or getattr(args, flag) != defaults.get_default(flag):
            continue
        recorded = checkpoint_args[flag]
        if recorded != getattr(args, flag):
            logger.warning(f"--{flag} {recorded!r} taken from the checkpoint (default {getattr(args, flag)!r})")
            setattr(args, flag, recorded)


def set_num_classes(args: argparse.Namespace, dataset) -> None:
    """``--num_classes`` defaults to the dataset's largest category id + 1 (91 for COCO); a smaller
    explicit value could not represent every label."""
    max_id = max(dataset.coco.getCatIds())
    if args.num_classes is None:
        args.num_classes = max_id + 1
    elif args.num_classes <= max_id:
        raise SystemExit(f"--num_classes {args.num_classes} is too small for {args.coco_path}: its category ids "
                         f"go up to {max_id}, so at least {max_id + 1} classification logits are needed")


def resolve_device(name):
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SystemExit(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def main(args: argparse.Namespace) -> None:
    init_distributed_mode(args)
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
    logger = setup_logger(output_dir, distributed_rank=get_rank(), name="dn_detr")
    logger.info("Command: " + " ".join(sys.argv))
    device = resolve_device(args.device)

    checkpoint = load_checkpoint(args.resume) if args.resume else None
    if checkpoint is not None:
        adopt_checkpoint_model_args(args, checkpoint.get("args"), logger)
        # The checkpoint replaces every weight: skip the ImageNet download.
        args.no_pretrained_backbone = True
    dataset_val = build_dataset("val", args)
    dataset_train = None if args.eval else build_dataset("train", args)
    set_num_classes(args, dataset_val if dataset_train is None else dataset_train)
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
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    logger.info(f"{args.modelname}: {n_parameters:,} trainable parameters, denoising {'on' if args.use_dn else 'off'}")

    # Two groups in named_parameters() order: the official optimizer state is positional (spec §7.2).
    named = [(n, p) for n, p in model_without_ddp.named_parameters() if p.requires_grad]
    param_groups = [
        {"params": [p for n, p in named if "backbone" not in n], "lr": args.lr},
        {"params": [p for n, p in named if "backbone" in n], "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    scaler = torch.amp.GradScaler(device.type) if args.amp and device.type == "cuda" else None

    sampler_val = (DistributedSampler(dataset_val, shuffle=False) if args.distributed
                   else SequentialSampler(dataset_val))
    loader_kwargs = {"collate_fn": collate_fn, "num_workers": args.num_workers, "pin_memory": device.type == "cuda"}
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False, **loader_kwargs)
    base_ds = get_coco_api_from_dataset(dataset_val)
    debug_iters = 10 if args.debug else None

    if args.pretrain_model_path:
        load_pretrained_weights(model_without_ddp, args.pretrain_model_path, args.finetune_ignore, logger)
    if checkpoint is not None:
        restore_checkpoint(checkpoint, args, model_without_ddp, optimizer, lr_scheduler, scaler, logger)

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
                  "epoch": checkpoint.get("epoch") if checkpoint else None, "n_parameters": n_parameters})
        logger.info(f"AP {test_stats['coco_eval_bbox'][0]:.4f}")
        return

    sampler_train = (DistributedSampler(dataset_train) if args.distributed else RandomSampler(dataset_train))
    batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
    if len(batch_sampler_train) == 0:
        raise SystemExit(f"--batch_size {args.batch_size} is larger than the {len(dataset_train)} training images "
                         "of this process: no full batch to train on")
    data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train, **loader_kwargs)

    logger.info(f"Start training: epochs {args.start_epoch}..{args.epochs - 1}")
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        epoch_start = time.time()
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch,
                                      args.clip_max_norm, scaler=scaler, amp=args.amp, max_iters=debug_iters,
                                      logger=logger)
        lr_drop_epoch = (epoch + 1) % args.lr_drop == 0
        if lr_drop_epoch and output_dir is not None and is_main_process():
            state = checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args)
            save_checkpoint(state, output_dir / f"checkpoint{epoch:04}_beforedrop.pth")
        lr_scheduler.step()
        if output_dir is not None and is_main_process():
            state = checkpoint_state(model_without_ddp, optimizer, lr_scheduler, scaler, epoch, args)
            save_checkpoint(state, output_dir / "checkpoint.pth")
            if lr_drop_epoch or (epoch + 1) % args.save_checkpoint_interval == 0:
                save_checkpoint(state, output_dir / f"checkpoint{epoch:04}.pth")

        results_file = output_dir / "results" / f"epoch{epoch:04}.json" if args.save_results and output_dir else None
        test_stats, _ = evaluate(model, criterion, postprocessors, data_loader_val, base_ds, device, amp=args.amp,
                                 max_iters=debug_iters, results_file=results_file, logger=logger)
        epoch_time = time.time() - epoch_start
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch, "n_parameters": n_parameters, "epoch_time": epoch_time}
        log_line(log_stats)
        if writer is not None:
            for name, value in train_stats.items():
                writer.add_scalar(f"train/{name}", value, epoch)
            for name, value in zip(COCO_STAT_NAMES, test_stats["coco_eval_bbox"]):
                writer.add_scalar(f"test/{name}", value, epoch)
            writer.add_scalar("test/loss", test_stats["loss"], epoch)
            writer.flush()
        logger.info(f"Epoch {epoch} done in {epoch_time:.1f}s: AP {test_stats['coco_eval_bbox'][0]:.4f}")

    if writer is not None:
        writer.close()
    logger.info(f"Training time {time.strftime('%H:%M:%S', time.gmtime(time.time() - start_time))}")


def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, args: argparse.Namespace) -> dict:
    """The DETR checkpoint layout (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``) + AMP scaler."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args).copy()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def strip_ddp_prefix(state_dict: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def load_pretrained_weights(model, path: str, ignore_keywords, logger) -> None:
    """Weights only, non-strict: entries whose name contains an ``--finetune_ignore`` keyword are dropped."""
    state = strip_ddp_prefix(load_checkpoint(path)["model"])
    if ignore_keywords:
        dropped = [k for k in state if any(word in k for word in ignore_keywords)]
        state = {k: v for k, v in state.items() if k not in dropped}
        logger.info(f"--finetune_ignore dropped {len(dropped)} entries: {dropped}")
    result = model.load_state_dict(state, strict=False)
    logger.info(f"Loaded {path}: missing {result.missing_keys}, unexpected {result.unexpected_keys}")


def restore_checkpoint(checkpoint: dict, args, model, optimizer, lr_scheduler, scaler, logger) -> None:
    """``--resume``: the model strictly; in training also optimizer, scheduler, scaler and the epoch."""
    model.load_state_dict(strip_ddp_prefix(checkpoint["model"]), strict=True)
    logger.info(f"Resumed model weights from {args.resume}")
    if args.eval or not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        return
    optimizer.load_state_dict(checkpoint["optimizer"])
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    if args.override_resumed_lr_drop:
        logger.warning("--override_resumed_lr_drop: the lr schedule follows --lr_drop and the current --lr flags")
        lr_scheduler.step_size = args.lr_drop
        lr_scheduler.base_lrs = [args.lr, args.lr_backbone]
        for group, base_lr in zip(optimizer.param_groups, lr_scheduler.base_lrs):
            group["lr"] = base_lr * lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
    args.start_epoch = checkpoint["epoch"] + 1
    if args.drop_lr_now:
        for group in optimizer.param_groups:
            group["lr"] *= 0.1
        lr_scheduler.base_lrs = [lr * 0.1 for lr in lr_scheduler.base_lrs]
    logger.info(f"Resuming training at epoch {args.start_epoch}, lr {[g['lr'] for g in optimizer.param_groups]}")


if __name__ == "__main__":
    main(parse_args(get_args_parser(), sys.argv[1:]))
