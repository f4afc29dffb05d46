"""`mcllava`: MC-LLaVA's concepts, trained together (methods/mcllava/trainer.py) a group of
test identities at a time and cached on disk; questions with a photo get its personalized
visual prompt (hook.py)."""

from __future__ import annotations

from ..base import MethodContext, PreparedMethod, train_references
from .hook import MCLLAVA_SECTION
from .trainer import train_mcllava, training_digest

MCLLAVA_CACHE = "mcllava"


def prepare_mcllava(context: MethodContext) -> PreparedMethod:
    """MC-LLaVA: the identities' concepts TRAINED together, `mcllava.group_size` (4) at a time
    in the test set's order, cached on disk (cache_dir/mcllava/NAME.concept).

    Positives are the reference photo and any other `ref_img*` beside it; negatives are the
    other members of the group (joint training) plus `context.negatives`
    (`base.negative_pool`; never a test identity outside the group). A
    group is reused while the model, the photos, the settings and the group are unchanged.
    Seconds per concept is a group's wall time divided by its size. Questions with a photo get
    the personalized visual prompt (`mcllava.location`; details say which).
    """
    runtime = context.runtime
    config = MCLLAVA_SECTION.read(runtime.recipe)

    def train_group(names, positives, negatives, folder):
        result = train_mcllava(runtime, {name: positives[name] for name in names}, negatives, config, folder,
                               progress=context.progress)
        return result.concepts, {name: result.seconds_per_concept for name in names}

    made = train_references(context, MCLLAVA_CACHE, config, train_group, group_size=config.group_size,
                            digest=training_digest)
    return PreparedMethod(
        name="mcllava",
        engine=context.engine_api.Engine(runtime, made.concepts),
        seconds_per_concept=made.seconds_per_concept,
        tokens_per_concept=float(config.num_context) if made.concepts else None,
        unavailable=made.unavailable,
        details={"concepts_folder": str(made.folder), "negatives": context.negatives.origin,
                 "epochs": config.epochs, "num_context": config.num_context,
                 "group_size": config.group_size, "kmeans": config.kmeans, "location": config.location,
                 "location_grid": config.location_grid},
    )
