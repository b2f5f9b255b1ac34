"""A tiny model memorises one real synthetic image, with and without denoising: the model, matcher,
criterion and denoising queries learn together.

Denoising redraws its noise every step, so its reconstruction losses keep a floor: the decoder must
undo a fresh random box offset that it only sees through its anchor's positional query. With the
noise scales at 0 every loss can go to zero; at the default scales the detection (matching) loss must
still fall as far as without denoising, and the reconstruction losses must fall substantially.
"""
import torch

from datasets import build_dataset
from models import build_model
from tests.model_utils import tiny_args

ITERATIONS = 300
LR = 3e-4


def image_with_objects(args):
    """The first validation image (deterministic transforms) with at least two objects."""
    for image, target in build_dataset("val", args):
        if len(target["labels"]) >= 2:
            return image, {k: target[k] for k in ("labels", "boxes")}
    raise AssertionError(f"no validation image with two objects in {args.coco_path}")


def overfit(coco_path, *flags):
    """Train a tiny DN-DAB-DETR on one image; the weighted (detection, denoising) losses of the first
    step and the smallest of the last ten steps."""
    torch.manual_seed(0)
    args = tiny_args("dn_dab_detr", *flags, "--coco_path", str(coco_path), "--val_scale", "96",
                     "--max_size", "128", "--num_classes", "12")
    image, target = image_with_objects(args)
    model, criterion, _ = build_model(args)
    model.train()
    criterion.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=ITERATIONS * 3 // 4, gamma=0.1)

    history = []
    for _ in range(ITERATIONS):
        losses = criterion(model([image], [target]), [target])
        weighted = {k: losses[k] * w for k, w in criterion.weight_dict.items() if k in losses}
        optimizer.zero_grad()
        sum(weighted.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        scheduler.step()
        detection = sum(v.item() for k, v in weighted.items() if not k.startswith("tgt_"))
        denoising = sum(v.item() for k, v in weighted.items() if k.startswith("tgt_"))
        history.append((detection, denoising))
    last = min(history[-10:], key=sum)
    return history[0], last


def test_overfits_without_denoising(synthetic_coco):
    (detection, denoising), (final_detection, final_denoising) = overfit(synthetic_coco, "--no-use_dn")
    assert denoising == 0 and final_denoising == 0
    assert final_detection < 0.1 * detection, f"loss {detection:.3f} -> {final_detection:.3f}"


def test_overfits_with_noiseless_denoising(synthetic_coco):
    first, last = overfit(synthetic_coco, "--use_dn", "--box_noise_scale", "0", "--label_noise_scale", "0")
    assert first[1] > 0
    assert sum(last) < 0.1 * sum(first), f"loss {sum(first):.3f} -> {sum(last):.3f}"


def test_overfits_with_default_denoising(synthetic_coco):
    (detection, denoising), (final_detection, final_denoising) = overfit(synthetic_coco, "--use_dn")
    assert final_detection < 0.1 * detection, f"detection loss {detection:.3f} -> {final_detection:.3f}"
    assert final_denoising < 0.5 * denoising, f"denoising loss {denoising:.3f} -> {final_denoising:.3f}"
