"""One training epoch, one COCO evaluation pass and the matching probe of the instability measure."""
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from datasets.coco_eval import CocoEvaluator
from models.matcher import NonFinitePredictionError
from util.compile import unwrap_compiled
from util.distributed import is_main_process, reduce_dict
from util.ema import ModelEMA
from util.matching_instability import assignment_from_matches
from util.metric_logger import MetricLogger, SmoothedValue


# Meters of the progress lines and of the "Averaged stats" line: the weighted total loss, the final decoder
# layer's main terms and their denoising counterparts. The returned stats (log.txt, TensorBoard) have every meter.
TRAIN_PROGRESS_METERS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "tgt_loss_ce", "tgt_loss_bbox", "tgt_loss_giou",
                         "lr")
EVAL_PROGRESS_METERS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error")


def progress_logger() -> MetricLogger:
    """A metric logger whose progress lines show the smoothed (median) value of each loss term, and also the
    epoch average of the total ``loss``."""
    metric_logger = MetricLogger(delimiter="  ", meter_fmt="{median:.4f}")
    metric_logger.add_meter("loss", SmoothedValue(fmt="{median:.4f} ({global_avg:.4f})"))
    return metric_logger


class NonFiniteLossError(RuntimeError):
    """The training loss or the predictions became NaN or infinite; the run stops before the weights are
    (further) corrupted."""


def autocast(device: torch.device, enabled: bool):
    """Mixed precision context: float16 on CUDA, bfloat16 elsewhere; a no-op when disabled."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_targets(targets, device: torch.device):
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def weighted_loss(loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]) -> torch.Tensor:
    return sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)


def backward(losses: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    """Backward pass of the weighted loss, scaled by the AMP ``scaler`` when there is one."""
    if scaler is not None:
        scaler.scale(losses).backward()
    else:
        losses.backward()


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_norm: float,
                  scaler: Optional[torch.amp.GradScaler]) -> None:
    """Gradient clipping at ``max_norm`` (0: off) on unscaled gradients, then the optimizer step (through the
    AMP ``scaler``, which skips steps with non-finite gradients, when there is one)."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def _log_losses(metric_logger: MetricLogger, loss_dict: Dict[str, torch.Tensor], weight_dict: Dict[str, float]):
    """Log the weighted total, every weighted term and every raw term (``*_unscaled``), averaged across processes."""
    reduced = reduce_dict(loss_dict)
    scaled = {k: v * weight_dict[k] for k, v in reduced.items() if k in weight_dict}
    unscaled = {f"{k}_unscaled": v for k, v in reduced.items()}
    total = sum(scaled.values())
    metric_logger.update(loss=total, **scaled, **unscaled)
    if "class_error" in reduced:
        metric_logger.update(class_error=reduced["class_error"])
    return total, scaled, unscaled


def last_loss_terms(metric_logger: MetricLogger, step: int) -> str:
    """The raw loss terms logged at the previous step of the epoch (the last finite one), for error messages."""
    if step == 0:
        return "no earlier step in this epoch"
    suffix = "_unscaled"
    terms = {k[:-len(suffix)]: round(m.value, 4) for k, m in metric_logger.meters.items() if k.endswith(suffix)}
    return f"loss terms of step {step - 1}: {terms}"


def compute_losses(criterion: torch.nn.Module, outputs, targets, epoch: int, step: int,
                   metric_logger: MetricLogger) -> Dict[str, torch.Tensor]:
    """The criterion's loss dict; non-finite predictions, which the matcher finds on its host copy of the
    costs, raise :class:`NonFiniteLossError` like a non-finite loss does."""
    try:
        return criterion(outputs, targets)
    except NonFinitePredictionError as error:
        raise NonFiniteLossError(f"predictions are not finite at epoch {epoch}, step {step}: {error}; "
                                 f"{last_loss_terms(metric_logger, step)}") from error


def gradient_sync(model: torch.nn.Module, synchronise: bool):
    """Context of a micro-batch's forward and backward: under DDP, gradients are all-reduced only when
    ``synchronise`` (the last micro-batch before an optimizer step); the others accumulate locally."""
    model = unwrap_compiled(model)
    if synchronise or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int, max_norm: float = 0,
                    scaler: Optional[torch.amp.GradScaler] = None, amp: bool = False, max_iters: Optional[int] = None,
                    print_freq: int = 10, logger=None, accumulation_steps: int = 1,
                    ema: Optional[ModelEMA] = None, start_step: int = 0,
                    stop: Optional[Callable[[], bool]] = None) -> Dict[str, float]:
    """Train for one epoch; returns the epoch averages of every logged meter and ``optimizer_steps``.

    Every ``accumulation_steps`` batches (micro-batches) of ``data_loader`` make one optimizer step: each
    one's loss is divided by the number of micro-batches of its step, so the accumulated gradient is their
    mean; a last, incomplete group steps with what it has. ``ema`` is updated after every optimizer step.

    A resumed epoch passes ``start_step``, the number of batches already trained, and a ``data_loader`` of the
    remaining batches. ``stop`` is called after every optimizer step; True ends the epoch there (pre-emption).

    Raises :class:`NonFiniteLossError` naming the epoch, step and loss terms if the loss (averaged
    over processes, so every process stops together) is not finite, or if the predictions to be matched
    are not finite (then with the terms of the previous step). Under DDP the latter is raised by each
    process whose own predictions are not finite, before the step's collectives; a diverged model has
    non-finite weights, identical in every process, so all of them raise it, and a launcher like torchrun
    also ends the remaining processes of a run when one fails.
    """
    model.train()
    criterion.train()
    metric_logger = progress_logger()
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    header = f"Epoch: [{epoch}]"
    num_batches = start_step + len(data_loader)
    num_batches = num_batches if max_iters is None else min(num_batches, max_iters)
    optimizer_steps = 0
    progress = metric_logger.log_every(data_loader, print_freq, header, logger=logger, meters=TRAIN_PROGRESS_METERS)
    for step, (samples, targets) in enumerate(progress, start=start_step):
        group_start = step - step % accumulation_steps
        group_size = min(accumulation_steps, num_batches - group_start)
        last_of_group = step == group_start + group_size - 1
        samples = samples.to(device, non_blocking=True)
        targets = move_targets(targets, device)
        with gradient_sync(model, last_of_group):
            with autocast(device, amp):
                outputs = model(samples, targets)
                loss_dict = compute_losses(criterion, outputs, targets, epoch, step, metric_logger)
            losses = weighted_loss(loss_dict, criterion.weight_dict)

            total, scaled, unscaled = _log_losses(metric_logger, loss_dict, criterion.weight_dict)
            if not math.isfinite(total.item()):
                terms = {k: round(v.item(), 4) for k, v in unscaled.items()}
                raise NonFiniteLossError(f"loss is {total.item()} at epoch {epoch}, step {step}; loss terms: {terms}")

            if step == group_start:
                optimizer.zero_grad(set_to_none=True)
            backward(losses / group_size, scaler)
        if last_of_group:
            clip_and_step(model, optimizer, max_norm, scaler)
            optimizer_steps += 1
            if ema is not None:
                ema.update(model)
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if max_iters is not None and step + 1 >= max_iters:  # --debug: a few iterations only
            break
        if last_of_group and stop is not None and stop():
            break

    metric_logger.synchronize_between_processes()
    if logger is not None:
        logger.info(f"Averaged stats: {metric_logger.format_averages(TRAIN_PROGRESS_METERS)}")
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["optimizer_steps"] = optimizer_steps
    return stats


@torch.no_grad()
def evaluate(model: torch.nn.Module, criterion: torch.nn.Module, postprocessors: Dict, data_loader: Iterable,
             base_ds, device: torch.device, amp: bool = False, max_iters: Optional[int] = None,
             results_file: Optional[Path] = None, print_freq: int = 10, logger=None):
    """COCO bbox evaluation; returns (stats, evaluator) where ``stats["coco_eval_bbox"]`` holds the 12
    COCO numbers. With ``results_file`` the detections are written there as a COCO results JSON."""
    model.eval()
    criterion.eval()
    metric_logger = progress_logger()
    metric_logger.add_meter("class_error", SmoothedValue(window_size=1, fmt="{value:.2f}"))
    coco_evaluator = CocoEvaluator(base_ds, ("bbox",))
    progress = metric_logger.log_every(data_loader, print_freq, "Test:", logger=logger, meters=EVAL_PROGRESS_METERS)
    for step, (samples, targets) in enumerate(progress):
        samples = samples.to(device, non_blocking=True)
        targets = move_targets(targets, device)
        with autocast(device, amp):
            outputs = model(samples)
            loss_dict = criterion(outputs, targets)
        _log_losses(metric_logger, loss_dict, criterion.weight_dict)
        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        coco_evaluator.update({int(t["image_id"].item()): r for t, r in zip(targets, results)})
        if max_iters is not None and step + 1 >= max_iters:
            break

    metric_logger.synchronize_between_processes()
    if logger is not None:
        logger.info(f"Averaged stats: {metric_logger.format_averages(EVAL_PROGRESS_METERS)}")
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    if results_file is not None and is_main_process():
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(coco_evaluator.results()))
    return stats, coco_evaluator


@torch.no_grad()
def probe_matching(model: torch.nn.Module, matcher: torch.nn.Module, data_loader: Iterable, device: torch.device,
                   amp: bool = False) -> Tuple[torch.Tensor, List[int]]:
    """The final decoder layer's Hungarian assignment of the matching queries on every image of ``data_loader``
    (evaluation mode, so no denoising queries): ``[N, num_queries]`` int64, the matched object of each query or
    -1 (see :mod:`util.matching_instability`), and the number of objects of each image."""
    was_training = model.training
    model.eval()
    assignments, num_objects = [], []
    for samples, targets in data_loader:
        targets = move_targets(targets, device)
        with autocast(device, amp):
            outputs = model(samples.to(device, non_blocking=True))
        matches = matcher(outputs, targets)  # the final layer's pred_logits and pred_boxes
        assignments.append(assignment_from_matches(matches, outputs["pred_logits"].shape[1]))
        num_objects += [len(t["labels"]) for t in targets]
    model.train(was_training)
    return torch.cat(assignments), num_objects

