"""The scores of an evaluation, computed from a method's item log.

Recognition: positive accuracy (over expected-yes items), negative accuracy, their mean.
Multiple choice: accuracy. An unparseable answer counts as wrong; an item without an answer
(a missing photo, a concept the method could not make, an engine error) is skipped and
listed with its reason. Answers are parsed from the logged raw text each time (answers.py),
so a change of parser re-scores old runs without asking again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping

from ..answers import CAPTION_QUESTION, names_concept, parse_which, parse_yes_no
from .itemlog import ItemLog, logged_items, predict
from .items import RECOGNITION_MODE, TASKS, EvalItem, item_concepts

UNPARSEABLE_EXAMPLES = 20  # unparseable answers quoted per method in results.json


def _ratio(correct: int, total: int) -> float | None:
    return correct / total if total else None


def recognition_metrics(pairs: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
    """Accuracy on (expected, predicted) yes/no pairs; a None prediction is wrong either way.

    Returns positive (accuracy over expected "yes"), negative, mean of the two (None when a
    class is empty), the counts behind them and how many answers were unparseable.
    """
    counts = Counter()
    for expected, predicted in pairs:
        cls = "positive" if expected == "yes" else "negative"
        counts[f"{cls}_total"] += 1
        counts[f"{cls}_correct"] += int(predicted == expected)
        counts["unparseable"] += int(predicted is None)
    positive = _ratio(counts["positive_correct"], counts["positive_total"])
    negative = _ratio(counts["negative_correct"], counts["negative_total"])
    mean = (positive + negative) / 2 if positive is not None and negative is not None else None
    return {
        "positive": positive, "negative": negative, "mean": mean,
        "positive_correct": counts["positive_correct"], "positive_total": counts["positive_total"],
        "negative_correct": counts["negative_correct"], "negative_total": counts["negative_total"],
        "unparseable": counts["unparseable"],
    }


def mcq_metrics(pairs: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
    """Accuracy on (expected letter, predicted letter or None) pairs."""
    correct = total = unparseable = 0
    for expected, predicted in pairs:
        total += 1
        correct += int(predicted == expected)
        unparseable += int(predicted is None)
    return {"accuracy": _ratio(correct, total), "correct": correct, "total": total,
            "unparseable": unparseable}


def score_method(items: dict[str, list[EvalItem]], log: ItemLog, mcq: str,
                 unavailable: Mapping[str, str]) -> dict[str, Any]:
    """Metrics of one method from its item log, with the skipped and unparseable items."""
    skipped: list[dict[str, str]] = []
    unparseable: list[dict[str, Any]] = []
    pairs: dict[str, list[tuple[str, str | None]]] = {task: [] for task in TASKS}
    decided = Counter(answers=0, no=0, correct=0)
    for task, item, record, reason in logged_items(items, log, mcq, unavailable):
        if reason is not None:
            skipped.append({"key": item.key, "task": task, "reason": reason})
            continue
        predicted = predict(item, record)
        if predicted is None:
            unparseable.append({"key": item.key, "task": task, "answer": record.get("answer")})
        pairs[task].append((item.expected, predicted))
        if task == "recognition" and record.get("decided_by") == "retrieval":
            decided["answers"] += 1
            decided["correct"] += int(predicted == item.expected)
            decided["no"] += int(predicted == "no")
    reasons = Counter((entry["task"], entry["reason"]) for entry in skipped)
    recognition = recognition_metrics(pairs["recognition"])
    recognition["decided_by_retrieval"] = {  # plvm-auto's "No." when retrieval missed the concept
        **decided, "of_no_answers": sum(1 for _, predicted in pairs["recognition"] if predicted == "no")}
    return {
        "recognition": recognition,
        "text_qa": mcq_metrics(pairs["text"]),
        "visual_qa": mcq_metrics(pairs["visual"]),
        "skipped": {
            "total": len(skipped),
            "by_task": {task: sum(1 for e in skipped if e["task"] == task) for task in TASKS},
            "reasons": [{"task": task, "reason": reason, "count": count}
                        for (task, reason), count in sorted(reasons.items())],
            "items": skipped,
        },
        "unparseable": {
            "total": len(unparseable),
            "by_task": {task: sum(1 for e in unparseable if e["task"] == task) for task in TASKS},
            "examples": unparseable[:UNPARSEABLE_EXAMPLES],
        },
    }


def caption_metrics(items: list[EvalItem], log: ItemLog, unavailable: Mapping[str, str]) -> dict[str, Any]:
    """MyVLM's caption recall: over (photo, concept in it) pairs, the share whose generated
    description names the concept; also the share of photos that name all their concepts.
    Pairs of concepts the method could not make, and photos without an answer, are skipped."""
    pairs = named = photos = complete = skipped = 0
    missed: dict[str, int] = {}
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        present = [name for name in item.concepts if name not in unavailable]
        if not present:
            continue
        if record is None or record.get("error") is not None:
            skipped += 1
            continue
        hits = [names_concept(record.get("answer"), name) for name in present]
        pairs += len(present)
        named += sum(hits)
        photos += 1
        complete += all(hits)
        for name, hit in zip(present, hits):
            if not hit:
                missed[name] = missed.get(name, 0) + 1
    return {"question": CAPTION_QUESTION, "recall": _ratio(named, pairs), "pairs": pairs,
            "named": named, "photos": photos, "photos_all_named": _ratio(complete, photos),
            "skipped_photos": skipped, "missed_by_concept": dict(sorted(missed.items()))}


def pair_metrics(items: list[EvalItem], log: ItemLog, unavailable: Mapping[str, str]) -> dict[str, Any]:
    """Recognition with a second concept in the prompt (positive / negative / mean) and the
    "which of the two" accuracy, over the answered items whose concepts were all made."""
    recognition: list[tuple[str, str | None]] = []
    which = right = unparsed = skipped = 0
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        if any(name in unavailable for name in item_concepts(item)) or record is None \
                or record.get("error") is not None:
            skipped += 1
            continue
        if item.expected in ("yes", "no"):
            recognition.append((item.expected, parse_yes_no(record.get("answer"))))
            continue
        said = parse_which(record.get("answer"), item_concepts(item))
        which += 1
        right += int(said == item.expected)
        unparsed += int(said is None)
    return {"recognition": recognition_metrics(recognition),
            "which": {"accuracy": _ratio(right, which), "items": which, "unparseable": unparsed},
            "skipped": skipped}

