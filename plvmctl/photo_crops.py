"""A photo as crops: the whole view and overlapping square windows, and their features.

Who is in this photo (plvmctl/recognise.py) and MyVLM's concept head both look at a photo
this way, so a person who fills a third of it is seen about as large as in a reference
portrait. Features come from one of two frozen networks, L2-normalised:

    encoder   the reference encoder's CLS token (`runtime.encoder`, DINOv2 by default)
    vision    the backbone's own vision tower, pooled (`Backbone.embed_images`)

and the crops (`crops`) are

    whole     the whole photo, one crop
    windows   the whole photo and square windows of a half and a third of its shorter side,
              on a grid with half a window's overlap (3 × 3 and 5 × 5 on a square photo)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .errors import PlvmError

FEATURES = ("encoder", "vision")
CROPS = ("whole", "windows")
WINDOW_SHARES = (1 / 2, 1 / 3)  # window side / the photo's shorter side
Box = tuple[int, int, int, int]  # left, top, right, bottom in pixels


def photo_features(runtime, images: Sequence[Image.Image], source: str,
                   chunk: int = 16) -> torch.Tensor:
    """L2-normalised features of `images` ([N, D], float32 on the CPU) from `source`."""
    if source not in FEATURES:
        raise PlvmError(f"concept head features must be one of {', '.join(FEATURES)}, got {source!r}")
    if not images:
        raise PlvmError("the concept head needs at least one photo")
    out = []
    for start in range(0, len(images), chunk):
        part = list(images[start:start + chunk])
        with torch.no_grad():
            if source == "encoder":
                features = runtime.encoder.encode(part)[:, 0]
            else:
                features = runtime.backbone.embed_images(part)
        out.append(torch.nn.functional.normalize(features.float().cpu(), dim=-1))
    return torch.cat(out, 0)


def _starts(length: int, side: int) -> list[int]:
    """Window starts along one axis: half a window apart (or a little less), the first at 0,
    the last at the far edge."""
    if side >= length:
        return [0]
    count = math.ceil((length - side) / (side / 2)) + 1
    return sorted({round(i * (length - side) / (count - 1)) for i in range(count)})


def crop_boxes(width: int, height: int, crops: str) -> list[Box]:
    """The boxes a head with `crops` looks at in a width × height photo, the whole photo first."""
    if crops not in CROPS:
        raise PlvmError(f"concept head crops must be one of {', '.join(CROPS)}, got {crops!r}")
    boxes: list[Box] = [(0, 0, width, height)]
    if crops == "windows":
        for share in WINDOW_SHARES:
            side = max(1, round(min(width, height) * share))
            boxes += [(x, y, x + side, y + side) for y in _starts(height, side) for x in _starts(width, side)]
    return list(dict.fromkeys(boxes))


@dataclass
class CropFeatures:
    """One photo's crops: their boxes and L2-normalised features [C, D] (the whole photo first)."""

    boxes: list[Box]
    features: torch.Tensor

    @property
    def whole(self) -> torch.Tensor:
        return self.features[0]


def crop_features(runtime, images: Sequence[Image.Image], source: str, crops: str,
                  chunk: int = 64) -> list[CropFeatures]:
    """The crops of every photo in `images`, all through the feature extractor together."""
    if not images:
        raise PlvmError("the concept head needs at least one photo")
    pieces: list[Image.Image] = []
    boxes: list[list[Box]] = []
    for image in images:
        own = crop_boxes(image.width, image.height, crops)
        boxes.append(own)
        pieces += [image if box == (0, 0, image.width, image.height) else image.crop(box) for box in own]
    features = photo_features(runtime, pieces, source, chunk=chunk)
    out, start = [], 0
    for own in boxes:
        out.append(CropFeatures(own, features[start:start + len(own)]))
        start += len(own)
    return out
