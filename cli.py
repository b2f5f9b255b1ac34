"""The command line shared by ``main.py``, ``inference.py`` and the scripts: the argument parser (the
official flag names) and the checks of flags against the chosen model."""
import argparse
import contextlib
import logging
import os

from datasets.coco import DatasetError, ImageLoadError
from models.backbone import BackboneWeightsError
from models.registry import MODELS
from util.checkpoint import CheckpointError
from util.config import ConfigError
from util.optim import ADAMW_IMPLEMENTATIONS
from util.preemption import signal_name

COCO_TRAIN_SCALES = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
# What a user can cause and fix: a missing file or folder, a checkpoint that cannot be used, a bad config file
# or dataset, ImageNet weights that cannot be fetched. Their messages name the file or flag.
USER_ERRORS = (FileNotFoundError, CheckpointError, ConfigError, DatasetError, ImageLoadError, BackboneWeightsError)
MAX_DEFAULT_WORKERS = 8


def default_num_workers() -> int:
    """Data loader workers per training process: the CPUs this process may run on, shared by the training
    processes of the node (``LOCAL_WORLD_SIZE``, set by torchrun), less one for the process itself, at most
    :data:`MAX_DEFAULT_WORKERS`."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DN-DETR", add_help=True, allow_abbrev=False)
    parser.add_argument("--config", type=str, default=None,
                        help="python config file (configs/*.py) whose variables set the defaults; "
                             "flags given on the command line override it")

    # model selection and denoising
    parser.add_argument("-m", "--modelname", type=str, default="dn_dab_detr", choices=sorted(MODELS),
                        help="; ".join(f"{name}: {entry.description}" for name, entry in sorted(MODELS.items())))
    parser.add_argument("--use_dn", action=argparse.BooleanOptionalAction, default=False,
                        help="train with denoising queries (--no-use_dn overrides a config's True)")
    parser.add_argument("--scalar", type=int, default=5, help="number of denoising groups")
    parser.add_argument("--label_noise_scale", type=float, default=0.2, help="label flip probability")
    parser.add_argument("--box_noise_scale", type=float, default=0.4, help="box noise scale lambda")
    parser.add_argument("--dn_attn_mask", action=argparse.BooleanOptionalAction, default=True,
                        help="the self-attention mask between the matching part and the denoising groups; "
                             "--no-dn_attn_mask is a research ablation that lets the matching queries see the "
                             "noised ground truth (and the groups each other)")
    parser.add_argument("--num_patterns", type=int, default=0, help="pattern embeddings (dn_dab_detr)")
    parser.add_argument("--random_refpoints_xy", action=argparse.BooleanOptionalAction, default=False,
                        help="initialise anchor x,y uniformly at random (they still train, as officially)")
    parser.add_argument("--contrastive", action="store_true",
                        help="dn_dab_dino_deformable_detr: contrastive denoising, a positive and a negative "
                             "(to be classified as no object) denoising query per ground truth and group")
    parser.add_argument("--cdn_split_per_image", action="store_true",
                        help="with --contrastive: the negatives are each image's copies of its ground truth "
                             "(default: the second half of each group, as the original; wrong for batches with "
                             "several non-empty images)")
    parser.add_argument("--use_mqs", action="store_true",
                        help="dn_dab_dino_deformable_detr: accepted for compatibility; mixed query selection is "
                             "on exactly with --two_stage")
    parser.add_argument("--use_lft", action="store_true",
                        help="dn_dab_dino_deformable_detr: accepted for compatibility; look-forward-twice is "
                             "always on")

    # optimisation
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr_backbone", type=float, default=1e-5)
    parser.add_argument("--batch_size", type=int, default=2, help="images per process")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="images per process in evaluation. Images of a batch are zero-padded to its largest "
                             "one and the CNN sees the padding, so AP depends on it (README: evaluation batch "
                             "size). Default: with --eval, a given --batch_size, else the evaluation batch size "
                             "the checkpoint's training run used; otherwise --batch_size. Recorded in the "
                             "checkpoint and in every log.txt line")
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr_drop", type=int, default=40)
    parser.add_argument("--override_resumed_lr_drop", action="store_true")
    parser.add_argument("--drop_lr_now", action="store_true", help="on resume, multiply the lr by 0.1 now")
    parser.add_argument("--adamw_impl", default="fused", choices=sorted(ADAMW_IMPLEMENTATIONS),
                        help="AdamW's implementation: fused (default; about 3x faster steps on a CPU), foreach or "
                             "for-loop (identical to each other; fused differs from them by float rounding only)")
    parser.add_argument("--save_checkpoint_interval", type=int, default=10,
                        help="besides checkpoint.pth (every epoch), keep checkpointNNNN.pth every this many epochs "
                             "and at the lr drop (with checkpointNNNN_beforedrop.pth); 0: checkpoint.pth only")
    parser.add_argument("--instability_probe", type=int, default=0, metavar="N",
                        help="after every epoch, match the first N training images (evaluation transforms) and log "
                             "the matching instability IS as train_matching_instability[_per_object] (0: off)")
    parser.add_argument("--clip_max_norm", type=float, default=0.1, help="gradient clipping max norm (0: off)")
    parser.add_argument("--accumulation_steps", type=int, default=1,
                        help="gradient accumulation: micro-batches of --batch_size per optimizer step")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                        help="keep an exponential moving average of the weights; it is what gets evaluated and "
                             "is saved as the checkpoint's ema_model")
    parser.add_argument("--ema_decay", type=float, default=0.9997, help="decay of the weight average per step")
    parser.add_argument("--ema_warmup_steps", type=int, default=2000,
                        help="the decay ramps up as decay * (1 - exp(-step / this)) (0: no warm-up)")
    parser.add_argument("--ema_weights", action=argparse.BooleanOptionalAction, default=True,
                        help="--eval, --pretrain_model_path, inference.py, export and torch.hub run a checkpoint's "
                             "ema_model when it has one (--no-ema_weights: its raw model)")

    # backbone
    parser.add_argument("--backbone", type=str, default="resnet50",
                        choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--dilation", action=argparse.BooleanOptionalAction, default=False,
                        help="DC5: dilate the last ResNet stage")
    parser.add_argument("--batch_norm_type", type=str, default="FrozenBatchNorm2d",
                        choices=["FrozenBatchNorm2d", "BatchNorm2d", "SyncBatchNorm"],
                        help="backbone normalisation (official checkpoints use FrozenBatchNorm2d)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=False,
                        help="run the backbone in channels-last memory format: faster convolutions on CPUs "
                             "(oneDNN) and tensor-core GPUs, the same arithmetic up to rounding")
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
    parser.add_argument("--checkpoint_encoder", action=argparse.BooleanOptionalAction, default=False,
                        help="activation checkpointing of the encoder layers: recompute their activations in the "
                             "backward pass instead of keeping them (less memory, more compute, same gradients)")
    parser.add_argument("--checkpoint_decoder", action=argparse.BooleanOptionalAction, default=False,
                        help="activation checkpointing of the decoder layers")
    parser.add_argument("--checkpoint_backbone", action=argparse.BooleanOptionalAction, default=False,
                        help="activation checkpointing of the trainable backbone stages, one stage at a time "
                             "(needs --batch_norm_type FrozenBatchNorm2d)")
    parser.add_argument("--two_stage", action="store_true",
                        help="dn_dab_dino_deformable_detr: matching queries selected from encoder proposals "
                             "(not supported by the other models)")
    parser.add_argument("--num_results", type=int, default=300,
                        help="detections kept per image (dn_dab_dino_deformable_detr)")

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
    parser.add_argument("--num_workers", type=int, default=default_num_workers(),
                        help="data loader worker processes per training process (0: load in the training process); "
                             f"default: the CPUs available to the process divided by the processes per node "
                             f"(LOCAL_WORLD_SIZE under torchrun), minus one, at most {MAX_DEFAULT_WORKERS}: "
                             "%(default)s here")

    # run
    parser.add_argument("--output_dir", default="", help="where to save logs and checkpoints")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="let a training run replace the checkpoint.pth that --output_dir already holds (by "
                             "default refused unless --resume names that file); without --resume the earlier "
                             "log.txt is removed, so the log holds the new run only")
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
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for training and evaluation (graphs that fail to compile "
                             "run eagerly, with a warning); the first steps take minutes to compile")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                        help="mixed precision: float16 autocast + GradScaler on CUDA, bfloat16 autocast on CPU")
    parser.add_argument("--find_unused_params", action="store_true")
    parser.add_argument("--preempt_signal", type=signal_name, default="USR1",
                        help="signal (name) on which training stops at the next step boundary and writes a "
                             "checkpoint.pth that resumes at that step (Slurm: #SBATCH --signal, see "
                             "scripts/slurm_train.sh)")

    # distributed
    parser.add_argument("--world_size", type=int, default=1)
    parser.add_argument("--dist_url", default="env://")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser


# Integer flags (or lists of them) whose values must be >= 1, and >= 0; None, where allowed, is not checked.
POSITIVE_INT_FLAGS = (
    "scalar", "batch_size", "eval_batch_size", "lr_drop", "accumulation_steps", "pe_temperatureH",
    "pe_temperatureW", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries", "num_select",
    "num_feature_levels", "enc_n_points", "dec_n_points", "num_results", "num_classes", "train_scales", "max_size",
    "val_scale", "crop_resize_scales", "crop_size", "world_size",
)
NON_NEGATIVE_INT_FLAGS = ("save_checkpoint_interval", "num_patterns", "ema_warmup_steps", "enc_layers", "num_workers",
                          "start_epoch", "instability_probe")


def check_flag_values(args: argparse.Namespace) -> None:
    """Exit with a one-line message naming the first integer flag whose value is out of range."""
    for flags, minimum in ((POSITIVE_INT_FLAGS, 1), (NON_NEGATIVE_INT_FLAGS, 0)):
        for flag in flags:
            value = getattr(args, flag)
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is not None and v < minimum for v in values):
                raise SystemExit(f"--{flag} {' '.join(map(str, values))}: must be >= {minimum}")


@contextlib.contextmanager
def exit_on_user_errors(prog: str):
    """For a command-line entry point: a ``USER_ERRORS`` exception ends the program with the one line
    ``<prog>: error: <message>`` (exit status 1); any other exception keeps its traceback."""
    try:
        yield
    except USER_ERRORS as error:
        raise SystemExit(f"{prog}: error: {error}") from None


def warn_ignored_flags(args: argparse.Namespace, logger=None) -> None:
    """Warn about every flag that the chosen model does not read but that was given another value than
    the parser default or the value the model uses instead (``ModelEntry.ignored_flags``)."""
    logger = logger or logging.getLogger(__name__)
    defaults = get_args_parser()
    for flag, used in MODELS[args.modelname].ignored_flags.items():
        value = getattr(args, flag)
        if value in (defaults.get_default(flag), used):
            continue
        instead = f"; it uses {used!r}" if used is not None else ""
        logger.warning(f"--{flag} {value!r} is ignored by {args.modelname}{instead}")
