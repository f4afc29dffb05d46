"""The questions an evaluation asks, built from a test set: one `EvalItem` per question, with
a key that stays the same across runs (so an item log can be resumed), and how each task is
answered.

- recognition: "Is <name> in this photo?" for every (identity reference x query photo) pair,
  expected yes when both come from the same identity folder; answered by generation.
- text / visual: the published multiple-choice rows as prompts (`answers.mcq_prompt`),
  answered by the likelihood of each option's letter or by generation (`MCQ_MODES`).
- caption and pair items (asked only on request): MyVLM's caption recall, and questions
  that hold two concepts at once.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

from ..answers import CAPTION_QUESTION, RECOGNITION_QUESTION, mcq_prompt
from ..data.templates import WHICH_QUESTIONS
from ..errors import PlvmError
from ..prompt import mentioned_names
from .testset import PLACEHOLDER, McqRow, TestSet, photo_truth, relative_path

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


def caption_items(testset: TestSet) -> list[EvalItem]:
    """One "Describe this photo." per query photo, with the test identities in it (photo_truth)
    as the prompt's concepts; `expected` lists them, comma-separated. A method that finds
    concepts itself (plvm-auto) replaces them with the ones it found."""
    items = []
    for photo, names in photo_truth(testset).items():
        present = tuple(sorted(names))
        items.append(EvalItem(key=f"caption:{relative_path(photo, testset.root)}", task=CAPTION_TASK,
                              identity=present[0] if present else "", question=CAPTION_QUESTION,
                              image=photo, expected=",".join(present), concepts=present))
    return items


def pair_items(testset: TestSet, *, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Two concepts in one question, three items per query photo of identity A, with B another
    test identity not in the photo (seeded): "Is <A> in this photo?" with B's sentence in the
    prompt too (expected yes), "Is <B> in this photo?" with A's (no), and "Which of <A> and
    <B> is in this photo?" (names in a seeded order; expected A). `limit` caps the photos
    (three items each), taken one identity at a time."""
    truth = photo_truth(testset)
    names = [identity.name for identity in testset.identities]
    groups: list[list[list[EvalItem]]] = []
    for identity in testset.identities:
        triples = []
        for query in identity.queries:
            others = [name for name in names if name not in truth[query]]
            if not others:
                continue
            rng = random.Random(f"{seed}/pair/{identity.name}/{query.name}")
            other = rng.choice(others)
            first, second = (identity.name, other) if rng.random() < 0.5 else (other, identity.name)
            where = f"{identity.name}+{other}/{relative_path(query, testset.root)}"
            triples.append([
                EvalItem(f"pair/yes/{where}", PAIR_TASK, identity.name,
                         RECOGNITION_QUESTION.format(name=identity.name), query, "yes", concepts=(other,)),
                EvalItem(f"pair/no/{where}", PAIR_TASK, other,
                         RECOGNITION_QUESTION.format(name=other), query, "no", concepts=(identity.name,)),
                EvalItem(f"pair/which/{where}", PAIR_TASK, identity.name,
                         WHICH_QUESTIONS[0].format(a=first, b=second), query, identity.name,
                         concepts=(other,)),
            ])
        groups.append(triples)
    chosen: list[EvalItem] = []
    depth = 0
    while any(depth < len(group) for group in groups) and (limit is None or len(chosen) < 3 * limit):
        for group in groups:
            if depth < len(group) and (limit is None or len(chosen) < 3 * limit):
                chosen += group[depth]
        depth += 1
    return chosen


def item_concepts(item: EvalItem) -> list[str]:
    """Every concept an item's prompt holds: the one it is about, the ones it names, the extra."""
    return list(dict.fromkeys([item.identity, *mentioned_names(item.question), *item.concepts]))

