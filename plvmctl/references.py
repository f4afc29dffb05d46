"""A PLVM concept from several reference photos, and photos added to a concept later.

A concept of N photos (at most the recipe's `aligner.max_references`, default 8) is made by
encoding each photo on its own (reference encoder, then Aligner, one photo per pass) and taking
the mean of the N outputs: word, head and each of the k context tokens (`mean_outputs`). The
pocket Aligner is trained through this mean, with concepts of 2 to 4 clean and hard photos
(`train.max_references`); any Aligner, the released one-photo one too, combines photos this
way. docs/several-photos.md has the measurements, and why the mean and not a weighting by how
much a photo agrees with the others (bench/several_photos.py, seed 7, 4 hard photos:
recognition mean 64.8 weighted against 71.9 for the mean).

A concept of two or more photos keeps what each photo gave, as parts, so that adding a photo
encodes only that photo and gives bit for bit the concept of all photos encoded at once:

    references.word     [N, H]      each photo's Aligner output
    references.head     [N, H]
    references.context  [N, k, H]
    retrieval.keys      [N, D]      each photo's retrieval key (`find` takes the best of them)

with `extra.references.sha256`, the photos' sha256 in order (a JSON list). `retrieval.key` is
the normalised mean of the keys, as for trained concepts. A one-photo concept is stored as
before: its word, head, context and retrieval key are its photo's.

The functions take the loaded runtime (plvmctl.runtime.Runtime) as an argument: its reference
encoder, Aligner and recipe.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from PIL import Image

from .concept import Concept, ConceptMeta, validate_name
from .concept_index import KEYS_PART, key_from_cls, with_key
from .errors import PlvmError
from .fileio import sha256_file
from .images import load_image

WORD_PART = "references.word"
HEAD_PART = "references.head"
CONTEXT_PART = "references.context"
SHA256_META = "references.sha256"

Photo = str | os.PathLike | Image.Image


@dataclass
class PhotoOutput:
    """What one reference photo gives: the Aligner's word, head and context, its key."""

    word: torch.Tensor  # [H]
    head: torch.Tensor  # [H]
    context: torch.Tensor  # [k, H]
    key: torch.Tensor  # [D] normalised CLS vector
    sha256: str
    path: str | None = None


@dataclass
class Encoded:
    """A concept made from photos, and the photos left out: photo → why."""

    concept: Concept
    skipped: dict[str, str] = field(default_factory=dict)


def check_count(count: int, limit: int) -> None:
    """At most `limit` photos make one concept (the recipe's aligner.max_references)."""
    if count > limit:
        raise PlvmError(f"at most {limit} reference photos make one concept (aligner.max_references), "
                        f"got {count}")


def _read(photo: Photo) -> tuple[Image.Image, str, str | None]:
    """(RGB image, sha256 of its bytes, its path or None); PlvmError when unreadable. A photo
    given as an image is hashed as PNG bytes."""
    if isinstance(photo, Image.Image):
        image = photo.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return image, hashlib.sha256(buffer.getvalue()).hexdigest(), None
    image = load_image(photo)
    return image, sha256_file(photo), str(photo)


@torch.no_grad()
def encode_photo(runtime, photo: Photo) -> PhotoOutput:
    """One photo through the reference encoder and the Aligner, alone in its batch (so a
    photo gives the same tensors however many photos its concept has)."""
    image, digest, path = _read(photo)
    tokens = runtime.encoder.encode([image])  # [1, 1+N, D]
    output = runtime.aligner(tokens.to(runtime.device, runtime.dtype))
    return PhotoOutput(output.word[0].float().cpu(), output.head[0].float().cpu(),
                       output.context[0].float().cpu(), key_from_cls(tokens[:, 0]), digest, path)


def mean_outputs(words: torch.Tensor, heads: torch.Tensor,
                 contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(word [H], head [H], context [k, H]): the mean of N photos' Aligner outputs (words
    [N, H], heads [N, H], contexts [N, k, H]). The Aligner trains through it
    (`train.max_references`), so gradients reach every photo's outputs."""
    return words.mean(0), heads.mean(0), contexts.mean(0)


def combine(runtime, name: str, photos: Sequence[PhotoOutput]) -> Concept:
    """The concept of `photos`: the mean of their Aligner outputs; with two or more, each
    photo's outputs and key are kept as parts (module docstring)."""
    validate_name(name)
    if not photos:
        raise PlvmError(f"concept <{name}>: no reference photo")
    meta = ConceptMeta(method="plvm", base_model=runtime.backbone.fingerprint,
                       base_model_name=runtime.backbone.name, aligner_id=runtime.aligner_id,
                       aligner_sha256=runtime.aligner_sha256, reference_sha256=photos[0].sha256,
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if len(photos) == 1:
        [one] = photos
        return with_key(Concept(name, one.word, one.head, one.context, meta), one.key,
                        runtime.encoder_fingerprint, 1, one.path)
    words = torch.stack([p.word for p in photos])
    heads = torch.stack([p.head for p in photos])
    contexts = torch.stack([p.context for p in photos])
    keys = torch.stack([p.key for p in photos])
    meta.extra[SHA256_META] = json.dumps([p.sha256 for p in photos])
    parts = {WORD_PART: words, HEAD_PART: heads, CONTEXT_PART: contexts, KEYS_PART: keys}
    concept = Concept(name, *mean_outputs(words, heads, contexts), meta, parts=parts)
    mean_key = torch.nn.functional.normalize(keys.mean(0), dim=0)
    return with_key(concept, mean_key, runtime.encoder_fingerprint, len(photos), photos[0].path)


def encode_photos(runtime, name: str, photos: Sequence[Photo], earlier: Sequence[PhotoOutput] = ()) -> Encoded:
    """The concept of `earlier` photos' outputs plus `photos`, in that order. An unreadable
    photo, or one already among them (same sha256), is left out and reported in `skipped`;
    when no photo is left to add, PlvmError (one line that names each photo's problem)."""
    validate_name(name)
    check_count(len(earlier) + len(photos), runtime.recipe.aligner.max_references)
    outputs = list(earlier)
    skipped: dict[str, str] = {}
    for photo in photos:
        label = "<image>" if isinstance(photo, Image.Image) else str(photo)
        try:
            output = encode_photo(runtime, photo)
        except PlvmError as error:
            skipped[label] = str(error)
            continue
        if any(output.sha256 == other.sha256 for other in outputs):
            skipped[label] = "the same photo is already a reference of this concept"
            continue
        outputs.append(output)
    if len(outputs) == len(earlier):
        if len(photos) == 1 and not earlier:
            raise PlvmError(next(iter(skipped.values())))
        raise PlvmError(f"no usable reference photo for <{name}>: "
                        + "; ".join(f"{photo}: {why}" for photo, why in skipped.items()))
    return Encoded(combine(runtime, name, outputs), skipped)


def photo_outputs(concept: Concept) -> list[PhotoOutput]:
    """The per-photo outputs a PLVM concept holds: its parts, or, for a one-photo concept,
    its own tensors. PlvmError for a concept another method made."""
    if concept.meta.method != "plvm":
        raise PlvmError(f"<{concept.name}> was made by {concept.meta.method}, not from photos by the "
                        "Aligner: photos can be added to PLVM concepts only")
    if WORD_PART not in concept.parts:
        key = concept.parts.get("retrieval.key")
        if key is None:
            raise PlvmError(f"<{concept.name}> has no retrieval key: run `plvmctl concepts reindex` first")
        return [PhotoOutput(concept.word, concept.head, concept.context, key, concept.meta.reference_sha256,
                            concept.meta.extra.get("reference_path"))]
    digests = json.loads(concept.meta.extra.get(SHA256_META, "[]"))
    parts = [concept.parts.get(name) for name in (WORD_PART, HEAD_PART, CONTEXT_PART, KEYS_PART)]
    if any(part is None or len(part) != len(digests) for part in parts):
        raise PlvmError(f"<{concept.name}>: its per-photo parts do not match its {len(digests)} photos")
    return [PhotoOutput(w, h, c, k, d) for w, h, c, k, d in zip(*parts, digests)]


def add_photos(runtime, concept: Concept, photos: Sequence[Photo]) -> Encoded:
    """`concept` refined with `photos`: equal to encoding its photos and these at once. Refuses
    a concept made with another model, Aligner or reference encoder."""
    runtime.check_concept(concept)
    same_aligner = (concept.meta.aligner_sha256 == runtime.aligner_sha256 if runtime.aligner_sha256
                    else concept.meta.aligner_id == runtime.aligner_id)  # a random tiny Aligner: its id
    if not same_aligner:
        raise PlvmError(f"<{concept.name}> was made with another Aligner ({concept.meta.aligner_id}): "
                        "encode all its photos again")
    if concept.meta.extra.get("retrieval.encoder") != runtime.encoder_fingerprint:
        raise PlvmError(f"<{concept.name}> was made with another reference encoder: encode all its photos again")
    return encode_photos(runtime, concept.name, photos, photo_outputs(concept))

