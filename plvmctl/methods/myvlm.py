"""`myvlm`: one MyVLM concept trained per identity (plvmctl.train.myvlm), cached on disk."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ..errors import PlvmError
from .base import MethodContext, PreparedMethod

MYVLM_CACHE = "myvlm"
TEXT_QA_NOTE = ("text QA is asked without a photo, so no MyVLM concept head can fire: the "
                "concept is absent and the question carries only its name (as in MyVLM, "
                "whose concepts exist only when their head fires on an image)")


def prepare_myvlm(context: MethodContext) -> PreparedMethod:
    """MyVLM: a concept head and a concept embedding TRAINED per identity, cached on disk.

    Positives are the reference photo and any other `ref_img*` beside it. Negatives come from
    the recipe's `myvlm.index` (hard + random) when it names one, else from
    `myvlm.negatives_dir`, else they are the other identities' reference photos (never a
    query photo). Each concept is written to `cache_dir/myvlm/NAME.concept` (its run folder
    beside it) and reused while the model, the photos and the settings are unchanged. Seconds
    per concept is the wall time of making it (head, QA rows, embedding). Text-only questions
    are answered with the concept's name alone, and the report says so (`details["note"]`).
    """
    from ..concept import Concept
    from ..train.myvlm import MyvlmConfig, config_digest, photos_digest, train_myvlm
    from ..train.yollava import gather_negatives, reference_photos

    runtime = context.runtime
    config = runtime.recipe.section("myvlm", MyvlmConfig)
    config.validate()
    folder = context.cache_dir / MYVLM_CACHE
    fingerprint = runtime.backbone.fingerprint
    concepts: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    seconds: list[float] = []
    bar = tqdm(context.references, desc="myvlm: train concepts", unit="concept",
               disable=not context.progress)
    for reference in bar:
        path = folder / f"{reference.name}.concept"
        try:
            positives = reference_photos(reference.path)
            wanted = {"positives_sha256": photos_digest(positives), "config_sha256": config_digest(config)}
            try:
                cached = Concept.load(path) if path.is_file() else None
            except PlvmError:
                cached = None  # a damaged cache entry is only trained again
            if cached is not None and cached.meta.base_model == fingerprint and all(
                    cached.meta.extra.get(key) == value for key, value in wanted.items()):
                concepts[reference.name] = cached.renamed(reference.name)
                seconds.append(float(cached.meta.extra.get("seconds", "nan")))
                continue
            if config.index or config.negatives_dir:
                # gather_negatives reads hard_negatives, random_negatives, exclude_threshold
                # and seed, which MyvlmConfig has under the same names
                negatives = gather_negatives(runtime, positives, config, index=config.index,
                                             negatives_dir=config.negatives_dir).photos
            else:
                negatives = [other.path for other in context.references if other.name != reference.name]
            result = train_myvlm(runtime, reference.name, positives, negatives, config,
                                 folder / reference.name)
        except PlvmError as error:
            unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        result.concept.save(path)
        concepts[reference.name] = result.concept
        seconds.append(result.seconds["total"])
    engine = context.engine_api.Engine(runtime, concepts)
    return PreparedMethod(
        name="myvlm",
        engine=engine,
        seconds_per_concept=sum(seconds) / len(seconds) if seconds else None,
        tokens_per_concept=float(1 + config.num_context) if concepts else None,
        unavailable=unavailable,
        details={"concepts_folder": str(folder), "head": config.head, "features": config.features,
                 "embedding_steps": config.embedding_steps, "attention_weight": config.attention_weight,
                 "note": TEXT_QA_NOTE},
    )
