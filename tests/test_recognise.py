"""Who is in this photo: a concept pasted into part of a photo is found there (and where) by its
windows, not in a photo without it; `ask --auto` puts found concepts into the prompt; `find`
tags photos as JSON lines and reports an unreadable file without stopping."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from plvmctl.cli import main
from plvmctl.concept_index import KeyIndex
from plvmctl.engine import AskRequest, Engine
from plvmctl.errors import PlvmError
from plvmctl.lab import toy
from plvmctl.prompt import Slot
from plvmctl.recognise import Found, Looked, RetrievalConfig, calibrate_threshold, look, presence_metrics, verify
from plvmctl.store import ConceptStore

# On the tiny recipe's random encoder every two photos look alike (cosines of 0.99), but a
# crop holding exactly the reference portrait scores 1: the tests' threshold sits between.
THRESHOLD = 0.999


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


def _scene(tiles) -> Image.Image:
    """Three 48 px portraits in a 96 px photo: bottom left, bottom right, top left."""
    canvas = Image.new("RGB", (96, 96), (128, 128, 128))
    for tile, spot in zip(tiles, [(0, 48), (48, 48), (0, 0)]):
        canvas.paste(tile, spot)
    return canvas


@pytest.fixture(scope="module")
def world(runtime, tmp_path_factory):
    """Six known toy people (portraits encoded as concepts in a store), strangers, and photos:
    <p3> among strangers, <p1> and <p4> together, strangers only."""
    root = tmp_path_factory.mktemp("recognise")
    identities = toy.training_identities()
    portraits = {f"p{i}": toy.render_portrait(identity, random.Random(i), size=48)
                 for i, identity in enumerate(identities[:6])}
    strangers = [toy.render_portrait(identity, random.Random(50 + i), size=48)
                 for i, identity in enumerate(identities[30:35])]
    store = ConceptStore(root / "store")
    for name, portrait in portraits.items():
        path = root / "refs" / f"{name}.png"
        path.parent.mkdir(exist_ok=True)
        portrait.save(path)
        store.save(runtime.encode_concept(name, path))
    photos = {"p3_among_strangers": _scene([strangers[0], portraits["p3"], strangers[1]]),
              "p1_and_p4": _scene([portraits["p1"], strangers[2], portraits["p4"]]),
              "strangers": _scene(strangers[2:5])}
    files = {}
    for name, image in photos.items():
        files[name] = root / "photos" / f"{name}.png"
        files[name].parent.mkdir(exist_ok=True)
        image.save(files[name])
    return {"root": root, "store": store, "photos": photos, "files": files,
            "concepts": {name: store.load(name) for name in store.names()}}


def test_a_concept_in_part_of_a_photo_is_found_there_and_not_in_a_photo_without_it(runtime, world):
    index = KeyIndex.from_concepts(world["concepts"])
    config = RetrievalConfig(threshold=THRESHOLD)
    among, pair, strangers = look(runtime, index, [world["photos"][k] for k in
                                                   ("p3_among_strangers", "p1_and_p4", "strangers")], config)
    assert [f.name for f in among.found] == ["p3"] and among.found[0].box == (48, 48, 96, 96)
    assert among.found[0].score == pytest.approx(1.0, abs=1e-4)
    assert sorted(f.name for f in pair.found) == ["p1", "p4"]
    assert {f.name: f.box for f in pair.found} == {"p1": (0, 48, 48, 96), "p4": (0, 0, 48, 48)}
    assert strangers.found == [] and strangers.candidates  # candidates, none above the threshold
    # whole view only: the portrait is a quarter of the photo and scores below the threshold
    whole = look(runtime, index, [world["photos"]["p3_among_strangers"]],
                 RetrievalConfig(threshold=THRESHOLD, crops="whole"))[0]
    assert whole.found == []
    # top_k caps what is found, best first
    capped = look(runtime, index, [world["photos"]["p1_and_p4"]], RetrievalConfig(threshold=0.0, top_k=1))[0]
    assert len(capped.found) == 1 and capped.found[0] == capped.candidates[0]


def test_another_encoders_index_is_refused(runtime, world):
    index = KeyIndex.from_concepts(world["concepts"])
    index.encoder = "someone-else"
    with pytest.raises(PlvmError, match="another reference encoder"):
        look(runtime, index, [world["photos"]["strangers"]], RetrievalConfig())


def test_calibration_picks_the_best_f1_cut_and_metrics_count_per_photo():
    picked = calibrate_threshold([0.9, 0.8, 0.7, 0.6], [True, True, False, False])
    assert picked["threshold"] == pytest.approx(0.75) and picked["f1"] == 1.0
    noisy = calibrate_threshold([0.9, 0.85, 0.8, 0.3], [True, False, True, False])
    assert noisy["threshold"] == pytest.approx(0.55) and noisy["recall"] == 1.0
    with pytest.raises(PlvmError):
        calibrate_threshold([0.5], [False])
    metrics = presence_metrics([{"a"}, {"b"}, set()], [["a", "c"], [], ["d"]])
    assert metrics["precision"] == pytest.approx(1 / 3) and metrics["recall"] == pytest.approx(1 / 2)
    assert metrics["f1"] == pytest.approx(0.4)


def test_found_concepts_get_their_sentence_in_the_prompt(runtime, world):
    engine = Engine(runtime, world["store"])
    prepared = engine._prepare(0, AskRequest("Is <p2> here with anyone?", world["photos"]["p1_and_p4"],
                                             concepts=("p4", "p1", "p2")))
    slots = [s for s in prepared.segments if isinstance(s, Slot)]
    assert [s.name for s in slots if s.index == -1] == ["p2", "p4", "p1", "p2"]  # named first, then found
    assert prepared.names == ["p2", "p4", "p1"]
    answer = engine.ask([AskRequest("Who is in this photo?", world["photos"]["p1_and_p4"], concepts=("p1",))])[0]
    assert answer.ok, answer.error


def _cli(world, *args):
    common = ["--recipe", "tiny", "--device", "cpu", "--store", str(world["store"].root)]
    return CliRunner().invoke(main, common + [str(a) for a in args])


def test_ask_auto_puts_the_found_concepts_into_the_prompt(world, monkeypatch):
    import plvmctl.engine as engine_module

    seen = []
    original = engine_module.build_prompt

    def spy(question, **kwargs):
        seen.append((question, tuple(kwargs.get("also", ()))))
        return original(question, **kwargs)

    monkeypatch.setattr(engine_module, "build_prompt", spy)
    result = _cli(world, "ask", world["files"]["p1_and_p4"], world["files"]["strangers"],
                  "Who is in this photo?", "--auto", "--threshold", THRESHOLD, "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines() if line.startswith("{")]
    assert [sorted(f["name"] for f in row["found"]) for row in rows] == [["p1", "p4"], []]
    assert rows[0]["found"][0]["score"] >= THRESHOLD and len(rows[0]["found"][0]["box"]) == 4
    assert sorted(seen) == sorted([("Who is in this photo?", tuple(f["name"] for f in rows[0]["found"])),
                                   ("Who is in this photo?", ())])
    # a concept named in the question is always there, found or not
    seen.clear()
    named = _cli(world, "ask", world["files"]["strangers"], "Is <p2> here?", "--auto", "-k", "2")
    assert named.exit_code == 0, named.output
    assert seen[0][0] == "Is <p2> here?"
    with_flags = _cli(world, "ask", world["files"]["strangers"], "Hi?", "--threshold", "0.5")
    assert with_flags.exit_code == 1 and "go with --auto" in with_flags.output


def test_find_tags_photos_as_json_lines_and_skips_an_unreadable_file(world, tmp_path):
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("p3_among_strangers", "strangers"):
        (folder / f"{name}.png").write_bytes(world["files"][name].read_bytes())
    (folder / "broken.png").write_text("not a photo")
    result = _cli(world, "find", folder, world["files"]["p1_and_p4"], "--json", "--threshold", THRESHOLD)
    assert result.exit_code == 1, result.output
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    by_photo = {Path(row["photo"]).name: row for row in rows}
    assert list(by_photo) == ["broken.png", "p3_among_strangers.png", "strangers.png", "p1_and_p4.png"]
    assert by_photo["broken.png"]["found"] is None and by_photo["broken.png"]["error"]
    assert by_photo["p3_among_strangers.png"]["found"] == [
        {"name": "p3", "score": pytest.approx(1.0, abs=1e-4), "box": [48, 48, 96, 96]}]
    assert by_photo["strangers.png"]["found"] == [] and by_photo["strangers.png"]["error"] is None
    assert sorted(f["name"] for f in by_photo["p1_and_p4.png"]["found"]) == ["p1", "p4"]
    assert "failed:" in result.stderr and "broken.png" in result.stderr
    table = _cli(world, "find", world["files"]["p3_among_strangers"], "--threshold", THRESHOLD, "-k", "1")
    assert table.exit_code == 0 and "<p3> 1.000 at 48,48,96,96" in table.stdout
    assert (world["store"].root / ".retrieval" / "index.json").is_file()  # built on first use
    empty = tmp_path / "empty"
    empty.mkdir()
    none = _cli(world, "find", empty)
    assert none.exit_code == 1 and "no photos in folder" in none.output


class _SaysYesTo:
    """An engine that recognises only `names` (and records what it was asked)."""

    def __init__(self, *names):
        self.names, self.asked = set(names), []

    def ask(self, requests):
        self.asked += [r.question for r in requests]
        return [type("Answer", (), {"error": None, "answer": "yes." if any(f"<{n}>" in r.question for n in self.names)
                                    else "no."})() for r in requests]


def test_verify_asks_the_model_about_the_best_candidates_and_keeps_what_it_recognises():
    box = (0, 0, 8, 8)
    candidates = [Found(name, score, box) for name, score in (("p1", 0.9), ("p2", 0.8), ("p3", 0.7), ("p4", 0.2))]
    looked = [Looked(candidates, candidates[:1]), Looked(candidates[::-1], [])]
    engine = _SaysYesTo("p3", "p4")
    photos = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]
    verified = verify(engine, photos, looked, RetrievalConfig(verify=3, top_k=5))
    # only the 3 best candidates of each photo are asked about, whatever their score
    assert engine.asked == [f"Is <{n}> in this photo?" for n in ("p1", "p2", "p3", "p4", "p3", "p2")]
    assert [f.name for f in verified[0].found] == ["p3"]  # p1 scored highest, but the model said no
    assert [f.name for f in verified[1].found] == ["p4", "p3"]
    assert verified[0].candidates == candidates
    assert [f.name for f in verify(engine, photos, looked, RetrievalConfig(verify=3, top_k=1))[1].found] == ["p4"]


def test_verify_needs_an_engine_and_a_sensible_count(runtime, world):
    index = KeyIndex.from_concepts(world["concepts"])
    with pytest.raises(PlvmError, match="no engine"):
        look(runtime, index, [world["photos"]["strangers"]], RetrievalConfig(verify=2))
    with pytest.raises(PlvmError, match="retrieval.verify"):
        RetrievalConfig(verify=-1).validate()


# --------------------------------------------------------------------------------------------
# Verifying all candidates in one question (retrieval.verify_by: together)


class _Says:
    """An engine that answers every question with `answer` (and records what it was asked)."""

    def __init__(self, answer):
        self.answer, self.asked = answer, []

    def ask(self, requests):
        self.asked += [r.question for r in requests]
        return [type("Answer", (), {"error": None, "answer": self.answer})() for _ in requests]


def _candidates():
    box = (0, 0, 8, 8)
    return [Found(name, score, box) for name, score in (("p1", 0.9), ("p2", 0.8), ("p3", 0.7), ("p4", 0.2))]


def test_together_asks_one_question_per_photo_that_holds_its_best_candidates():
    candidates = _candidates()
    looked = [Looked(candidates, []), Looked(candidates[::-1], []), Looked([], [])]
    photos = [Image.new("RGB", (8, 8)) for _ in looked]
    engine = _Says("<p3> and <p2> are in this photo.")
    verified = verify(engine, photos, looked, RetrievalConfig(verify=3, verify_by="together"))
    # one question per photo with candidates, naming its 3 best; a photo with none is not asked
    assert engine.asked == ["Who of <p1>, <p2> and <p3> is in this photo?",
                            "Who of <p4>, <p3> and <p2> is in this photo?"]
    assert [v.model_calls for v in verified] == [1, 1, 0]
    assert [[f.name for f in v.found] for v in verified] == [["p2", "p3"], ["p3", "p2"], []]  # best score first
    assert verified[0].found[0] == candidates[1] and verified[0].candidates == candidates
    capped = verify(engine, photos[:1], looked[:1], RetrievalConfig(verify=3, verify_by="together", top_k=1))
    assert [f.name for f in capped[0].found] == ["p2"]
    # a name the answer gives that was not asked about is not found
    beyond = verify(_Says("<p4> is here."), photos[:1], looked[:1], RetrievalConfig(verify=3, verify_by="together"))
    assert beyond[0].found == [] and beyond[0].unreadable == 1


def test_each_asks_one_question_per_candidate_and_counts_the_calls():
    looked = [Looked(_candidates(), [])]
    engine = _Says("no.")
    verified = verify(engine, [Image.new("RGB", (8, 8))], looked, RetrievalConfig(verify=3))
    assert len(engine.asked) == 3 and verified[0].model_calls == 3 and verified[0].unreadable == 0


@pytest.mark.parametrize("answer, found, unreadable", [
    ("Nobody.", [], 0),
    ("None of them is in this photo.", [], 0),
    ("<p1> is not here.", [], 0),
    ("I am not sure.", [], 1),  # neither names nor nobody: nothing found, counted
    ("", [], 1),
    ("I see <p1>, but not <p2>.", ["p1"], 0),
])
def test_together_reads_who_the_answer_says_is_present(answer, found, unreadable):
    looked = [Looked(_candidates(), [])]
    verified = verify(_Says(answer), [Image.new("RGB", (8, 8))], looked, RetrievalConfig(verify=4, verify_by="together"))
    assert [f.name for f in verified[0].found] == found and verified[0].unreadable == unreadable


def test_together_reads_the_conclusion_of_a_model_that_compares_first():
    looked = [Looked(_candidates(), [])]
    answer = "left <p1> hair red same match. right <p2> hair black other mismatch. <p1> is in this photo."
    config = RetrievalConfig(verify=4, verify_by="together")
    compared = verify(_Says(answer), [Image.new("RGB", (8, 8))], looked, config, reasoning="comparison")
    assert [f.name for f in compared[0].found] == ["p1"]
    whole = verify(_Says(answer), [Image.new("RGB", (8, 8))], looked, config, reasoning="none")
    assert [f.name for f in whole[0].found] == ["p1", "p2"]  # the scratchpad read as the answer


def test_a_bad_verify_by_is_refused_in_one_line(world):
    with pytest.raises(PlvmError, match="retrieval.verify_by must be one of each, together, got 'both'"):
        RetrievalConfig(verify=2, verify_by="both").validate()
    result = _cli(world, "--set", "retrieval.verify_by=both", "find", world["files"]["strangers"])
    assert result.exit_code == 1 and "retrieval.verify_by must be one of each, together" in result.output
    assert "Traceback" not in result.output


def _count_model_calls(monkeypatch, answer=None):
    """Spy on Engine.ask: the questions it is given; with `answer`, every "Who of" question is
    answered with it instead of the model."""
    import plvmctl.engine as engine_module

    asked = []
    original = engine_module.Engine.ask

    def spy(self, requests, **kwargs):
        asked.extend(r.question for r in requests)
        results = original(self, requests, **kwargs)
        if answer is not None:
            for result in results:
                if result.request.question.startswith("Who of"):
                    result.answer = answer
        return results

    monkeypatch.setattr(engine_module.Engine, "ask", spy)
    return asked


def test_find_verifies_together_with_one_model_call_per_photo(world, monkeypatch):
    photos = [world["files"][name] for name in ("p3_among_strangers", "p1_and_p4", "strangers")]
    asked = _count_model_calls(monkeypatch)
    each = _cli(world, "--set", "retrieval.verify=3", "find", *photos, "--json")
    assert each.exit_code == 0, each.output
    assert [json.loads(line)["model_calls"] for line in each.stdout.splitlines()] == [3, 3, 3]
    assert len(asked) == 9 and all(q.startswith("Is <") for q in asked)
    asked.clear()
    together = _cli(world, "--set", "retrieval.verify=3", "--set", "retrieval.verify_by=together",
                    "find", *photos, "--json")
    assert together.exit_code == 0, together.output
    rows = [json.loads(line) for line in together.stdout.splitlines()]
    assert [row["model_calls"] for row in rows] == [1, 1, 1]
    assert len(asked) == 3 and all(q.startswith("Who of <") and q.count("<") == 3 for q in asked)
    # the tiny model's random answers: whatever it says, each row says whether it could be read
    assert all(row["unreadable"] in (0, 1) and row["error"] is None for row in rows)


def test_ask_auto_puts_the_concepts_the_together_answer_names_into_the_prompt(world, monkeypatch):
    import plvmctl.engine as engine_module

    prompts = []
    original = engine_module.build_prompt

    def spy(question, **kwargs):
        prompts.append((question, tuple(kwargs.get("also", ()))))
        return original(question, **kwargs)

    monkeypatch.setattr(engine_module, "build_prompt", spy)
    asked = _count_model_calls(monkeypatch, answer="<p4> and <p1> are in this photo.")
    result = _cli(world, "--set", "retrieval.verify=6", "--set", "retrieval.verify_by=together",
                  "ask", world["files"]["p1_and_p4"], "Who is in this photo?", "--auto", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][0])
    assert sorted(f["name"] for f in row["found"]) == ["p1", "p4"]
    assert [q for q in asked if q.startswith("Who of")] == [asked[0]] and asked[1:] == ["Who is in this photo?"]
    assert asked[0].count("<") == 6  # all six candidates in one question
    assert prompts[-1][0] == "Who is in this photo?" and sorted(prompts[-1][1]) == ["p1", "p4"]
