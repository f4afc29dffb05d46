"""User photos: finding them in folders, and opening them safely (every odd file becomes either an
RGB image or a PlvmError)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import PlvmError

# Pillow refuses files above this many pixels (decompression bombs); we allow big camera
# photos but shrink anything with a longer side above MAX_SIDE right after decoding.
MAX_PIXELS = 200_000_000
MAX_SIDE = 2048

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # list_images' photos


def list_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files under `folder` (recursive, by suffix), sorted; hidden entries and anything
    under `exclude` are left out."""
    folder = Path(folder).resolve()
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if excluded is not None and (path == excluded or excluded in path.parents):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (alpha composited on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scale = 255.0 / (high - low) if high > low else 0.0
        array8 = ((array - low) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(array8).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


class ImageTooLarge(PlvmError):
    """A photo with more pixels than allowed (a server answers it with 413)."""


def load_image(path: str | os.PathLike, max_side: int = MAX_SIDE) -> Image.Image:
    """Open `path` as an upright RGB image whose longer side is at most `max_side`.

    Raises PlvmError with a one-line reason for missing, unreadable, truncated,
    non-image or absurdly large files.
    """
    path = Path(path)
    if not path.exists():
        raise PlvmError(f"image not found: {path}")
    if path.is_dir():
        raise PlvmError(f"expected an image file, got a folder: {path}")
    return _decode(path, str(path), max_side, MAX_PIXELS)


def image_from_bytes(data: bytes, label: str = "image", max_side: int = MAX_SIDE,
                     max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A photo's file bytes (a server's upload) opened exactly as `load_image` opens a file;
    ImageTooLarge above `max_pixels`, found from the header before any pixel is decoded."""
    return _decode(io.BytesIO(data), label, max_side, max_pixels)


def _decode(source, label: str, max_side: int, max_pixels: int) -> Image.Image:
    """Decode `source` (a path or a binary file) into an upright RGB image, at most
    `max_side` on its longer side; every failure is a PlvmError naming `label`."""
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max(max_pixels, MAX_PIXELS)
    try:
        with Image.open(source) as opened:
            if opened.width * opened.height > max_pixels:
                raise ImageTooLarge(f"image too large ({opened.width}x{opened.height} pixels, at most "
                                    f"{max_pixels:,}): {label}")
            if max(opened.size) > 2 * max_side and opened.format == "JPEG":
                opened.draft("RGB", (max_side, max_side))  # decode JPEGs at reduced size
            opened.load()
            image = ImageOps.exif_transpose(opened)
            image = _to_rgb(image)
    except PlvmError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise PlvmError(f"not a readable image ({type(error).__name__}): {label}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise PlvmError(f"corrupt or truncated image ({error}): {label}") from error
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's original preprocessing: pad the shorter side, centring the photo."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas
