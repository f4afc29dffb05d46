"""Evaluation by retrieval on a tiny toy test set: "who is in this photo" precision / recall /
F1 with a calibrated threshold, and the `plvm-auto` method (concepts found, not named)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

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
    # everything is found: the model is asked, with the found concepts in the prompt; the store
    # holds the 3 test identities and the 3 people of the set's negatives/ folder
    everyone = run_evaluation(_with_retrieval(runtime, threshold=-1.0, top_k=6), testset, ["plvm-auto"],
                              tmp_path / "all", limit=4, progress=False)
    assert everyone["methods"]["plvm-auto"]["details"]["distractors"] == 3
    items = [json.loads(line) for line in (tmp_path / "all" / "items" / "plvm-auto.jsonl").read_text().splitlines()]
    asked = [item for item in items if item["task"] == "recognition"]
    assert all(item["answer"] != "No." and len(item["seen"]) == 6 for item in asked)
    assert "plvm-auto: the concepts in each photo are found by retrieval" in (tmp_path / "all" / "results.md").read_text()


def test_cli_eval_retrieval_only(testset, tmp_path):
    result = CliRunner().invoke(main, ["--recipe", "tiny", "--device", "cpu", "eval", "--testset", str(testset),
                                       "--retrieval-only", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "## Who is in this photo (retrieval)" in result.stdout
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"] == {}


# --------------------------------------------------------------------------------------------
# Caption recall (MyVLM's metric)


def test_caption_recall_counts_concepts_named_in_each_description(testset, tmp_path):
    from plvmctl.answers import CAPTION_QUESTION, names_concept
    from plvmctl.evaluate import ItemLog, caption_items, caption_metrics

    assert names_concept("<avril> and Bob at a table", "avril") and names_concept("AVRIL smiles", "avril")
    assert not names_concept("avrils at a table", "avril") and not names_concept("my-avril", "avril")
    assert not names_concept(None, "avril")
    items = [dataclasses.replace(item, key=f"caption:{key}", concepts=names, expected=",".join(names))
             for item, (key, names) in zip(caption_items(load_testset(testset)),
                                           [("a", ("avril", "bob")), ("b", ("bob",)), ("c", ("carol",)),
                                            ("d", ("dan",)), ("e", ("bob",)), ("f", ("erin",))])]
    assert all(item.question == CAPTION_QUESTION for item in items)
    log = ItemLog(tmp_path / "log.jsonl")
    log.append([{"key": "caption:a", "mode": "generate", "answer": "<avril> next to a man.", "error": None},
                {"key": "caption:b", "mode": "generate", "answer": "Bob and <bob>.", "error": None},
                {"key": "caption:c", "mode": "generate", "answer": None, "error": "out of memory"},
                {"key": "caption:d", "mode": "generate", "answer": "<dan> waves.", "error": None},
                {"key": "caption:e", "mode": "likelihood", "answer": "bob", "error": None}])
    found = caption_metrics(items, log, {"dan": "reference missing"})
    # a: avril named, bob not; b: bob named; c: error (skipped); d: dan unavailable (not counted);
    # e: no generated answer (skipped); f: erin never answered (skipped)
    assert (found["pairs"], found["named"], found["photos"]) == (3, 2, 2)
    assert found["recall"] == pytest.approx(2 / 3) and found["photos_all_named"] == 0.5
    assert found["skipped_photos"] == 3 and found["missed_by_concept"] == {"bob": 1}


class _Spy:
    """The real engine API, recording what each caption request put into the prompt."""

    def __init__(self):
        from plvmctl import engine

        self.real, self.AskRequest, self.captions = engine, engine.AskRequest, []

    def Engine(self, runtime, concepts, *args, **kwargs):  # noqa: N802
        real = self.real.Engine(runtime, concepts, *args, **kwargs)
        spy = self

        class Recording:
            def ask(self, requests, **options):
                spy.captions += [(str(Path(r.image).resolve()), tuple(r.concepts)) for r in requests
                                 if r.question == "Describe this photo."]
                return real.ask(requests, **options)

            def score_options(self, *args, **options):
                return real.score_options(*args, **options)

        return Recording()


def test_eval_captions_on_the_tiny_recipe(runtime, testset, tmp_path):
    truth = {str(photo.resolve()): names for photo, names in photo_truth(load_testset(testset)).items()}
    assert len(truth) == 6
    spy = _Spy()
    results = run_evaluation(_with_retrieval(runtime, threshold=-1.0, top_k=3), testset,
                             ["plvm", "plvm-auto"], tmp_path / "out", limit=1, progress=False,
                             engine_api=spy, captions=True)
    pairs = sum(len(names) for names in truth.values())
    for name in ("plvm", "plvm-auto"):
        caption = results["methods"][name]["caption"]
        assert caption["photos"] == 6 and caption["pairs"] == pairs and caption["skipped_photos"] == 0
        assert 0 <= caption["named"] <= pairs and caption["recall"] == pytest.approx(caption["named"] / pairs)
        assert caption["names_said"] >= caption["named"] and 0 <= caption["photos_naming_absent"] <= 1
    asked = spy.captions
    assert len(asked) == 12  # six photos, two methods
    plvm, auto = asked[:6], asked[6:]
    for photo, concepts in plvm:  # the concepts present and one test identity who is not
        assert set(concepts) >= truth[photo] and len(set(concepts) - truth[photo]) == 1
    assert all(len(concepts) == 3 for _, concepts in auto)  # all found (threshold -1, top 3)
    items = [json.loads(line) for line in (tmp_path / "out" / "items" / "plvm.jsonl").read_text().splitlines()]
    assert sum(item["task"] == "caption" for item in items) == 6
    assert "## Caption recall (MyVLM's metric)" in (tmp_path / "out" / "results.md").read_text()
    # resumed: nothing is asked again
    again = _Spy()
    run_evaluation(_with_retrieval(runtime, threshold=-1.0, top_k=3), testset, ["plvm"], tmp_path / "out",
                   limit=1, progress=False, engine_api=again, captions=True)
    assert again.captions == []
