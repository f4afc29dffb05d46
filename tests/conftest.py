"""Shared fixtures: the tiny recipe's runtime (random, built from configs) and odd photos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime

# Tests never touch the network: hub ids resolve from the local cache or fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PLVM_VAL = SHARED / "testsets" / "plvm-val"


@pytest.fixture(scope="session")
def runtime():
    """The tiny recipe on the CPU: every model random but deterministic."""
    return load_runtime(load_recipe("tiny"), device="cpu")


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> dict[str, Path]:
    """A small zoo of photos: ordinary ones and every odd kind the loader must handle."""
    folder = tmp_path_factory.mktemp("photos")
    paths: dict[str, Path] = {}

    def save(name: str, image: Image.Image, **kwargs) -> None:
        paths[name] = folder / name
        image.save(paths[name], **kwargs)

    for seed in range(4):
        save(f"plain{seed}.png", Image.fromarray(_pattern(48, 40, seed)))
    save("photo.jpg", Image.fromarray(_pattern(64, 48, 9)), quality=90)
    save("rgba.png", Image.fromarray(np.dstack([_pattern(32, 32, 5), np.full((32, 32, 1), 90, np.uint8)])))
    save("palette.png", Image.fromarray(_pattern(32, 32, 6)).convert("P", palette=Image.Palette.ADAPTIVE))
    sixteen = (np.random.default_rng(7).integers(0, 65535, size=(24, 40))).astype(np.uint16)
    save("sixteen.png", Image.fromarray(sixteen))
    save("gray.png", Image.fromarray(_pattern(32, 32, 8)[..., 0]))
    rotated = Image.fromarray(_pattern(40, 20, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    save("exif_rotated.jpg", rotated, exif=exif.tobytes())
    save("huge.png", Image.new("RGB", (5000, 3000), (30, 60, 90)))
    paths["corrupt.jpg"] = folder / "corrupt.jpg"
    paths["corrupt.jpg"].write_bytes(paths["photo.jpg"].read_bytes()[:200])
    paths["text.png"] = folder / "text.png"
    paths["text.png"].write_text("this is not an image\n")
    paths["missing.png"] = folder / "missing.png"
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """The machine is shared: one intra-op torch thread keeps the tiny runs fast and steady.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
