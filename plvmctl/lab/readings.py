"""What docs/results.md reads from an evaluation's item logs beyond its table: paired
comparisons of two methods' recognition answers (exact McNemar test) and per-question readings
(each multiple-choice question's accuracy; how often a "compare" answer states a trait of the
person asked about wrongly).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from ..evaluate import ItemLog, RECOGNITION_MODE, build_items, load_testset, predict, verdict_start


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p: the binomial test of `only_a` against `only_b` at 1/2."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _items(folder: Path, results: Mapping[str, Any]):
    protocol = results["protocol"]
    testset = load_testset(results["testset"])
    return testset, build_items(testset, limit=protocol["limit"], neg_per_identity=protocol["neg_per_identity"],
                                seed=protocol["seed"])


def paired_recognition(folder: Path, results: Mapping[str, Any], a: str, b: str) -> dict[str, Any]:
    """Over the recognition items both methods answered: how many each alone got right (all
    items and positives only) and the exact McNemar p of the two."""
    _, items = _items(folder, results)
    logs = {name: ItemLog(folder / "items" / f"{name}.jsonl") for name in (a, b)}
    counts = {"items": 0, "both": 0, "only_a": 0, "only_b": 0, "neither": 0, "positives_only_a": 0,
              "positives_only_b": 0}
    for item in items["recognition"]:
        records = [logs[name].records.get((item.key, RECOGNITION_MODE)) for name in (a, b)]
        if any(r is None or r.get("error") is not None for r in records):
            continue
        right_a, right_b = (predict(item, r) == item.expected for r in records)
        counts["items"] += 1
        key = "both" if right_a and right_b else "only_a" if right_a else "only_b" if right_b else "neither"
        counts[key] += 1
        if item.expected == "yes" and key in ("only_a", "only_b"):
            counts[f"positives_{key}"] += 1
    return {"a": a, "b": b, **counts, "p": mcnemar_exact(counts["only_a"], counts["only_b"])}


def mcq_by_question(folder: Path, results: Mapping[str, Any], methods: list[str]) -> list[dict[str, Any]]:
    """Accuracy of each multiple-choice question (the published text, <sks> for the name), per
    method: [{task, question, items, accuracy: {method: fraction}}]."""
    testset, items = _items(folder, results)
    rows_by_key = {row.key: row for row in (*testset.text, *testset.visual)}
    mcq = results["protocol"]["mcq"]
    logs = {name: ItemLog(folder / "items" / f"{name}.jsonl") for name in methods}
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for task in ("visual", "text"):
        for item in items[task]:
            if item.missing:
                continue
            entry = table.setdefault((task, rows_by_key[item.key].question),
                                     {"task": task, "question": rows_by_key[item.key].question, "items": 0,
                                      "right": {name: 0 for name in methods}})
            entry["items"] += 1
            for name in methods:
                record = logs[name].records.get((item.key, mcq))
                if record is not None and record.get("error") is None:
                    entry["right"][name] += int(predict(item, record) == item.expected)
    return [{"task": e["task"], "question": e["question"], "items": e["items"],
             "accuracy": {name: e["right"][name] / e["items"] for name in methods}} for e in table.values()]


def stated_traits(folder: Path, results: Mapping[str, Any], methods: list[str]) -> dict[str, dict[str, Any]]:
    """In "compare" recognition answers ("left red hair red same ..."), how often the value
    stated for the person asked about (the word after each trait key) is not their true one
    (toy test sets only: toy_world.json): {method: {key: {stated, wrong}}}."""
    from .toy import TESTSET_SIDECAR, TRAIT_KEYS, Identity

    testset, items = _items(folder, results)
    sidecar = testset.root / TESTSET_SIDECAR
    if not sidecar.is_file():
        return {}
    truth = {name: Identity.from_id(identity).trait_words()
             for name, identity in json.loads(sidecar.read_text(encoding="utf-8"))["identities"].items()}
    keys = set(TRAIT_KEYS.values())
    found: dict[str, dict[str, Any]] = {}
    for name in methods:
        log = ItemLog(folder / "items" / f"{name}.jsonl")
        counts: dict[str, dict[str, int]] = {}
        for item in items["recognition"]:
            record = log.records.get((item.key, RECOGNITION_MODE))
            answer = (record or {}).get("answer") or ""
            start = verdict_start(answer)
            words = re.findall(r"[a-z0-9]+", answer[:start].lower() if start is not None else answer.lower())
            for i in range(1, len(words) - 2):
                if words[i] in keys and words[i + 2] in ("same", "different") and item.identity in truth:
                    entry = counts.setdefault(words[i], {"stated": 0, "wrong": 0})
                    entry["stated"] += 1
                    entry["wrong"] += int(words[i + 1] != truth[item.identity].get(words[i]))
        if counts:
            found[name] = dict(sorted(counts.items()))
    return found
