"""`yollava`: one concept trained per identity (methods/yollava/trainer.py), cached on disk."""

from __future__ import annotations

from ..base import MethodContext, PreparedMethod, Section, train_per_identity
from .trainer import YollavaConfig, train_yollava

YOLLAVA_CACHE = "yollava"
YOLLAVA_SECTION = Section("yollava", YollavaConfig)


def prepare_yollava(context: MethodContext) -> PreparedMethod:
    """Yo'LLaVA: one concept TRAINED per identity (`train_yollava`), cached on disk.

    Positives are the reference photo and any other `ref_img*` beside it. Negatives come
    from `context.negatives` (`base.negative_pool`: --negatives, the recipe's `yollava.index`
    or `yollava.negatives_dir`, or the test set's negatives/ folder; never a test identity). Each concept is written to `cache_dir/yollava/NAME.concept` (its run folder
    beside it) and reused while the model, the photos and the settings are unchanged. Seconds
    per concept is the wall time of making it (conversations, vision features, training),
    the time stored in the concept when it comes from the cache.
    """
    runtime = context.runtime
    config = YOLLAVA_SECTION.read(runtime.recipe)
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
        details={"concepts_folder": str(made.folder), "negatives": context.negatives.origin, "epochs": config.epochs,
                 "num_context": config.num_context},
    )
