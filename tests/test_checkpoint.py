"""Checkpoints: atomic writes under kill -9, plain-dict args, safe loading of official files, refusals."""
import argparse
import functools
import http.server
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import torch

from util.checkpoint import (CorruptCheckpointError, UnsafeCheckpointError, args_to_dict, load_checkpoint,
                             save_checkpoint)


def training_state():
    """A small but realistic DN-DETR-style state: model, AdamW + StepLR after one step, epoch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.PReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW([{"params": model[0].parameters(), "lr": 1e-4},
                                   {"params": list(model[1].parameters()) + list(model[2].parameters()), "lr": 1e-5}],
                                  weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 40)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(), "epoch": 7}


def official_args():
    return argparse.Namespace(modelname="dn_dab_detr", lr=1e-4, use_dn=True, scalar=5, backbone="resnet50",
                              finetune_ignore=None, train_scales=[480, 512], crop_size=(384, 600), output_dir="logs")


def assert_same_state(loaded, expected):
    assert loaded["epoch"] == expected["epoch"]
    assert loaded["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(loaded["model"][key], value), key
    assert loaded["lr_scheduler"] == expected["lr_scheduler"]
    assert loaded["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    for index, param_state in expected["optimizer"]["state"].items():
        for name, value in param_state.items():
            assert torch.equal(loaded["optimizer"]["state"][index][name], value), (index, name)


def test_round_trip_saves_namespace_args_as_plain_dict(tmp_path):
    state = training_state()
    args = argparse.Namespace(**vars(official_args()), resume=tmp_path / "old.pth", device=torch.device("cpu"))
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({**state, "args": args}, path)

    # The file loads with torch's default allow-list alone: no Namespace (or Path, device) inside.
    raw = torch.load(path, weights_only=True)
    assert type(raw["args"]) is dict
    assert raw["args"]["resume"] == str(tmp_path / "old.pth") and raw["args"]["device"] == "cpu"
    assert raw["args"]["crop_size"] == (384, 600) and raw["args"]["finetune_ignore"] is None

    loaded = load_checkpoint(path)
    assert_same_state(loaded, state)
    assert loaded["args"] == raw["args"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]  # no stray temporary file


def test_official_checkpoint_with_pickled_namespace_loads(tmp_path):
    # What the official code writes: torch.save of a dict whose args is an argparse.Namespace.
    state = {**training_state(), "args": official_args()}
    path = tmp_path / "official.pth"
    torch.save(state, path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # not loadable without the allow-list...

    loaded = load_checkpoint(path)  # ...but is with it
    assert_same_state(loaded, state)
    assert loaded["args"] == vars(official_args())
    assert args_to_dict(official_args()) == loaded["args"]


class ShellPayload:
    """Unpickling this runs a shell command (the classic malicious-checkpoint trick)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"echo pwned > '{self.marker}'",)


def make_marker_file(marker):
    with open(marker, "w") as f:
        f.write("pwned")


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_checkpoint_running_code_is_refused_and_not_executed(tmp_path, legacy_format):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pth"
    torch.save({**training_state(), "args": official_args(), "payload": ShellPayload(marker)}, path,
               _use_new_zipfile_serialization=not legacy_format)

    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert str(path) in message and "system" in message and "refused for security" in message
    assert "nothing in it was executed" in message
    assert not marker.exists()

    # The payload is real: unrestricted unpickling does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text().strip() == "pwned"


def test_pickled_function_is_refused_naming_it(tmp_path):
    path = tmp_path / "callable.pth"
    torch.save({"model": {}, "hook": make_marker_file}, path)
    with pytest.raises(UnsafeCheckpointError, match="make_marker_file") as error:
        load_checkpoint(path)
    assert any("make_marker_file" in name for name in error.value.offending_globals)
    assert error.value.path == path


def test_missing_path_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_checkpoint.pth"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint.pth"):
        load_checkpoint(missing)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_truncated_file_is_an_error_naming_it(tmp_path, legacy_format):
    path = tmp_path / "truncated.pth"
    torch.save(training_state(), path, _use_new_zipfile_serialization=not legacy_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated.pth"):
        load_checkpoint(path)


def test_garbage_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CorruptCheckpointError, match="notes.pth"):
        load_checkpoint(path)


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "model": {"w": torch.ones(3)}}, path)
    with pytest.raises(Exception):
        save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(3)}, "bad": lambda: None}, path)  # unpicklable
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]
    assert load_checkpoint(path)["epoch"] == 1


def save_forever(path: str, num_floats: int, first_iteration: int, saved_once) -> None:
    """Child process: save a ~32 MiB checkpoint over and over, each time filled with its iteration number."""
    torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork (as in DataLoader workers)
    weight = torch.empty(num_floats)
    iteration = first_iteration
    while True:
        weight.fill_(float(iteration))
        save_checkpoint({"epoch": iteration, "model": {"weight": weight}}, path)
        saved_once.set()
        iteration += 1


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_kill_during_save_always_leaves_a_complete_file(tmp_path):
    path = tmp_path / "checkpoint.pth"
    num_floats = 8 * 1024 * 1024
    context = multiprocessing.get_context("fork")
    rng = random.Random(0)
    last_epoch = 0
    for _ in range(10):
        saved_once = context.Event()
        writer = context.Process(target=save_forever, args=(str(path), num_floats, last_epoch + 1, saved_once),
                                 daemon=True)
        writer.start()
        assert saved_once.wait(timeout=60), "writer made no progress"
        time.sleep(rng.uniform(0.0, 0.2))  # one save takes ~50 ms here: most kills land mid-write
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        assert writer.exitcode == -signal.SIGKILL

        checkpoint = load_checkpoint(path)
        weight = checkpoint["model"]["weight"]
        assert weight.numel() == num_floats
        assert torch.all(weight == float(checkpoint["epoch"])), "file mixes two saves"
        assert checkpoint["epoch"] > last_epoch, "the completed save of this writer was lost"
        last_epoch = checkpoint["epoch"]
    leftovers = [name for name in os.listdir(tmp_path) if name != "checkpoint.pth"]
    assert all(name.startswith(".checkpoint.pth.") and name.endswith(".tmp") for name in leftovers)


def test_https_style_url_is_downloaded_and_loaded_safely(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    state = {**training_state(), "args": official_args()}
    torch.save(state, served / "dn_detr_r50.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dn_detr_r50.pth"
        loaded = load_checkpoint(url, download_dir=tmp_path / "cache")
        assert_same_state(loaded, state)
        assert loaded["args"]["modelname"] == "dn_dab_detr"
        assert (tmp_path / "cache" / "dn_detr_r50.pth").is_file()
    finally:
        server.shutdown()
        server.server_close()
