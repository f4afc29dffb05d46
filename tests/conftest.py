"""Shared fixtures: the tiny recipe's runtime (random, built from configs) and odd photos."""

from __future__ import annotations

import os

# Tests never touch the network: hub ids resolve from the local cache or fail at once. Forced
# (whatever the caller's environment says) and set before anything imports huggingface_hub,
# which reads it once at import.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from plvmctl.recipe import load_recipe  # noqa: E402
from plvmctl.runtime import load_runtime  # noqa: E402

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


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test leaves the process as it found it: torch's thread count and transformers'
    progress bars and log level (the CLI silences them, the pocket build sets threads).
    Environment variables are changed through `monkeypatch`, which undoes them itself."""
    from transformers.utils import logging as transformers_logging

    threads = torch.get_num_threads()
    bars = transformers_logging.is_progress_bar_enabled()
    verbosity = transformers_logging.get_verbosity()
    yield
    torch.set_num_threads(threads)
    (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
    transformers_logging.set_verbosity(verbosity)
