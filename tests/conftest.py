"""Shared fixtures: a small synthetic COCO folder generated once per test session."""
import pytest

from datasets.synthetic import generate_synthetic_coco

SYNTHETIC_TEST_SETTINGS = dict(num_train=8, num_val=6, seed=0, min_size=64, max_size=128)


@pytest.fixture(scope="session")
def synthetic_coco(tmp_path_factory):
    """Path of a synthetic COCO folder (8 train + 6 val images of 64..128 px, easy preset; at least one
    empty and one crowd image per split); usable as ``--coco_path``. Read-only: copy it to modify it."""
    return generate_synthetic_coco(tmp_path_factory.mktemp("synthetic_coco"), **SYNTHETIC_TEST_SETTINGS)
