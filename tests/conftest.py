"""Shared fixtures: a small synthetic COCO folder generated once per test session; one intra-op thread."""
import os

import pytest
import torch

from datasets.synthetic import generate_synthetic_coco

SYNTHETIC_TEST_SETTINGS = dict(num_train=8, num_val=6, seed=0, min_size=64, max_size=128)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """Path of a synthetic COCO folder (8 train + 6 val images of 64..128 px, easy preset; at least one
    empty and one crowd image per split); usable as ``--coco_path``. Read-only: copy it to modify it."""
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), **SYNTHETIC_TEST_SETTINGS)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of many tiny ops (the spec oracles): avoids oversubscription on small
    CPUs. Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a minute or more on a small CPU; skipped unless RUN_SLOW_TESTS=1")


def pytest_collection_modifyitems(config, items):
    """The default suite leaves out the tests marked ``slow``; ``RUN_SLOW_TESTS=1`` runs them too (CI does:
    ``.ci/run``; ``./scripts/test.sh -m slow`` with it runs only them)."""
    if os.environ.get("RUN_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set RUN_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
