"""Shared fixtures. Real images come from ../shared/data (or $FL_SIM_DATA); without them tests fail loudly."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import server_identity  # noqa: F401 (a fixture for every test module)
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    candidates = [os.environ.get("FL_SIM_DATA"), ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    pytest.fail("real test images are missing: expected ../shared/data (MNIST/raw, cifar10-subset) beside "
                "the project, or FL_SIM_DATA pointing at such a folder", pytrace=False)


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture
def tiny_image_folder(tmp_path) -> Path:
    """A 3-class folder of 8x8 RGB images with a little structure (gradients and blocks)."""
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(6):
            base = rng.uniform(0, 255, size=(1, 1, 3))
            ramp = np.linspace(0, 1, 8)[None, :, None] * rng.uniform(-80, 80, size=(1, 1, 3))
            pixels = np.clip(base + ramp + rng.normal(0, 10, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return tmp_path / "images"
