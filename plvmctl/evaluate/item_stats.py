"""What an evaluation's item logs say beyond its headline numbers, read from OUT/items/*.jsonl.

- `mcnemar`: two methods on the same recognition items: how often each alone is right, and
  the exact McNemar test (two-sided binomial on the items where they disagree) of "they are
  equally accurate".
- `question_accuracy`: multiple-choice accuracy per question as published (with `<sks>`), so
  per trait on the toy set ("What is <sks>'s hair color?") and per kind of photo question
  ("Where is <sks>?"): which readings a method gets wrong.
- `stated_traits`: on a toy test set, how often a recognition answer that compares before its
  verdict ("left red hair red same ...") states a trait of the person asked about wrongly.

An item counts when its method answered it without an engine error (an unparseable answer
is wrong, as in the report); a paired comparison counts the items both methods answered.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

from ..answers import verdict_start
from .itemlog import ItemLog, logged_items, predict
from .items import RECOGNITION_MODE, EvalItem


def outcomes(items: Mapping[str, list[EvalItem]], items_file: str | Path, mcq: str) -> dict[str, dict[str, bool]]:
    """{task: {item key: answered correctly}} for the items a method's log scores."""
    log = ItemLog(Path(items_file))
    found: dict[str, dict[str, bool]] = {task: {} for task in items}
    for task, item, record, reason in logged_items(items, log, mcq):
        if reason is None:
            found[task][item.key] = predict(item, record) == item.expected
    return found


def exact_mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: twice the binomial(n, 1/2) tail of the smaller count,
    n = the discordant items, capped at 1 (1.0 when they never disagree)."""
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar(first: Mapping[str, bool], second: Mapping[str, bool],
            expected: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The paired comparison of two methods' {key: correct} on the keys both have; with
    `expected` ({key: "yes"/"no"}) also on the positives alone."""
    def compare(keys: list[str]) -> dict[str, Any]:
        only_first = sum(first[key] and not second[key] for key in keys)
        only_second = sum(second[key] and not first[key] for key in keys)
        return {"items": len(keys), "both_right": sum(first[key] and second[key] for key in keys),
                "only_first": only_first, "only_second": only_second,
                "p_value": exact_mcnemar(only_first, only_second)}

    shared = sorted(set(first) & set(second))
    result = {"all": compare(shared)}
    if expected is not None:
        result["positives"] = compare([key for key in shared if expected.get(key) == "yes"])
    return result


def question_accuracy(items: list[EvalItem], correct: Mapping[str, bool],
                      questions: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """{question as published: {"items", "correct", "accuracy"}} over the answered items,
    `questions` mapping each item key to its published question."""
    table: dict[str, dict[str, Any]] = {}
    for item in items:
        if item.key not in correct:
            continue
        row = table.setdefault(questions[item.key], {"items": 0, "correct": 0})
        row["items"] += 1
        row["correct"] += int(correct[item.key])
    for row in table.values():
        row["accuracy"] = row["correct"] / row["items"]
    return dict(sorted(table.items()))


def stated_traits(items: list[EvalItem], items_file: str | Path,
                  truth: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, int]]:
    """{trait key: {"stated", "wrong"}} over a method's recognition answers: each "KEY VALUE
    same|different" before the verdict states VALUE for the person asked about, wrong when it
    is not their true one (`truth`: name -> trait key -> value, the toy set's toy_world.json)."""
    keys = {key for traits in truth.values() for key in traits}
    log = ItemLog(Path(items_file))
    counts: dict[str, dict[str, int]] = {}
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        if item.identity not in truth or record is None or record.get("error") is not None:
            continue
        answer = (record.get("answer") or "").lower()
        start = verdict_start(answer)
        words = re.findall(r"[a-z0-9]+", answer[:start] if start is not None else answer)
        for i in range(len(words) - 2):
            if words[i] in keys and words[i + 2] in ("same", "different"):
                entry = counts.setdefault(words[i], {"stated": 0, "wrong": 0})
                entry["stated"] += 1
                entry["wrong"] += int(words[i + 1] != truth[item.identity][words[i]])
    return dict(sorted(counts.items()))
