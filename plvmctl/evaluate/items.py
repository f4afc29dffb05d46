"""The questions an evaluation asks, built from a test set: one `EvalItem` per question, with
a key that stays the same across runs (so an item log can be resumed), and how each task is
answered.

- recognition: "Is <name> in this photo?" for every (identity reference x query photo) pair,
  expected yes when both come from the same identity folder; answered by generation.
- text / visual: the published multiple-choice rows as prompts (`answers.mcq_prompt`),
  answered by the likelihood of each option's letter or by generation (`MCQ_MODES`).
- caption and pair items (asked only on request): MyVLM's caption recall with its name
  precision, and questions that hold several concepts at once (`PAIR_KINDS`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..answers import (BOTH_HERE_QUESTION, CAPTION_QUESTION, LEFT_OF_QUESTION, RECOGNITION_QUESTION, mcq_prompt,
                       which_of_question, who_of_question)
from ..data.templates import WHICH_QUESTIONS
from ..errors import PlvmError
from ..prompt import mentioned_names
from .testset import PLACEHOLDER, PLACES, McqRow, TestSet, group_photos, photo_truth, relative_path

MCQ_MODES = ("likelihood", "generate")
TASKS = ("recognition", "text", "visual")
TASK_TITLES = {"recognition": "recognition", "text": "text QA", "visual": "visual QA"}
CAPTION_TASK = "caption"  # MyVLM's caption recall; asked only with --captions
PAIR_TASK = "pair"  # two concepts in one question; asked only with --pairs
RECOGNITION_MODE = "generate"  # recognition is always answered by generation + yes/no parsing


def answer_mode(task: str, mcq: str) -> str:
    """How items of `task` are answered: recognition by generation, multiple choice by `mcq`;
    the item log keeps answers per (key, mode)."""
    return RECOGNITION_MODE if task == "recognition" else mcq


@dataclass(frozen=True)
class EvalItem:
    """One question to ask, with a key that stays the same across runs."""

    key: str
    task: str  # recognition | text | visual
    identity: str  # the concept the question is about
    question: str  # the full prompt text, with <name>
    image: Path | None
    expected: str  # "yes" / "no" for recognition, the correct letter for MCQ
    options: tuple[tuple[str, str], ...] = ()
    missing: str | None = None
    concepts: tuple[str, ...] = ()  # concepts for the prompt beyond those the question names
    kind: str = ""  # which question of several concepts (PAIR_KINDS) a pair item is


def recipe_mcq_mode(recipe) -> str:
    """How `recipe` answers multiple choice by default: its `eval.mcq`, else "likelihood".

    A model taught to say the option's value before its letter ("red B", the pocket model)
    needs "generate": the letter is not its first answer token.
    """
    section = recipe.sections.get("eval") or {}
    if not isinstance(section, dict):
        raise PlvmError(f"recipe {recipe.name}: 'eval' must be a mapping")
    mode = section.get("mcq", "likelihood")
    if mode not in MCQ_MODES:
        raise PlvmError(f"recipe {recipe.name}: eval.mcq must be one of {', '.join(MCQ_MODES)}, got {mode!r}")
    return mode


def _mcq_item(row: McqRow) -> EvalItem:
    name = f"<{row.identity}>"
    options = tuple((letter, text.replace(PLACEHOLDER, name)) for letter, text in row.options)
    return EvalItem(
        key=row.key,
        task=row.kind,
        identity=row.identity,
        question=mcq_prompt(row.question.replace(PLACEHOLDER, name), options),
        image=row.image,
        expected=row.answer,
        options=options,
        missing=row.missing,
    )


def recognition_items(testset: TestSet, neg_per_identity: int | None = None,
                      seed: int = 0) -> list[EvalItem]:
    """Every (identity reference, query photo) pair; with `neg_per_identity`, all positives
    and that many negatives per reference identity, sampled with `seed`."""
    items = []
    for reference in testset.identities:
        positives, negatives = [], []
        for owner in testset.identities:
            for query in owner.queries:
                item = EvalItem(
                    key=f"rec/{reference.name}/{owner.folder.name}/{query.name}",
                    task="recognition",
                    identity=reference.name,
                    question=RECOGNITION_QUESTION.format(name=reference.name),
                    image=query,
                    expected="yes" if owner is reference else "no",
                )
                (positives if owner is reference else negatives).append(item)
        if neg_per_identity is not None and neg_per_identity < len(negatives):
            rng = random.Random(f"{seed}/{reference.name}")
            chosen = set(rng.sample(range(len(negatives)), neg_per_identity))
            negatives = [item for i, item in enumerate(negatives) if i in chosen]
        items.extend(positives + negatives)
    return items


def _round_robin(items: list[EvalItem], count: int) -> list[EvalItem]:
    """Up to `count` items taken one identity at a time, so a small cap still spans identities."""
    groups: dict[str, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(item.identity, []).append(item)
    chosen: list[EvalItem] = []
    depth = 0
    while len(chosen) < count and any(depth < len(group) for group in groups.values()):
        for group in groups.values():
            if depth < len(group) and len(chosen) < count:
                chosen.append(group[depth])
        depth += 1
    return chosen


def _cap(items: list[EvalItem], limit: int | None, balance_yes_no: bool = False) -> list[EvalItem]:
    """At most `limit` items (in their original order); recognition keeps half positives."""
    if limit is None or len(items) <= limit:
        return items
    if balance_yes_no:
        positives = [item for item in items if item.expected == "yes"]
        negatives = [item for item in items if item.expected == "no"]
        chosen = _round_robin(positives, math.ceil(limit / 2))
        chosen += _round_robin(negatives, limit - len(chosen))
    else:
        chosen = _round_robin(items, limit)
    keep = {item.key for item in chosen}
    return [item for item in items if item.key in keep]


def build_items(testset: TestSet, *, limit: int | None = None, neg_per_identity: int | None = None,
                seed: int = 0) -> dict[str, list[EvalItem]]:
    """The items of each task: recognition, text, visual (in that order)."""
    return {
        "recognition": _cap(recognition_items(testset, neg_per_identity, seed), limit, True),
        "text": _cap([_mcq_item(row) for row in testset.text], limit),
        "visual": _cap([_mcq_item(row) for row in testset.visual], limit),
    }


CAPTION_ABSENT = 1  # test identities not in the photo added to each caption prompt


def caption_items(testset: TestSet, seed: int = 0, absent: int = CAPTION_ABSENT) -> list[EvalItem]:
    """One "Describe this photo." per query photo, with the test identities in it (photo_truth)
    and `absent` others (seeded) as the prompt's concepts, so a caption can name someone who is
    not there (name precision); `expected` lists those present, comma-separated. A method that
    finds concepts itself (plvm-auto) replaces them with the ones it found."""
    names = [identity.name for identity in testset.identities]
    items = []
    for photo, present_names in photo_truth(testset).items():
        present = tuple(sorted(present_names))
        where = relative_path(photo, testset.root)
        others = [name for name in names if name not in present_names]
        extra = tuple(sorted(random.Random(f"{seed}/caption/{where}").sample(others, min(absent, len(others)))))
        key = f"caption:{where}" if not extra else f"caption+{len(extra)}:{where}"
        items.append(EvalItem(key=key, task=CAPTION_TASK, identity=present[0] if present else "",
                              question=CAPTION_QUESTION, image=photo, expected=",".join(present),
                              concepts=present + extra))
    return items


PAIR_KINDS = ("yes", "no", "which", "which3", "who4", "both-yes", "both-no", "left")
NOBODY_SHARE = 0.25  # query photos whose "Who of ...?" lists four people none of whom is in it


def _pair(kind: str, where: str, identity: str, question: str, image: Path, expected: str,
          concepts: tuple[str, ...]) -> EvalItem:
    return EvalItem(f"pair/{kind}/{where}", PAIR_TASK, identity, question, image, expected,
                    concepts=concepts, kind=kind)


def _query_photo_items(identity: str, query: Path, others: list[str], rng: random.Random,
                       where: str) -> list[EvalItem]:
    """The questions about one query photo of `identity`, `others` the test identities not in
    it: "Is <A> ...?" with <B>'s sentence too (yes), "Is <B> ...?" with <A>'s (no), "Which of
    <A> and <B> ...?" (A), "Which of <A>, <B> and <C> ...?" (A), "Who of <4 names> ...?" (A, or
    nobody on a share NOBODY_SHARE of the photos: four others)."""
    other = rng.choice(others)
    first, second = (identity, other) if rng.random() < 0.5 else (other, identity)
    pair_where = f"{identity}+{other}/{where}"
    items = [
        _pair("yes", pair_where, identity, RECOGNITION_QUESTION.format(name=identity), query, "yes", (other,)),
        _pair("no", pair_where, other, RECOGNITION_QUESTION.format(name=other), query, "no", (identity,)),
        _pair("which", pair_where, identity, WHICH_QUESTIONS[0].format(a=first, b=second), query, identity,
              (other,)),
    ]
    rest = [name for name in others if name != other]
    if len(rest) >= 1:
        three = [identity, other, rng.choice(rest)]
        rng.shuffle(three)
        items.append(_pair("which3", f"{'+'.join(three)}/{where}", identity, which_of_question(three), query,
                           identity, tuple(name for name in three if name != identity)))
    if len(others) >= 4:
        nobody = rng.random() < NOBODY_SHARE
        four = rng.sample(others, 4) if nobody else [identity, *rng.sample(others, 3)]
        rng.shuffle(four)
        expected = () if nobody else (identity,)
        items.append(_pair("who4", f"{'+'.join(four)}/{where}", four[0], who_of_question(four), query,
                           ",".join(expected), tuple(four[1:])))
    return items


def _group_photo_items(people: tuple[tuple[str, str], ...], photo: Path, names: list[str],
                       rng: random.Random, where: str) -> list[EvalItem]:
    """The questions about one group photo (`people`: (name, place), left to right): "Are <a>
    and <b> both ...?" of two present (yes) and of one present and one absent (no), "Is <a> to
    the left of <b>?" of two present (in a seeded order) and "Who of ...?" listing everyone
    present and absent test identities up to four."""
    present = [name for name, _ in people]
    absent = [name for name in names if name not in present]
    a, b = rng.sample(present, 2)
    items = [_pair("both-yes", f"{a}+{b}/{where}", a, BOTH_HERE_QUESTION.format(a=a, b=b), photo, "yes", (b,))]
    if absent:
        shown, missing = rng.choice(present), rng.choice(absent)
        first, second = (shown, missing) if rng.random() < 0.5 else (missing, shown)
        items.append(_pair("both-no", f"{first}+{second}/{where}", first, BOTH_HERE_QUESTION.format(a=first, b=second),
                           photo, "no", (second,)))
    places = dict(people)
    left = "yes" if PLACES.index(places[a]) < PLACES.index(places[b]) else "no"
    items.append(_pair("left", f"{a}+{b}/{where}", a, LEFT_OF_QUESTION.format(a=a, b=b), photo, left, (b,)))
    listed = present + rng.sample(absent, max(0, min(4 - len(present), len(absent))))
    rng.shuffle(listed)
    expected = tuple(name for name in listed if name in present)
    items.append(_pair("who4", f"{'+'.join(listed)}/{where}", listed[0], who_of_question(listed), photo,
                       ",".join(expected), tuple(listed[1:])))
    return items


def pair_items(testset: TestSet, *, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Questions that hold several concepts at once (`PAIR_KINDS`), every name given to the
    prompt: per query photo of identity A (`_query_photo_items`; the others drawn, seeded, from
    the test identities not in it) and, on a toy set with group photos (`group_photos`), per
    group photo (`_group_photo_items`). `limit` caps the query photos (taken one identity at a
    time) and the group photos."""
    truth = photo_truth(testset)
    names = [identity.name for identity in testset.identities]
    groups: list[list[list[EvalItem]]] = []
    for identity in testset.identities:
        per_photo = []
        for query in identity.queries:
            others = [name for name in names if name not in truth[query]]
            if not others:
                continue
            rng = random.Random(f"{seed}/pair/{identity.name}/{query.name}")
            per_photo.append(_query_photo_items(identity.name, query, others, rng,
                                                relative_path(query, testset.root)))
        groups.append(per_photo)
    chosen: list[EvalItem] = []
    photos = depth = 0
    while any(depth < len(group) for group in groups) and (limit is None or photos < limit):
        for group in groups:
            if depth < len(group) and (limit is None or photos < limit):
                chosen += group[depth]
                photos += 1
        depth += 1
    together = list(group_photos(testset).items())[:limit]
    for photo, people in together:
        where = relative_path(photo, testset.root)
        chosen += _group_photo_items(people, photo, names, random.Random(f"{seed}/group/{where}"), where)
    return chosen


def item_concepts(item: EvalItem) -> list[str]:
    """Every concept an item's prompt holds: the one it is about, the ones it names, the extra."""
    return list(dict.fromkeys([item.identity, *mentioned_names(item.question), *item.concepts]))

