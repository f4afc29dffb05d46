"""Several people described in one prompt, measured on the base LVLM (no Aligner, issue 23).

Held-out photos and people, every name a name token of its own (as PLVM's concept table gives
every concept its own word), answers generated and read with the evaluation's parsers
(`answers.parse_yes_no`, and `answers.parse_which` on the answer's conclusion):

* ``single``: "Is <a> in this photo?" with <a>'s sentence alone (positive / negative);
* ``two``: the same with a second sentence, <a>'s first or second: positives have an absent
  person's sentence besides, negatives the sentence of someone in the photo (as `eval --pairs`
  does, which puts the asked sentence first);
* ``which``: "Which of <a> and <b> is in this photo?" with one of the two there, and how many
  answers name neither;
* answer lengths in tokens (a name is one token);
* ``reading``: open text questions about a held-out person, no photo, first answer token among
  the possible answers, with their sentence alone, first of two or second of two.

Absent people are one visible trait away from someone in the photo half of the time (the
pretraining's hard negatives), which is harder than `eval --pairs`' random test identities.
Used by bench/multi_concept.py and by the pocket build (card.json's `lvlm.heldout_several_people`).
"""

from __future__ import annotations

import dataclasses
import random
import re

import torch

from ..answers import RECOGNITION_QUESTION, conclusion, parse_which, parse_yes_no
from ..data import templates
from . import lvlm, toy

RECIPE_MAX_NEW_TOKENS = 64  # the pocket recipe's generation limit before questions about several people
# (now 200): `answers_over_64` counts the answers it would have cut, as the committed bench outputs do


@dataclasses.dataclass
class Item:
    group: str  # single-pos, two-neg-second, which, ...
    row: lvlm.Row
    expected: str  # "yes" / "no", or the name a which question must say first


def recognition(asked: toy.Identity, other: toy.Identity | None, image: int, expected: str,
                config: lvlm.LvlmTrainConfig, asked_first: bool = True) -> lvlm.Row:
    """"Is <asked> in this photo?" with asked's sentence and, when given, other's."""
    people = [asked] if other is None else [asked, other] if asked_first else [other, asked]
    descriptions = {person.name: lvlm.describe(person, config.description) for person in people}
    return lvlm.Row("recognition", RECOGNITION_QUESTION.format(name=asked.name), expected, image, descriptions,
                    name_token=True)


def evaluation_set(scenes: int, size: int, config: lvlm.LvlmTrainConfig, seed: int
                   ) -> tuple[list[Item], list]:
    """Seven items a photo of held-out people: single pos / neg, two-sentence pos / neg with the
    asked sentence first and second, one which-of-two."""
    rng = random.Random(f"plvmctl-multi-concept-eval-{seed}")
    pool = toy.heldout_identities()
    traits = config.compare_traits
    items, images = [], []
    for _ in range(scenes):
        image, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=size)
        images.append(image)
        index = len(images) - 1
        present = rng.choice(info.people).identity
        absent = lvlm._absent_identity(info, rng, pool, config.hard_negative_share, traits)
        items += [Item("single-pos", recognition(present, None, index, "yes", config), "yes"),
                  Item("single-neg", recognition(absent, None, index, "no", config), "no")]
        other_absent = lvlm._absent_identity(info, rng, pool, config.hard_negative_share, traits)
        while other_absent == absent:
            other_absent = lvlm._absent_identity(info, rng, pool, config.hard_negative_share, traits)
        for first in (True, False):
            place = "first" if first else "second"
            items += [Item(f"two-pos-{place}", recognition(present, other_absent, index, "yes", config, first), "yes"),
                      Item(f"two-neg-{place}", recognition(absent, present, index, "no", config, first), "no")]
        which = lvlm.which_row(info, index, rng, pool, config, present=1)
        a, b = list(which.descriptions)
        question = templates.WHICH_QUESTIONS[0].format(a=a, b=b)  # the evaluation's question
        there = {person.identity.name for person in info.people}
        shown = a if a in there else b  # which_row draws its own person there, not always `present`
        items.append(Item("which", dataclasses.replace(which, question=question), shown))
    return items, images


def reading_set(rows: int, config: lvlm.LvlmTrainConfig, seed: int) -> dict[str, list[lvlm.Row]]:
    """Open text questions about a held-out person (no photo): their sentence alone, first of
    two, or second of two."""
    rng = random.Random(f"plvmctl-multi-concept-reading-{seed}")
    pool = toy.heldout_identities()
    plain = dataclasses.replace(config, mcq_share=0.0, crowd_text_share=0.0)
    sets: dict[str, list[lvlm.Row]] = {"alone": [], "first": [], "second": []}
    for _ in range(rows):
        who, other = rng.sample(pool, 2)
        row = dataclasses.replace(lvlm.text_row(who, rng, plain), name_token=True)
        mine = {who.name: lvlm.describe(who, config.description)}
        theirs = {other.name: lvlm.describe(other, config.description)}
        sets["alone"].append(dataclasses.replace(row, descriptions=mine))
        sets["first"].append(dataclasses.replace(row, descriptions={**mine, **theirs}))
        sets["second"].append(dataclasses.replace(row, descriptions={**theirs, **mine}))
    return sets


@torch.no_grad()
def reading(model, tokenizer, sets: dict[str, list[lvlm.Row]], seed: int) -> dict[str, float]:
    """First-answer-token accuracy among the possible answers, per `reading_set` setting."""
    model.eval()
    report = {}
    for setting, rows in sets.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            hits = [hit[0] for hit in lvlm.first_answer_hits(model, tokenizer, rows, None) if hit is not None]
        report[setting] = round(sum(hits) / len(hits), 4)
    model.train()
    return report


def answer_tokens(tokenizer, answer: str) -> int:
    """Tokens of a generated answer, a `<name>` counted as the one name token it was."""
    return len(tokenizer(" " + re.sub(r"<[A-Za-z0-9_-]+>", "name", answer), add_special_tokens=False)["input_ids"])


@torch.no_grad()
def measure(model, tokenizer, pixels, items: list[Item], max_new_tokens: int, seed: int) -> dict:
    """Accuracies per group, which-of-two unparseable count, answer lengths, examples.

    The name vectors are drawn from a seeded generator of their own (the same at every
    measurement, the training's random stream untouched); items are generated group by group,
    so short answers do not wait for the long ones of their batch."""
    model.eval()
    items = sorted(items, key=lambda item: item.group)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        said = lvlm.generate_answers(model, tokenizer, [item.row for item in items], pixels,
                                     max_new_tokens=max_new_tokens)
    hits: dict[str, list[int]] = {}
    lengths: dict[str, list[int]] = {}
    unparseable = 0
    examples: dict[str, dict] = {}
    for item, answer in zip(items, said):
        if item.group == "which":
            named = parse_which(conclusion(answer), list(item.row.descriptions))
            unparseable += int(named is None)
            right = named == item.expected
        else:
            right = parse_yes_no(answer) == item.expected
        hits.setdefault(item.group, []).append(int(right))
        kind = item.group.split("-")[0]
        lengths.setdefault(kind, []).append(answer_tokens(tokenizer, answer))
        examples.setdefault(item.group, {"said": answer, "truth": item.row.answer, "expected": item.expected})
    report = {group: round(sum(h) / len(h), 4) for group, h in hits.items()}
    for sign in ("pos", "neg"):
        both = hits[f"two-{sign}-first"] + hits[f"two-{sign}-second"]
        report[f"two-{sign}"] = round(sum(both) / len(both), 4)
    report["which_unparseable"] = unparseable
    report["which_items"] = len(hits["which"])
    report["answer_tokens_mean"] = {kind: round(sum(v) / len(v), 1) for kind, v in lengths.items()}
    report["answer_tokens_max"] = {kind: max(v) for kind, v in lengths.items()}
    report["answers_over_64"] = {kind: sum(n > RECIPE_MAX_NEW_TOKENS for n in v) for kind, v in lengths.items()}
    report["examples"] = examples
    model.train()
    return report


def measure_several_people(model, tokenizer, image_processor, config: lvlm.LvlmTrainConfig, *, scenes: int = 60,
                           seed: int = 1, reading_rows: int = 200, max_new_tokens: int = 128) -> dict:
    """`measure` on `scenes` fresh photos of held-out people and `reading` on `reading_rows`
    text questions, as one report (what the pocket build records in card.json)."""
    size = model.config.vision_config.image_size
    items, images = evaluation_set(scenes, size, config, seed)
    pixels = lvlm.pixel_values(image_processor, images)
    report = measure(model, tokenizer, pixels, items, max_new_tokens, seed)
    report["reading"] = reading(model, tokenizer, reading_set(reading_rows, config, seed), seed)
    report["scenes"] = scenes
    return report
