"""The evaluation batch size. An image's detections depend on its batch mates only through zero padding (why
AP varies with the evaluation batch size): batch mates of the same size leave them unchanged, a larger batch
mate does not. So evaluation uses a stated batch size, recorded by training and reused by --eval --resume."""
import json

import pytest
import torch

from cli import get_args_parser
from main import main
from models import build_model
from models.registry import MODELS
from tests.model_utils import random_images, tiny_args, tiny_main_flags
from util.config import parse_args
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.usefixtures("single_thread")


def eval_outputs(model, images):
    with torch.no_grad():
        outputs = model(nested_tensor_from_tensor_list(images))
    return outputs["pred_logits"], outputs["pred_boxes"]


@pytest.mark.parametrize("modelname", sorted(MODELS))
def test_batch_mates_change_outputs_only_through_padding(modelname):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(modelname))
    model.eval()
    generator = torch.Generator().manual_seed(0)
    image, same_size, larger = random_images([(64, 80), (64, 80), (96, 80)], generator=generator)
    alone_logits, alone_boxes = eval_outputs(model, [image])

    logits, boxes = eval_outputs(model, [image, same_size])
    torch.testing.assert_close(logits[:1], alone_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes[:1], alone_boxes, rtol=1e-4, atol=1e-4)

    padded_logits, padded_boxes = eval_outputs(model, [image, larger])
    change = max((padded_logits[:1] - alone_logits).abs().max(), (padded_boxes[:1] - alone_boxes).abs().max())
    assert change > 1e-3, "padding to a larger batch mate should change this image's outputs (the CNN sees it)"


def read_log(output_dir):
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


def run_main(coco_path, output_dir, *flags):
    main(parse_args(get_args_parser(), tiny_main_flags(coco_path, output_dir, *flags)))


def run_eval(coco_path, output_dir, checkpoint, *flags):
    """``--eval --resume`` with data flags only: the network and batch sizes come from the checkpoint."""
    main(parse_args(get_args_parser(), [
        "--coco_path", str(coco_path), "--output_dir", str(output_dir), "--eval", "--resume", str(checkpoint),
        "--val_scale", "96", "--max_size", "128", "--num_workers", "0", "--device", "cpu", *flags]))


def test_evaluation_batch_size_is_recorded_and_reused_by_eval_resume(synthetic_coco, tmp_path):
    """Training evaluates at --eval_batch_size and records it; --eval --resume evaluates at the recorded size
    by default (reproducing the logged AP), at a given --batch_size (the original evaluation command) when
    one is passed."""
    run_main(synthetic_coco, tmp_path / "train", "--epochs", "1", "--batch_size", "2", "--eval_batch_size", "3")
    logged = read_log(tmp_path / "train")[-1]
    assert logged["eval_batch_size"] == 3
    checkpoint = tmp_path / "train" / "checkpoint.pth"

    run_eval(synthetic_coco, tmp_path / "recorded", checkpoint)
    evaluated = read_log(tmp_path / "recorded")[-1]
    assert evaluated["eval_batch_size"] == 3
    assert evaluated["test_coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"], abs=1e-9)

    run_eval(synthetic_coco, tmp_path / "one", checkpoint, "--batch_size", "1")
    assert read_log(tmp_path / "one")[-1]["eval_batch_size"] == 1
