"""Crash-safe checkpoint writing and safe checkpoint reading.

Writing (:func:`save_checkpoint`): the file is written under a temporary name in the target folder,
flushed and fsync'ed, then renamed onto the final name (``os.replace`` is atomic on POSIX and Windows),
so a crash or ``kill -9`` at any moment leaves either the previous complete file or the new complete
file, plus at worst the temporary file, which :func:`remove_temp_files` deletes when the next run starts.
``args`` is stored as a plain dict, loadable without unpickling any class.

Reading (:func:`load_checkpoint`): ``torch.load(weights_only=True)``, i.e. no code from the file is ever
imported or run. Besides tensors, numbers, strings and containers, the only class allowed is
``argparse.Namespace``: the official DN-DETR checkpoints (``model``, ``optimizer``, ``lr_scheduler``,
``epoch``, ``args``) pickle their ``args`` as one. A file that needs anything else is refused with
:class:`UnsafeCheckpointError`. Runs with ``--use_ema`` add ``ema_model`` (a state dict laid out like
``model``) and ``ema_updates`` (an int), which need nothing beyond that.
"""
import argparse
import os
import pickle
import re
import secrets
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from util.config import given_flags
from util.optim import use_adamw_impl

# Classes a legitimate DN-DETR checkpoint may contain beyond what weights_only allows by default.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace]

PathLike = Union[str, os.PathLike]
ZIP_MAGIC = b"PK\x03\x04"  # the start of a torch.save file; the legacy format is a pickle, starting with PROTO

# The names of temp_path_for: .<target name>.<pid>.<8 hex digits>.tmp
TEMP_NAME = re.compile(r"\..+\.\d+\.[0-9a-f]{8}\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint could not be used; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint needs classes or functions outside the allow-list; it was not loaded."""

    def __init__(self, path: PathLike, offending_globals: List[str]):
        self.path = Path(path)
        self.offending_globals = offending_globals
        super().__init__(
            f"Refused to load checkpoint {path}: it references {', '.join(offending_globals)}, which loading "
            f"would import and call. Only tensors, numbers, strings, containers and argparse.Namespace are "
            f"allowed in a DN-DETR checkpoint, so the file was refused for security; nothing in it was executed. "
            f"If you trust its origin, convert it once in a separate session: torch.load it with "
            f"weights_only=False and re-save only its state dicts with util.checkpoint.save_checkpoint.")


class CorruptCheckpointError(CheckpointError):
    """The file is not a readable PyTorch checkpoint (truncated, corrupt or not a checkpoint at all)."""


def _plain(value: Any) -> Any:
    """``value`` made of built-in types only: containers kept, numpy/torch scalars unwrapped, anything
    else (paths, devices, ...) turned into its string."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    return str(value)


def args_to_dict(args: Union[argparse.Namespace, Mapping[str, Any]]) -> dict:
    """Run settings (a Namespace as the official code saves them, or a dict) as a plain dict."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, Mapping):
        raise TypeError(f"args: expected an argparse.Namespace or a dict, got {type(args).__name__}")
    return {str(k): _plain(v) for k, v in args.items()}


def temp_path_for(path: Path) -> Path:
    """A new temporary name in ``path``'s folder for writing ``path`` (matches ``TEMP_NAME``)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> None:
    """Write ``state`` to ``path`` atomically (see module doc); ``state["args"]`` is saved as a plain dict."""
    path = Path(path)
    state = dict(state)
    if state.get("args") is not None:
        state["args"] = args_to_dict(state["args"])
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = temp_path_for(path)
    try:
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def remove_temp_files(directory: PathLike) -> List[Path]:
    """Delete the temporary files of checkpoint writes into ``directory`` that were interrupted (``kill -9``);
    call it only while nothing writes checkpoints there. Returns the deleted files."""
    removed = [path for path in Path(directory).iterdir() if TEMP_NAME.fullmatch(path.name) and path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_url(path_or_url: PathLike) -> bool:
    return str(path_or_url).startswith(("https://", "http://"))


def download_checkpoint(url: str, download_dir: Optional[PathLike] = None, progress: bool = True) -> Path:
    """Download ``url`` once into ``download_dir`` (default ``<torch hub dir>/checkpoints``); returns the file."""
    file_name = os.path.basename(urlparse(url).path)
    if not file_name:
        raise CheckpointError(f"{url}: the URL does not end with a file name")
    download_dir = Path(download_dir) if download_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    cached = download_dir / file_name
    if not cached.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=progress)
        except (URLError, OSError) as error:
            raise CheckpointError(f"cannot download checkpoint {url}: {error}") from error
    return cached


def _offending_globals(path: Path, error: Exception) -> List[str]:
    """Names of the classes/functions the file needs that are not allowed (empty if that is not the problem)."""
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # legacy (non-zip) format or unreadable: fall back to the loader's message
        found = []
    return sorted(set(found)) or re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def check_checkpoint_file(path: PathLike) -> None:
    """Fail fast, naming ``path``, where it cannot be a checkpoint: missing (FileNotFoundError), not a file
    (:class:`CheckpointError`), empty or neither a zip archive nor a pickle (:class:`CorruptCheckpointError`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with path.open("rb") as f:
        start = f.read(len(ZIP_MAGIC))
    if not start:
        raise CorruptCheckpointError(f"{path} is not a PyTorch checkpoint (empty file)")
    if start != ZIP_MAGIC and start[:1] != pickle.PROTO:
        raise CorruptCheckpointError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle, the "
                                     f"formats torch.save writes; it starts with {start!r})")


def load_checkpoint(path_or_url: PathLike, map_location: Any = "cpu", download_dir: Optional[PathLike] = None) -> dict:
    """Load a checkpoint dict from a file or an http(s) URL without executing anything from it.

    ``args``, when present, is returned as a plain dict (official files hold a Namespace).

    Raises:
        FileNotFoundError: the path does not exist (it is never silently skipped).
        UnsafeCheckpointError: the file needs a class or function outside the allow-list.
        CorruptCheckpointError: the file is empty, truncated, corrupt or not a checkpoint dict.
        CheckpointError: the URL could not be downloaded.
    """
    path = download_checkpoint(str(path_or_url), download_dir) if is_url(path_or_url) else Path(path_or_url)
    check_checkpoint_file(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as error:
        offending = _offending_globals(path, error)
        if offending:
            raise UnsafeCheckpointError(path, offending) from None
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read (corrupt or not a PyTorch checkpoint): "
                                     f"{error}") from error
    except Exception as error:
        raise CorruptCheckpointError(f"checkpoint {path} cannot be read (truncated or corrupt?): "
                                     f"{type(error).__name__}: {error}") from error
    if not isinstance(checkpoint, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict "
                                     "(model, optimizer, lr_scheduler, epoch, args)")
    if checkpoint.get("args") is not None:
        checkpoint["args"] = args_to_dict(checkpoint["args"])
    return checkpoint


# Flags that define the network and the image size it was trained for; a checkpoint's recorded values
# fill in the ones not given explicitly.
CHECKPOINT_FLAGS = (
    "modelname", "num_classes", "backbone", "dilation", "batch_norm_type", "position_embedding", "pe_temperatureH",
    "pe_temperatureW", "enc_layers", "dec_layers", "dim_feedforward", "hidden_dim", "nheads", "num_queries",
    "pre_norm", "transformer_activation", "num_patterns", "num_feature_levels", "enc_n_points", "dec_n_points",
    "two_stage", "num_results", "val_scale", "max_size",
)
# The ones a given flag may not contradict: the network's architecture. The class count is checked against the
# checkpoint's tensors instead (``models.builder.adopt_state_dict_flags``); image sizes and the number of
# detections kept may differ from the training run.
ARCHITECTURE_FLAGS = tuple(flag for flag in CHECKPOINT_FLAGS
                           if flag not in ("num_classes", "num_results", "val_scale", "max_size"))


def adopt_checkpoint_model_args(args: argparse.Namespace, checkpoint_args: Optional[Mapping[str, Any]],
                                defaults: argparse.ArgumentParser, source: PathLike, logger) -> None:
    """Take the ``CHECKPOINT_FLAGS`` a checkpoint was trained with where neither the command line nor a
    config gave them (:func:`util.config.given_flags`; ``defaults`` is the parser), so ``--eval --resume CKPT``
    rebuilds that network and feeds it images of the size it was trained for. A given flag of the
    ``ARCHITECTURE_FLAGS`` with another value than the recorded one is a :class:`CheckpointError` naming
    both values and ``source`` (the checkpoint file)."""
    if not checkpoint_args:
        return
    given = given_flags(args, defaults)
    for flag in CHECKPOINT_FLAGS:
        if flag not in checkpoint_args or checkpoint_args[flag] == getattr(args, flag):
            continue
        recorded, value = checkpoint_args[flag], getattr(args, flag)
        if flag not in given:
            logger.warning(f"--{flag} {recorded!r} taken from the checkpoint {source} (the default is {value!r})")
            setattr(args, flag, recorded)
        elif flag in ARCHITECTURE_FLAGS:
            raise CheckpointError(f"{source}: --{flag} {value!r} contradicts the checkpoint, which was trained with "
                                  f"--{flag} {recorded!r}; drop the flag or give {recorded!r}")


def checkpoint_state(model, optimizer, lr_scheduler, scaler, epoch: int, args: argparse.Namespace,
                     ema=None) -> dict:
    """The DETR checkpoint layout (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``args``) + AMP scaler
    + the weight average (``ema_model``, ``ema_updates``) of a ``--use_ema`` run."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args).copy()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state.update(ema.state_dict())
    return state


def strip_ddp_prefix(state_dict: dict) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def model_weights(checkpoint: Mapping[str, Any], source: PathLike, ema_weights: bool = True) -> Tuple[dict, str]:
    """The state dict to run a checkpoint with, and its key: ``ema_model`` (the weight average of a
    ``--use_ema`` run) when there is one and ``ema_weights``, else ``model``; DDP prefixes removed."""
    key = "ema_model" if ema_weights and "ema_model" in checkpoint else "model"
    if key not in checkpoint:
        raise CheckpointError(f"checkpoint {source} has no 'model' entry (keys: {sorted(checkpoint)})")
    return strip_ddp_prefix(checkpoint[key]), key


LISTED_KEYS = 3  # entries named in a message about weights that do not fit; the rest are counted


def _first_keys(entries: Sequence[str]) -> str:
    more = f" and {len(entries) - LISTED_KEYS} more" if len(entries) > LISTED_KEYS else ""
    return ", ".join(entries[:LISTED_KEYS]) + more


def _shape_changes(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], keys) -> str:
    return _first_keys([f"{k} {tuple(state[k].shape)} (network: {tuple(expected[k].shape)})" for k in keys])


def load_weights_strictly(model, state: Mapping[str, torch.Tensor], source: PathLike) -> None:
    """``model.load_state_dict(state, strict=True)``; weights that do not fit are a :class:`CheckpointError`
    naming ``source`` and the first missing, unexpected and mis-shaped entries."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{name}: {entries}" for name, entries in (
            ("different shapes", _shape_changes(state, expected, reshaped)), ("missing", _first_keys(missing)),
            ("unexpected", _first_keys(unexpected))) if entries]
        raise CheckpointError(f"checkpoint {source} does not fit the network built from the flags (give the flags "
                              f"or --config it was trained with); " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def load_pretrained_weights(model, path: PathLike, ignore_keywords, logger, class_keys: Sequence[str] = (),
                            ema_weights: bool = True) -> None:
    """``--pretrain_model_path``: weights only (the EMA weights when the file has them and ``ema_weights``),
    non-strict. Entries whose name contains an ``--finetune_ignore`` keyword are dropped. Entries of
    ``class_keys`` (the network's class-dependent tensors) whose shape differs, i.e. a checkpoint trained for
    another number of classes, keep the network's fresh initialisation, listed in one log line; any other
    shape difference is a :class:`CheckpointError` naming the file and the entries."""
    state, key = model_weights(load_checkpoint(path), path, ema_weights)
    if ignore_keywords:
        dropped = [k for k in state if any(word in k for word in ignore_keywords)]
        state = {k: v for k, v in state.items() if k not in dropped}
        logger.info(f"--finetune_ignore dropped {len(dropped)} entries: {dropped}")
    expected = model.state_dict()
    reshaped = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    architecture = [k for k in reshaped if k not in class_keys]
    if architecture:
        raise CheckpointError(f"--pretrain_model_path {path} does not fit the network built from the flags: "
                              f"{_shape_changes(state, expected, architecture)}; give the network flags (or "
                              f"--config) it was trained with, or drop these entries with --finetune_ignore")
    if reshaped:
        logger.info(f"Class count differs from {path}: re-initialised {_shape_changes(state, expected, reshaped)}")
        state = {k: v for k, v in state.items() if k not in reshaped}
    result = model.load_state_dict(state, strict=False)
    logger.info(f"Loaded {path} ({key}): missing {result.missing_keys}, unexpected {result.unexpected_keys}")


def finished_epochs(checkpoint: Mapping[str, Any]) -> Optional[int]:
    """How many epochs the training run of a checkpoint finished (its ``epoch`` + 1); None for a checkpoint
    without the training state (``optimizer``, ``lr_scheduler``, ``epoch``) that --resume continues."""
    if not all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
        return None
    return checkpoint["epoch"] + 1


def restore_checkpoint(checkpoint: dict, args: argparse.Namespace, model, optimizer, lr_scheduler, scaler, logger) -> None:
    """``--resume``: the model strictly (with ``--eval`` the EMA weights when the checkpoint has them, unless
    ``--no-ema_weights``); in training also optimizer, scheduler, scaler and the epoch."""
    state, key = model_weights(checkpoint, args.resume, ema_weights=args.eval and args.ema_weights)
    load_weights_strictly(model, state, args.resume)
    logger.info(f"Resumed model weights from {args.resume} ({key})")
    if args.eval or finished_epochs(checkpoint) is None:
        return
    try:
        optimizer.load_state_dict(checkpoint["optimizer"])
    except ValueError as error:
        raise CheckpointError(f"checkpoint {args.resume}: its optimizer state does not fit the trained parameters "
                              f"of this network ({error})") from None
    use_adamw_impl(optimizer, args.adamw_impl)
    lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if scaler is not None and "scaler" in checkpoint:
        scaler.load_state_dict(checkpoint["scaler"])
    if args.override_resumed_lr_drop:
        logger.warning("--override_resumed_lr_drop: the lr schedule follows --lr_drop and the current --lr flags")
        lr_scheduler.step_size = args.lr_drop
        lr_scheduler.base_lrs = [args.lr, args.lr_backbone]
        for group, base_lr in zip(optimizer.param_groups, lr_scheduler.base_lrs):
            group["lr"] = base_lr * lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
    args.start_epoch = finished_epochs(checkpoint)
    if args.drop_lr_now:
        for group in optimizer.param_groups:
            group["lr"] *= 0.1
        lr_scheduler.base_lrs = [lr * 0.1 for lr in lr_scheduler.base_lrs]
    logger.info(f"Resuming training at epoch {args.start_epoch}, lr {[g['lr'] for g in optimizer.param_groups]}")
