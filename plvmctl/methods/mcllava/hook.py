"""MC-LLaVA at ask time: its personalized visual prompt (`LocatedHook`, run by the engine
`methods.make_engine` builds).

The personalized visual prompt
------------------------------
A concept trained by MC-LLaVA carries the k-means centroids of its visual tokens
(`mcllava.prototypes` [k, H], in the projector's output space) and a cosine threshold
(`mcllava.threshold`). When a question with one photo names such a concept, the photo's patch
features (vision tower + projector, what the LM reads in place of `<image>`) are compared with
the prototypes: each patch's best cosine is the similarity map, its best patch is where the
concept most likely is, and when that score passes the threshold the prompt says so right
after the concept's sentence:

    <avril> is <a1>…<ak>. <avril> is on the left.                 (`location: words`, default)
    <avril> is <a1>…<ak>. <avril> is located at 'Mark 1'.          (`location: mark`)

With `mark` (the paper's way) a numbered circle is drawn on the photo at the best patch before
the model sees it. **Words are the default** because a model reads them without having learnt
anything about marks: the pocket model's LM was trained on "on the left / in the middle / on
the right" (its scene questions) and has never seen a drawn mark, and its 96 px photos in 32 px
patches would give a mark a whole third of the photo. A real LLaVA reads both; the paper found
marks useful there, so `--set mcllava.location=mark` is one setting away (and
`location_grid: 3x3`, the default, says "at the top left" ... for real photos; the pocket recipe
uses `columns`, the places its photos have). `LocatedHook` does this for the engine; each item's
`notes["located"]` says what the prompt said.

Why the prototypes and not the trained context tokens: the trained tokens are moved by the
LM's loss, away from the visual space the patches live in (they are also rescaled to the
embedding norm); the centroids are the concept's tokens as the photos gave them, before that,
in exactly the space of the patches. Families whose photo features are not one square grid
(LLaVA-OneVision's anyres) get no location sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw

from ...engine import Engine, Prepared
from ...errors import PlvmError
from ..base import Section
from .trainer import PROTOTYPES, THRESHOLD, McllavaConfig, best_patch_scores, square_side

# The recipe's `mcllava:` section: the training settings and the visual prompt's (location,
# location_grid, location_threshold ...).
MCLLAVA_SECTION = Section("mcllava", McllavaConfig)

FEATURE_CHUNK = 32


@dataclass(frozen=True)
class Location:
    """Where a concept scores best in a photo: the patch (row, column of a side x side grid)."""

    name: str
    score: float
    threshold: float
    patch: int
    side: int

    @property
    def cell(self) -> tuple[int, int]:
        return divmod(self.patch, self.side)

    @property
    def found(self) -> bool:
        return self.score >= self.threshold


def place_words(row: int, column: int, side: int, grid: str = "3x3") -> str:
    """The place of cell (row, column) of a side x side grid in words: "on the left", "in
    the middle", "at the top right" ... (`columns`: left / middle / right only)."""
    third = lambda index: min(2, index * 3 // side)  # noqa: E731
    across = ("left", "middle", "right")[third(column)]
    if grid == "columns":
        return {"left": "on the left", "middle": "in the middle", "right": "on the right"}[across]
    down = ("top", "middle", "bottom")[third(row)]
    if down == "middle":
        return "in the middle" if across == "middle" else f"on the {across}"
    return f"at the {down}" if across == "middle" else f"at the {down} {across}"


def patch_centre(image: Image.Image, location: Location, preprocess: str = "pad") -> tuple[float, float]:
    """The centre of the location's patch in the photo's own pixels (the model saw the photo
    padded to a square, `pad`, or centre-cropped to one, `crop`)."""
    width, height = image.size
    edge = min(width, height) if preprocess == "crop" else max(width, height)
    row, column = location.cell
    x = (column + 0.5) * edge / location.side - (edge - width) / 2
    y = (row + 0.5) * edge / location.side - (edge - height) / 2
    return x, y


def draw_mark(image: Image.Image, location: Location, number: int, preprocess: str = "pad") -> Image.Image:
    """A copy of `image` with mark `number` (a red ring and its number) at the location."""
    marked = image.convert("RGB").copy()
    draw = ImageDraw.Draw(marked)
    x, y = patch_centre(marked, location, preprocess)
    radius = max(4.0, min(marked.size) / (2.5 * location.side))
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 0, 0), width=max(1, int(radius / 4)))
    draw.text((x - radius / 3, y - radius / 2), str(number), fill=(255, 0, 0))
    return marked


def has_prototypes(concept: Any) -> bool:
    return PROTOTYPES in getattr(concept, "parts", {})


def locate(concept: Any, features: torch.Tensor, threshold: float | None = None) -> Location | None:
    """The concept's best patch in a photo's features [n, H] (None without prototypes or when
    the patches are not a square grid). `threshold` overrides the concept's own."""
    prototypes = concept.parts.get(PROTOTYPES)
    side = square_side(features.shape[0])
    if prototypes is None or side is None:
        return None
    scores = best_patch_scores(prototypes, features)
    patch = int(scores.argmax())
    if threshold is None:
        stored = concept.parts.get(THRESHOLD)
        threshold = float(stored) if stored is not None else 1.0
    return Location(concept.name, float(scores[patch]), float(threshold), patch, side)


def visual_prompts(runtime: Any, photos: Sequence[tuple[Image.Image, Mapping[str, Any]]]
                   ) -> list[tuple[dict[str, str], Image.Image]]:
    """For each (photo, {name: concept}), the location text of each concept found in it
    ({name: "on the left"} or {name: "located at 'Mark 1'"}) and the photo the model should see
    (marked with `location: mark`). Photo features are computed once per photo, in chunks."""
    settings = MCLLAVA_SECTION.read(runtime.recipe)
    if settings.location == "off":
        return [({}, image) for image, _ in photos]
    preprocess = runtime.backbone.image_preprocess
    features: list[torch.Tensor] = []
    for start in range(0, len(photos), FEATURE_CHUNK):
        features += runtime.backbone.image_features([image for image, _ in photos[start:start + FEATURE_CHUNK]])
    prompts = []
    for (image, concepts), photo_features in zip(photos, features):
        texts: dict[str, str] = {}
        shown = image
        for name, concept in concepts.items():
            location = locate(concept, photo_features, settings.location_threshold)
            if location is None or not location.found:
                continue
            if settings.location == "mark":
                shown = draw_mark(shown, location, len(texts) + 1, preprocess)
                texts[name] = f"located at 'Mark {len(texts) + 1}'"
            else:
                row, column = location.cell
                texts[name] = place_words(row, column, location.side, settings.location_grid)
        prompts.append((texts, shown))
    return prompts


class LocatedHook:
    """MC-LLaVA at ask time: each one-photo item's concepts with location prototypes that score
    above their threshold get ` <name> is <where>.` in the prompt (and, with
    `mcllava.location: mark`, a mark on the photo). An item whose locating fails gets the error
    and is dropped."""

    key = "located"

    def prepare(self, engine: Engine, prepared: list[Prepared], errors: dict[int, str]) -> list[Prepared]:
        wanted: list[tuple[Prepared, dict[str, Any]]] = []
        for item in prepared:
            if len(item.images) == 1:
                concepts = {name: engine.concept(name) for name in item.names}
                concepts = {name: concept for name, concept in concepts.items() if has_prototypes(concept)}
                if concepts:
                    wanted.append((item, concepts))
        if not wanted:
            return prepared
        try:
            prompts = visual_prompts(engine.runtime, [(item.images[0], concepts) for item, concepts in wanted])
        except (PlvmError, RuntimeError, ValueError) as error:
            for item, _ in wanted:
                errors[item.index] = f"visual prompt: {str(error).splitlines()[0]}"
            failed = {item.index for item, _ in wanted}
            return [item for item in prepared if item.index not in failed]
        for (item, _), (located, image) in zip(wanted, prompts):
            if not located:
                continue
            item.located.update(located)
            item.notes[self.key] = dict(located)
            item.images[0] = image
        return prepared
