"""The several-people stage of the base LVLM: its settings and its training.

Issue 23's curriculum has two parts: a one-person base (`lvlm.train_lvlm` with a profile's
settings), then this stage, which continues that base on several people at once. It runs as
stage 3b of a pocket build whose profile sets `several_steps` (`lab.pocket`), or on its own
on a finished pocket folder (`lab.several_base`). It imports neither of them.

1. the vocabulary grows by the words of the new questions ("both", "who", ...), every known
   word keeping its id (`lvlm.grow_vocabulary`);
2. the LM, projector and vision tower train further on the one-person curriculum's rows
   (recognition, questions about a named person, captions, portraits, text) with the
   several-people rows mixed in (`SEVERAL_STAGE`): name tags on, recognition among 1-3 other
   described people, "Which of ... / Who of ...", "Are <a> and <b> both ...?", "Is <a> to the
   left of <b>?", "Describe this photo." naming the described people there, and dense text
   rows about several described people; no warm-ups (the base is past them);
3. the one-person skills (`lvlm.measure`, `lvlm.measure_comparisons` with the one-person
   base's own settings, as its card measured them) and the several-people questions
   (`several_people.measure_several_people`) are measured on held-out people.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from ..train.common import rounded_mean
from .lvlm import LvlmTrainConfig

# Several people at once (issue 23): every token after a name carries the name's vector (name
# tags, saved in the base's config and added by the concept table at ask time), dense text rows
# ask many questions about one prompt describing 1-4 people, recognition rows describe 1-3
# other people too, and "Which of <a> and <b>" rows name each person before their comparison
# (docs/several-people.md).
SEVERAL_PEOPLE = dict(name_tags=True, dense_text_groups=8, dense_questions=8, dense_several_share=0.75,
                      crowd_share=0.5, which_share=0.25, which_answer="named", which_max=4,
                      crowd_text_share=0.5)

# The stage's settings, on top of the one-person base's own: the several-people rows,
# both-here / left-of rows (`lvlm.pair_row`) and named captions (`lvlm.named_caption_row`),
# every question about several people reasoning place by place (`lvlm.places_reasoning`:
# "which of" 0.52 on the base, 0.35 with a comparison per person asked about;
# docs/several-people.md), no warm-ups and no vision probe (the tower is trained; a fresh
# probe head would only push noise into it), a shorter run at half the first lr.
SEVERAL_STAGE = dict(SEVERAL_PEOPLE, which_answer="places", pairs_by_place=True, pair_share=0.15,
                     named_caption_share=0.15, copy_steps=0, vision_steps=0, vision_aux_weight=0.0,
                     position_aux_weight=0.0, steps=1200, warmup_steps=50, lr=1e-3, log_every=50)


def several_stage_config(base: LvlmTrainConfig, steps: int | None = None, seed: int = 0, **changes: Any
                         ) -> LvlmTrainConfig:
    """The stage's settings: `base` (the one-person base's own) with `SEVERAL_STAGE` (and
    `steps`, `changes`) on top."""
    settings = dict(SEVERAL_STAGE, **changes)
    if steps is not None:
        settings["steps"] = steps
    return dataclasses.replace(base, **settings, seed=seed)


def train_several_stage(backbone_dir: Path, config: LvlmTrainConfig, run: Path, *, one_person: LvlmTrainConfig,
                        resume: bool, logger, say: Callable[[str], None], measure_scenes: int = 60,
                        check_every: int = 0):
    """Load the base in `backbone_dir`, grow its vocabulary, train it with `config`
    (checkpoints in `run`; `resume` continues one), measure it on held-out people; return
    (the new backbone, the card's record of it). The one-person skills are measured with
    `one_person`, the settings the base was trained with (with `config`, half the recognition
    rows would describe other people too: a harder test than the base's card measured). With
    `check_every`, its one-person comparisons (copying, reading the photo) are measured on 20
    photos every that many steps too, into the log: whether it keeps what the base could do."""
    from ..families import load_backbone
    from ..families.llava15 import Llava15Backbone
    from ..train.common import find_checkpoint
    from .lvlm import collect_vocabulary, grow_vocabulary, measure, measure_comparisons, train_lvlm
    from .several_people import measure_several_people

    backbone = load_backbone(str(backbone_dir), device="cpu", dtype="float32")
    model, image_processor = backbone.model, backbone.image_processor
    words = collect_vocabulary(seed=config.seed, description=config.description, several_people=True)
    tokenizer = grow_vocabulary(model, backbone.tokenizer, words)
    say(f"[several] vocabulary {len(backbone.tokenizer)} -> {len(tokenizer)} words")

    def check(step: int) -> None:
        if check_every and (step + 1) % check_every == 0 and step + 1 < config.steps:
            report = measure_comparisons(model, tokenizer, image_processor, scenes=20, config=one_person)
            report = {key: value for key, value in report.items() if key not in ("examples", "rows")}
            logger.log({"stage": "several-comparisons", "step": step + 1, **report})
            say(f"[several] step {step + 1}: " + json.dumps(report))

    result = train_lvlm(model, tokenizer, image_processor, config, logger=logger,
                        echo=lambda m: say(f"[several] {m}"), checkpoint_dir=run,
                        resume=resume and find_checkpoint(run) is not None, after_step=check)
    say("[several] measuring on held-out people")
    record = {
        "steps": result.steps, "seconds": round(result.seconds, 1), "seconds_before": result.seconds_before,
        "loss_first10": rounded_mean(result.losses[:10]), "loss_last10": rounded_mean(result.losses[-10:]),
        "vocabulary_size": len(tokenizer),
        "heldout_accuracy": measure(model, tokenizer, image_processor, scenes=measure_scenes, config=one_person),
        "heldout_comparisons": measure_comparisons(model, tokenizer, image_processor, scenes=measure_scenes,
                                                   config=one_person),
        "heldout_several_people": measure_several_people(model, tokenizer, image_processor, config,
                                                         scenes=measure_scenes)}
    return Llava15Backbone(model, tokenizer, image_processor, name="plvmctl-pocket"), record
