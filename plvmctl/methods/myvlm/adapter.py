"""`myvlm`: one MyVLM concept trained per identity (methods/myvlm/trainer.py), cached on disk;
its concept head acts at ask time (hook.py, `SeenHook`)."""

from __future__ import annotations

from ..base import MethodContext, PreparedMethod, Section, train_per_identity
from .trainer import MyvlmConfig, train_myvlm

MYVLM_CACHE = "myvlm"
MYVLM_SECTION = Section("myvlm", MyvlmConfig)
TEXT_QA_NOTE = ("text QA is asked without a photo, so no MyVLM concept head can fire: the "
                "concept is absent and the question carries only its name (as in MyVLM, "
                "whose concepts exist only when their head fires on an image)")


def prepare_myvlm(context: MethodContext) -> PreparedMethod:
    """MyVLM: a concept head and a concept embedding TRAINED per identity, cached on disk.

    Positives are the reference photo and any other `ref_img*` beside it. Negatives come from
    `context.negatives` (`base.negative_pool`; never a test identity). Each concept is written to `cache_dir/myvlm/NAME.concept` (its run folder
    beside it) and reused while the model, the photos and the settings are unchanged. Seconds
    per concept is the wall time of making it (head, QA rows, embedding). Text-only questions
    are answered with the concept's name alone, and the report says so (`details["note"]`).
    """
    runtime = context.runtime
    config = MYVLM_SECTION.read(runtime.recipe)
    made = train_per_identity(
        context, MYVLM_CACHE, config,
        lambda name, positives, negatives, out: train_myvlm(runtime, name, positives, negatives, config, out))
    return PreparedMethod(
        name="myvlm",
        engine=context.engine_api.Engine(runtime, made.concepts),
        seconds_per_concept=made.seconds_per_concept,
        tokens_per_concept=float(1 + config.num_context) if made.concepts else None,
        unavailable=made.unavailable,
        details={"concepts_folder": str(made.folder), "negatives": context.negatives.origin, "head": config.head, "features": config.features,
                 "embedding_steps": config.embedding_steps, "attention_weight": config.attention_weight,
                 "note": TEXT_QA_NOTE},
    )
