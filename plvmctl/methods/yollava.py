"""`yollava`: one concept trained per identity (plvmctl.train.yollava), cached on disk."""

from __future__ import annotations

from .base import MethodContext, PreparedMethod, train_per_identity

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
    from ..train.yollava import YollavaConfig, train_yollava

    runtime = context.runtime
    config = runtime.recipe.section("yollava", YollavaConfig)
    config.validate()
    made = train_per_identity(
        context, YOLLAVA_CACHE, config,
        lambda name, positives, negatives, out: train_yollava(runtime, name, positives, negatives, config,
                                                              out, progress=context.progress))
    return PreparedMethod(
        name="yollava",
        engine=context.engine_api.Engine(runtime, made.concepts),
        seconds_per_concept=made.seconds_per_concept,
        tokens_per_concept=float(config.num_context) if made.concepts else None,
        unavailable=made.unavailable,
        details={"concepts_folder": str(made.folder), "epochs": config.epochs,
                 "num_context": config.num_context},
    )
