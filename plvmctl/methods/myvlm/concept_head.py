"""MyVLM's concept head: is this concept in this photo?

A MyVLM concept (Alaluf et al., ECCV 2024) is only present in a prompt when its head says the
photo shows it; then its concept embedding (the concept's `visual` row) is placed right after
the photo's image tokens. The head looks at frozen image features of the photo's crops, from
the reference encoder or the vision tower, on the whole photo or on the whole photo and
its windows (`features` and `crops`, plvmctl/photo_crops.py): a photo's score is its best
crop's, and the head fires when that passes the threshold. MyVLM runs its person head on
detected faces; a reference portrait shows one person, a photo may show several, each smaller.
A head whose metadata names no crops looks at the whole photo.

Two kinds of head:

    linear    score = w·f + b, a linear classifier trained on the concept's photos against
              negatives (trainer.py); it fires when score >= threshold
    nearest   score = the highest cosine between f and the concept's reference features (the
              positives' own); it fires when score >= threshold. MyVLM recognises people this
              way, with a face-recognition network and a cosine threshold; here the features are
              the ones above, and no head is trained.

The head is stored in the concept's `parts` (tensors `concept_head.weight` [D],
`concept_head.bias` [1], `concept_head.references` [R, D], `concept_head.threshold` [1]) and
its kind, features, crops and feature width in the concept's metadata (`extra.concept_head.*`;
no `crops` there means `whole`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ...concept import Concept
from ...errors import PlvmError
from ...photo_crops import CROPS, FEATURES, Box, CropFeatures, crop_features

KINDS = ("linear", "nearest")
PREFIX = "concept_head."


@dataclass
class ConceptHead:
    """One concept's recogniser: a linear classifier or nearest reference features, and a
    threshold on its score."""

    kind: str
    features: str
    threshold: float
    weight: torch.Tensor | None = None  # [D] (linear)
    bias: float = 0.0  # (linear)
    references: torch.Tensor | None = None  # [R, D], L2-normalised (nearest)
    crops: str = "whole"  # whole | windows: what of a photo the head looks at

    def __post_init__(self):
        if self.kind not in KINDS:
            raise PlvmError(f"concept head kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.features not in FEATURES:
            raise PlvmError(f"concept head features must be one of {', '.join(FEATURES)}, "
                            f"got {self.features!r}")
        if self.crops not in CROPS:
            raise PlvmError(f"concept head crops must be one of {', '.join(CROPS)}, got {self.crops!r}")
        if self.kind == "linear" and (self.weight is None or self.weight.ndim != 1):
            raise PlvmError("a linear concept head needs a [D] weight")
        if self.kind == "nearest" and (self.references is None or self.references.ndim != 2
                                       or self.references.shape[0] == 0):
            raise PlvmError("a nearest-features concept head needs [R, D] reference features")

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0] if self.kind == "linear" else self.references.shape[1])

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """[N] scores of L2-normalised features [N, D]."""
        features = features.float()
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise PlvmError(f"the concept head reads {self.dim}-d {self.features} features, got "
                            f"{tuple(features.shape)}: it was made with another {self.features} model")
        if self.kind == "linear":
            return features @ self.weight.float() + self.bias
        return (features @ self.references.float().T).max(dim=1).values

    def fires(self, features: torch.Tensor) -> torch.Tensor:
        """[N] bool: each feature passes the threshold."""
        return self.scores(features) >= self.threshold

    def best(self, photos: Sequence[CropFeatures]) -> tuple[torch.Tensor, list[Box]]:
        """Each photo's best crop: its score ([N]) and box. The photos' crops must be this
        head's (`crop_features(..., head.crops)`)."""
        if not photos:
            return torch.zeros(0), []
        scores = self.scores(torch.cat([photo.features for photo in photos]))
        best, boxes, start = [], [], 0
        for photo in photos:
            own = scores[start:start + len(photo.boxes)]
            number = int(own.argmax())
            best.append(own[number])
            boxes.append(photo.boxes[number])
            start += len(photo.boxes)
        return torch.stack(best), boxes

    def look(self, runtime, images: Sequence[Image.Image]) -> list[tuple[bool, float, Box]]:
        """(fires, best crop's score, its box) for each photo."""
        scores, boxes = self.best(crop_features(runtime, images, self.features, self.crops))
        return [(float(score) >= self.threshold, float(score), box) for score, box in zip(scores, boxes)]

    # -- in a concept ------------------------------------------------------------------
    def parts(self) -> dict[str, torch.Tensor]:
        tensors = {f"{PREFIX}threshold": torch.tensor([self.threshold], dtype=torch.float64)}
        if self.kind == "linear":
            tensors[f"{PREFIX}weight"] = self.weight.detach().float().cpu()
            tensors[f"{PREFIX}bias"] = torch.tensor([self.bias], dtype=torch.float64)
        else:
            tensors[f"{PREFIX}references"] = self.references.detach().float().cpu()
        return tensors

    def meta(self) -> dict[str, str]:
        return {f"{PREFIX}kind": self.kind, f"{PREFIX}features": self.features,
                f"{PREFIX}crops": self.crops, f"{PREFIX}dim": str(self.dim)}

    @classmethod
    def from_concept(cls, concept: Concept) -> "ConceptHead | None":
        """The head stored in `concept`, or None when it has none (not a MyVLM concept)."""
        extra = concept.meta.extra
        kind = extra.get(f"{PREFIX}kind")
        if kind is None and not any(key.startswith(PREFIX) for key in concept.parts):
            return None
        parts = concept.parts
        if kind is None or f"{PREFIX}threshold" not in parts:
            raise PlvmError(f"concept <{concept.name}> has an incomplete concept head")
        bias = parts.get(f"{PREFIX}bias")
        head = cls(kind=kind, features=extra.get(f"{PREFIX}features", ""),
                   threshold=float(parts[f"{PREFIX}threshold"].reshape(-1)[0]),
                   weight=parts.get(f"{PREFIX}weight"),
                   bias=float(bias.reshape(-1)[0]) if bias is not None else 0.0,
                   references=parts.get(f"{PREFIX}references"),
                   crops=extra.get(f"{PREFIX}crops", "whole"))
        if extra.get(f"{PREFIX}dim") not in (None, str(head.dim)):
            raise PlvmError(f"concept <{concept.name}>: its head says {extra[f'{PREFIX}dim']}-d "
                            f"features but holds {head.dim}-d ones")
        return head
