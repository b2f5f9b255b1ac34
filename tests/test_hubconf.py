"""hubconf.py through torch.hub.load(source="local"): every zoo config is an entry, checkpoints load strictly."""
from pathlib import Path

import pytest
import torch

import hubconf
from models import build_model
from tests.model_utils import TINY_MODEL_FLAGS, tiny_args
from util.checkpoint import CheckpointError, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The tiny network as keyword arguments (main.py flag names), overriding the zoo config's R50 sizes.
TINY = {flag[2:]: int(value) if value.isdigit() else value
        for flag, value in zip(TINY_MODEL_FLAGS[1::2], TINY_MODEL_FLAGS[2::2])}


def test_every_zoo_config_is_an_entry():
    zoo = {path.stem for path in (ROOT / "configs").glob("*.py") if not path.stem.startswith("synthetic")}
    assert {"dn_dab_detr_r50", "dn_dab_deformable_detr_r50", "dab_detr_r50"} <= zoo
    assert all(callable(getattr(hubconf, name)) and getattr(hubconf, name).__doc__ for name in zoo)


def test_hub_load_of_a_local_checkpoint_gives_its_model(tmp_path):
    torch.manual_seed(0)
    trained, _, _ = build_model(tiny_args("dn_dab_detr", "--use_dn", "--num_classes", "12"))
    trained.eval()
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"model": trained.state_dict(), "epoch": 3}, path)  # no recorded args, like a bare file

    model, postprocessor = torch.hub.load(str(ROOT), "dn_dab_detr_r50", checkpoint=str(path), source="local",
                                          return_postprocessor=True, **TINY)
    assert not model.training and model.num_classes == 12  # read from the checkpoint's tensors
    images = [torch.randn(3, 96, 128), torch.randn(3, 80, 112)]
    with torch.no_grad():
        expected, outputs = trained(images), model(images)
    torch.testing.assert_close(outputs["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(outputs["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)
    detections = postprocessor(outputs, torch.tensor([[480, 640], [400, 560]]))
    assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4

    # Strict: a checkpoint that misses a tensor of the network is refused, naming the file and the tensor.
    state = trained.state_dict()
    del state["refpoint_embed.weight"]
    save_checkpoint({"model": state}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"partial\.pth.*missing: refpoint_embed\.weight"):
        torch.hub.load(str(ROOT), "dn_dab_detr_r50", checkpoint=str(tmp_path / "partial.pth"), source="local", **TINY)
    with pytest.raises(TypeError, match="hiden_dim"):
        torch.hub.load(str(ROOT), "dn_dab_detr_r50", source="local", hiden_dim=64)
