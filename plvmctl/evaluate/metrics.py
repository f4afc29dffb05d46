"""The scores of an evaluation, computed from a method's item log.

Recognition: positive accuracy (over expected-yes items), negative accuracy, their mean.
Multiple choice: accuracy. An unparseable answer counts as wrong; an item without an answer
(a missing photo, a concept the method could not make, an engine error) is skipped and
listed with its reason. Answers are parsed from the logged raw text each time (answers.py),
so a change of parser re-scores old runs without asking again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from ..answers import CAPTION_QUESTION, conclusion, parse_which, parse_who, parse_yes_no
from ..prompt import mentioned_names
from .itemlog import ItemLog, logged_items, predict
from .items import PAIR_KINDS, RECOGNITION_MODE, TASKS, EvalItem, item_concepts

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


def caption_metrics(items: list[EvalItem], log: ItemLog, unavailable: Mapping[str, str],
                    names: Sequence[str] = (), reasoning: str = "none") -> dict[str, Any]:
    """MyVLM's caption recall: over (photo, concept in it) pairs, the share whose generated
    description says the concept is there; also the share of photos that name all their
    concepts. And name precision: of the concepts (`names`, the test identities, plus each
    item's prompt concepts) a description says are there, the share that is in the photo;
    `photos_naming_absent` the share of photos whose description puts someone there who is
    not. A description says who is there as an answer to "Who of ...?" does (`answers.
    parse_who` of its conclusion): "I do not see <a> here" does not name <a> as present. Pairs
    of concepts the method could not make, and photos without an answer, are skipped."""
    pairs = named = photos = complete = skipped = said = said_absent = photos_absent = 0
    missed: dict[str, int] = {}
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        expected = [name for name in item.expected.split(",") if name]
        present = [name for name in expected if name not in unavailable]
        if not present:
            continue
        if record is None or record.get("error") is not None:
            skipped += 1
            continue
        caption = record.get("answer")
        candidates = list(dict.fromkeys([*names, *item.concepts]))
        there = set(parse_who(conclusion(caption, reasoning) if caption else caption, candidates) or ())
        hits = [name in there for name in present]
        pairs += len(present)
        named += sum(hits)
        photos += 1
        complete += all(hits)
        for name, hit in zip(present, hits):
            if not hit:
                missed[name] = missed.get(name, 0) + 1
        wrong = there - set(expected)
        said += len(there)
        said_absent += len(wrong)
        photos_absent += int(bool(wrong))
    return {"question": CAPTION_QUESTION, "recall": _ratio(named, pairs), "pairs": pairs,
            "named": named, "photos": photos, "photos_all_named": _ratio(complete, photos),
            "name_precision": _ratio(said - said_absent, said), "names_said": said,
            "names_said_absent": said_absent, "photos_naming_absent": _ratio(photos_absent, photos),
            "skipped_photos": skipped, "missed_by_concept": dict(sorted(missed.items()))}


def set_metrics(pairs: Iterable[tuple[tuple[str, ...], tuple[str, ...] | None]]) -> dict[str, Any]:
    """Micro precision / recall / F1 over (expected names, said names) of "Who of ...?" items
    (an unreadable answer says nobody), the share of items whose set is exactly right, and the
    share right among those whose answer is nobody."""
    said_right = said = expected_total = exact = items = unparseable = nobody = nobody_right = 0
    for expected, predicted in pairs:
        items += 1
        unparseable += int(predicted is None)
        found = set(predicted or ())
        said_right += len(found & set(expected))
        said += len(found)
        expected_total += len(expected)
        exact += int(predicted is not None and found == set(expected))
        if not expected:
            nobody += 1
            nobody_right += int(predicted == ())
    precision, recall = _ratio(said_right, said), _ratio(said_right, expected_total)
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else (
        0.0 if precision is not None and recall is not None else None)
    return {"precision": precision, "recall": recall, "f1": f1, "exact": _ratio(exact, items),
            "nobody": _ratio(nobody_right, nobody), "items": items, "nobody_items": nobody,
            "unparseable": unparseable}


def _choice_metrics(pairs: list[tuple[str, str | None]]) -> dict[str, Any]:
    right = sum(1 for expected, said in pairs if said == expected)
    return {"accuracy": _ratio(right, len(pairs)), "items": len(pairs),
            "unparseable": sum(1 for _, said in pairs if said is None)}


def _yes_no_accuracy(pairs: list[tuple[str, str | None]]) -> dict[str, Any]:
    scored = recognition_metrics(pairs)
    right = scored["positive_correct"] + scored["negative_correct"]
    return {**scored, "accuracy": _ratio(right, len(pairs)), "items": len(pairs)}


def pair_metrics(items: list[EvalItem], log: ItemLog, unavailable: Mapping[str, str],
                 reasoning: str = "none") -> dict[str, Any]:
    """The questions of several concepts (items.PAIR_KINDS), over the answered items whose
    concepts were all made: recognition with a second concept in the prompt (positive /
    negative / mean), which of two and which of three (accuracy: the first of the names the
    answer's conclusion says), both here (yes / no), left of (accuracy) and who of four
    (`set_metrics`). `reasoning` is the recipe's model.reasoning: the names are read from what
    the answer concludes (`answers.conclusion`), not from a comparison before it."""
    answers: dict[str, list[tuple[EvalItem, str | None]]] = {kind: [] for kind in PAIR_KINDS}
    skipped = 0
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        if any(name in unavailable for name in item_concepts(item)) or record is None \
                or record.get("error") is not None:
            skipped += 1
            continue
        answers.setdefault(item.kind, []).append((item, record.get("answer")))

    def yes_no(*kinds: str) -> list[tuple[str, str | None]]:
        return [(item.expected, parse_yes_no(text)) for kind in kinds for item, text in answers[kind]]

    def concluded(text: str | None) -> str | None:
        return conclusion(text, reasoning) if text else text

    return {
        "recognition": recognition_metrics(yes_no("yes", "no")),
        "which": _choice_metrics([(item.expected, parse_which(concluded(text), item_concepts(item)))
                                  for item, text in answers["which"]]),
        "which3": _choice_metrics([(item.expected, parse_which(concluded(text), item_concepts(item)))
                                   for item, text in answers["which3"]]),
        "both": recognition_metrics(yes_no("both-yes", "both-no")),
        "left_of": _yes_no_accuracy(yes_no("left")),
        "who4": set_metrics([(tuple(filter(None, item.expected.split(","))),
                              parse_who(concluded(text), mentioned_names(item.question)))
                             for item, text in answers["who4"]]),
        "skipped": skipped,
    }
