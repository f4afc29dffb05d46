"""Evaluation by retrieval on a tiny toy test set: "who is in this photo" precision / recall /
F1 with a calibrated threshold, and the `plvm-auto` method (concepts found, not named)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.evaluate import load_testset, photo_truth, run_evaluation
from plvmctl.lab import toy
from plvmctl.methods import KNOWN_METHODS, METHODS


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


@pytest.fixture(scope="module")
def testset(tmp_path_factory):
    return toy.write_testset(tmp_path_factory.mktemp("set"), 3, seed=0, queries_per_identity=2, progress=False)


def _with_retrieval(runtime, **settings):
    recipe = dataclasses.replace(runtime.recipe, sections={**runtime.recipe.sections, "retrieval": settings})
    return dataclasses.replace(runtime, recipe=recipe)


def test_truth_is_the_folder_and_every_test_identity_drawn_in_the_photo(testset):
    loaded = load_testset(testset)
    truth = photo_truth(loaded)
    assert len(truth) == 6 and all(identity.name in truth[q] for identity in loaded.identities
                                   for q in identity.queries)


def test_eval_reports_retrieval_precision_recall_f1(runtime, testset, tmp_path):
    results = run_evaluation(_with_retrieval(runtime, threshold=0.0, top_k=1), testset, [],
                             tmp_path / "out", progress=False, retrieval=True)
    found = results["retrieval"]
    assert found["photos"] == 6 and found["identities"] == 3 and found["predicted"] == 6
    assert found["actual"] == 6 and found["precision"] == found["recall"] == found["f1"] \
        == found["true_positive"] / 6 == found["top1_accuracy"]
    best = found["best_threshold"]
    assert best["f1"] >= found["f1"] and -1 <= best["threshold"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "items" / "retrieval.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(len(row["found"]) == 1 and row["truth"] for row in rows)
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Who is in this photo (retrieval)" in report and "Calibrated on this set" in report
    # a threshold nothing reaches finds nobody: precision undefined, recall 0
    none = run_evaluation(_with_retrieval(runtime, threshold=1.0), testset, [], tmp_path / "none",
                          progress=False, retrieval=True)["retrieval"]
    assert none["predicted"] == 0 and none["precision"] is None and none["recall"] == 0.0


def test_plvm_auto_answers_recognition_from_the_concepts_found(runtime, testset, tmp_path):
    assert "plvm-auto" in KNOWN_METHODS and "plvm-auto" in METHODS
    # nothing is found: every recognition answer is "No." without the model
    results = run_evaluation(_with_retrieval(runtime, threshold=1.0), testset, ["plvm-auto"],
                             tmp_path / "out", limit=4, progress=False)
    method = results["methods"]["plvm-auto"]
    assert method["recognition"]["negative"] == 1.0 and method["recognition"]["positive"] == 0.0
    items = [json.loads(line) for line in (tmp_path / "out" / "items" / "plvm-auto.jsonl").read_text().splitlines()]
    recognition = [item for item in items if item["task"] == "recognition"]
    assert recognition and all(item["answer"] == "No." for item in recognition)
    assert method["text_qa"]["total"] > 0 and method["visual_qa"]["total"] > 0  # still answered
    # everything is found: the model is asked, with the found concepts in the prompt
    everyone = run_evaluation(_with_retrieval(runtime, threshold=-1.0, top_k=3), testset, ["plvm-auto"],
                              tmp_path / "all", limit=4, progress=False)
    items = [json.loads(line) for line in (tmp_path / "all" / "items" / "plvm-auto.jsonl").read_text().splitlines()]
    asked = [item for item in items if item["task"] == "recognition"]
    assert all(item["answer"] != "No." and len(item["seen"]) == 3 for item in asked)
    assert "plvm-auto: the concepts in each photo are found by retrieval" in (tmp_path / "all" / "results.md").read_text()


def test_cli_eval_retrieval_only(testset, tmp_path):
    result = CliRunner().invoke(main, ["--recipe", "tiny", "--device", "cpu", "eval", "--testset", str(testset),
                                       "--retrieval-only", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "## Who is in this photo (retrieval)" in result.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"] == {}
