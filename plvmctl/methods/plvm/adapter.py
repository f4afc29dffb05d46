"""`plvm`: PLVM's concepts, one Aligner pass per reference photo, no training; an identity with
several reference photos (`ref_img*`) gets the concept of all of them (references.py)."""

from __future__ import annotations

import time
from typing import Any

from tqdm import tqdm

from ...errors import PlvmError
from ...references import encode_photos
from ..base import MethodContext, PreparedMethod, Reference


def prepare_plvm(context: MethodContext) -> PreparedMethod:
    """PLVM: one concept per reference from the Aligner (`encode_reference`), timed.

    The runtime loads the encoder and the Aligner on first use, so one untimed warm-up
    encode comes first: seconds per concept is the cost of adding a concept, not of loading.
    """
    concepts, unavailable, seconds = encode_references(context)
    tokens = [float(concept.num_context) for concept in concepts.values()]
    engine = context.engine_api.Engine(context.runtime, concepts)
    return PreparedMethod(
        name="plvm",
        engine=engine,
        seconds_per_concept=seconds / len(concepts) if concepts else None,
        tokens_per_concept=sum(tokens) / len(tokens) if tokens else None,
        unavailable=unavailable,
    )


def encode_references(context: MethodContext) -> tuple[dict[str, Any], dict[str, str], float]:
    """Every reference's PLVM concept: (name → concept, name → why not, seconds encoding)."""
    concepts: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    seconds = 0.0
    if context.references:
        try:
            encode_reference(context.runtime, context.references[0])
        except PlvmError:
            pass  # the loop below records why that reference cannot be used
    bar = tqdm(context.references, desc="plvm: encode concepts", unit="concept",
               disable=not context.progress)
    for reference in bar:
        started = time.perf_counter()
        try:
            concept = encode_reference(context.runtime, reference)
        except PlvmError as error:
            unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        seconds += time.perf_counter() - started
        concepts[reference.name] = concept
    return concepts, unavailable, seconds


def encode_reference(runtime, reference: Reference):
    """The concept of one reference: from its photo, or from its first `aligner.max_references`
    photos when it has several (`references.encode_photos`; an unreadable one is left out)."""
    photos = reference.photos[:runtime.recipe.aligner.max_references]
    if len(photos) > 1:
        return encode_photos(runtime, reference.name, photos).concept
    return runtime.encode_concept(reference.name, reference.path)
