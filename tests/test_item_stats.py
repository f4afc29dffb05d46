"""What the item logs say beyond the headline numbers: the exact McNemar comparison of two
methods on the same items, and the accuracy per published question (per trait)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from plvmctl.evaluate import build_items, load_testset
from plvmctl.evaluate.item_stats import exact_mcnemar, mcnemar, outcomes, question_accuracy, stated_traits
from test_evaluate import make_testset


def test_exact_mcnemar_is_the_two_sided_binomial_tail_of_the_disagreements():
    # 51 against 16 discordant items: a split as lopsided as PLVM against the text prompt's
    assert exact_mcnemar(51, 16) == pytest.approx(2.1689e-05, rel=1e-3)
    assert exact_mcnemar(16, 51) == exact_mcnemar(51, 16)
    assert exact_mcnemar(3, 0) == pytest.approx(2 / 8)  # 2 * P(X <= 0), n = 3
    assert exact_mcnemar(5, 5) == 1.0 and exact_mcnemar(0, 0) == 1.0  # capped; never disagree
    n = 30
    assert exact_mcnemar(20, 10) == pytest.approx(2 * sum(math.comb(n, k) for k in range(11)) / 2 ** n)


def test_mcnemar_pairs_the_items_both_methods_answered():
    first = {"a": True, "b": True, "c": False, "d": True, "e": False}
    second = {"a": True, "b": False, "c": True, "d": False, "f": True}  # e and f are not shared
    expected = {"a": "yes", "b": "yes", "c": "no", "d": "no", "e": "yes", "f": "yes"}
    result = mcnemar(first, second, expected)
    assert result["all"] == {"items": 4, "both_right": 1, "only_first": 2, "only_second": 1,
                             "p_value": 1.0}
    assert result["positives"] == {"items": 2, "both_right": 1, "only_first": 1, "only_second": 0,
                                   "p_value": 1.0}


def _log(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def test_outcomes_and_question_accuracy_read_an_item_log(tmp_path):
    testset = load_testset(make_testset(tmp_path / "set"))
    items = build_items(testset)
    records = []
    for item in items["recognition"]:  # right about alice, wrong about everyone else
        right = item.identity == "alice"
        answer = ("Yes." if item.expected == "yes" else "No.") if right else \
            ("No." if item.expected == "yes" else "Yes.")
        records.append({"key": item.key, "mode": "generate", "answer": answer, "error": None})
    text = items["text"]
    records.append({"key": text[0].key, "mode": "generate", "answer": text[0].expected, "error": None})
    records.append({"key": text[1].key, "mode": "generate", "answer": "Z", "error": None})  # unparseable: wrong
    visual = [item for item in items["visual"] if not item.missing]
    records.append({"key": visual[0].key, "mode": "generate", "answer": None, "error": "engine died"})
    log = _log(tmp_path / "items" / "m.jsonl", records)
    found = outcomes(items, log, "generate")
    assert found["recognition"] == {item.key: item.identity == "alice" for item in items["recognition"]}
    assert found["text"] == {text[0].key: True, text[1].key: False}
    assert found["visual"] == {}  # an engine error is not scored
    questions = {row.key: row.question for row in (*testset.text, *testset.visual)}
    assert question_accuracy(text, found["text"], questions) == {
        "Does <sks> wear glasses?": {"items": 1, "correct": 0, "accuracy": 0.0},
        "What is <sks>'s hair color?": {"items": 1, "correct": 1, "accuracy": 1.0}}


def test_stated_traits_counts_the_values_a_compare_answer_states_wrongly(tmp_path):
    testset = load_testset(make_testset(tmp_path / "set"))
    recognition = build_items(testset)["recognition"]
    truth = {"alice": {"hair": "red", "skin": "tan"}, "bob": {"hair": "black", "skin": "pale"}}
    records = []
    for item in recognition:
        stated = {"alice": "left red hair red same skin dark different mismatch. No.",  # skin wrong
                  "bob": "left x hair black same skin pale same match. Yes, hair red same."}  # after the verdict: not read
        if item.identity in stated:
            records.append({"key": item.key, "mode": "generate", "answer": stated[item.identity], "error": None})
    log = _log(tmp_path / "items" / "m.jsonl", records)
    alice = sum(item.identity == "alice" for item in recognition)
    bob = sum(item.identity == "bob" for item in recognition)
    assert stated_traits(recognition, log, truth) == {
        "hair": {"stated": alice + bob, "wrong": 0}, "skin": {"stated": alice + bob, "wrong": alice}}
    assert stated_traits(recognition, log, {}) == {}  # not a toy set: nothing to check against
