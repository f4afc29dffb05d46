"""`yollava`: one concept trained per identity (plvmctl.train.yollava), cached on disk."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ..errors import PlvmError
from .base import MethodContext, PreparedMethod

YOLLAVA_CACHE = "yollava"


def prepare_yollava(context: MethodContext) -> PreparedMethod:
    """Yo'LLaVA: one concept TRAINED per identity (plvmctl.train.yollava), cached on disk.

    Positives are the reference photo and any other `ref_img*` beside it. Negatives come
    from the recipe's `yollava.index` (hard + random) when it names one, else from
    `yollava.negatives_dir`, else they are the other identities' reference photos (never a
    query photo). Each concept is written to `cache_dir/yollava/NAME.concept` (its run folder
    beside it) and reused while the model, the photos and the settings are unchanged. Seconds
    per concept is the wall time of making it (conversations, vision features, training),
    the time stored in the concept when it comes from the cache.
    """
    from ..concept import Concept
    from ..train.yollava import (
        YollavaConfig,
        config_digest,
        gather_negatives,
        photos_digest,
        reference_photos,
        train_yollava,
    )

    runtime = context.runtime
    config = runtime.recipe.section("yollava", YollavaConfig)
    config.validate()
    folder = context.cache_dir / YOLLAVA_CACHE
    fingerprint = runtime.backbone.fingerprint
    concepts: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    seconds: list[float] = []
    bar = tqdm(context.references, desc="yollava: train concepts", unit="concept",
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
                negatives = gather_negatives(runtime, positives, config, index=config.index,
                                             negatives_dir=config.negatives_dir).photos
            else:
                negatives = [other.path for other in context.references if other.name != reference.name]
            result = train_yollava(runtime, reference.name, positives, negatives, config,
                                   folder / reference.name, progress=context.progress)
        except PlvmError as error:
            unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        result.concept.save(path)
        concepts[reference.name] = result.concept
        seconds.append(result.seconds["total"])
    engine = context.engine_api.Engine(runtime, concepts)
    return PreparedMethod(
        name="yollava",
        engine=engine,
        seconds_per_concept=sum(seconds) / len(seconds) if seconds else None,
        tokens_per_concept=float(config.num_context) if concepts else None,
        unavailable=unavailable,
        details={"concepts_folder": str(folder), "epochs": config.epochs,
                 "num_context": config.num_context},
    )
