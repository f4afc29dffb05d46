"""The evaluation protocol, parsers, metrics and report, with a fake engine (no model)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from plvmctl import evaluate
from plvmctl.answers import (
    clean_description,
    conclusion,
    mcq_prompt,
    parse_mcq_answer,
    parse_mcq_prompt,
    parse_yes_no,
    pick_by_likelihood,
    verdict_start,
)
from plvmctl.errors import PlvmError
from plvmctl.evaluate import (
    load_testset,
    mcq_metrics,
    recipe_mcq_mode,
    recognition_items,
    recognition_metrics,
    run_evaluation,
)
from plvmctl.methods import METHODS
from plvmctl.recipe import load_recipe, recipe_from_dict

PLVM_VAL = Path(__file__).parents[1] / ".." / "shared" / "testsets" / "plvm-val"


# --------------------------------------------------------------------------------------------
# Parsers


@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"),
    ("yes.", "yes"),
    ("Yes, <alice> is in this photo.", "yes"),
    ("YES!!!", "yes"),
    ("**Yes**", "yes"),
    ('"Yes"', "yes"),
    ("Answer: yes", "yes"),
    ("Yeah, that's her.", "yes"),
    ("Certainly!", "yes"),
    ("<alice> is in this photo.", "yes"),
    ("I can see <alice> on the left.", "yes"),
    ("No.", "no"),
    ("no, it is someone else", "no"),
    ("Nope", "no"),
    ("Not at all.", "no"),
    ("Absolutely not.", "no"),
    ("I don't see <alice> in this photo.", "no"),
    ("I do not see her here.", "no"),
    ("<alice> is not in this photo.", "no"),
    ("<alice> isn\u2019t in the photo.", "no"),
    ("There is no sign of <alice>.", "no"),
    ("The person in the photo is <bob>, not <alice>.", "no"),
    ("left hair red red same skin tan tan same match. Yes, <alice> is in this photo.", "yes"),
    ("left hair red red same match right hair none blue different mismatch. no, < > is not here.", "no"),
    ("middle hair red blue different mismatch. No.", "no"),
    ("I'm not sure.", None),
    ("It is hard to tell from this angle.", None),
    ("Maybe", None),
    ("Yesterday was sunny.", None),
    ("Noted.", None),
    ("This is a photo of a man.", None),
    ("", None),
    (None, None),
    ("...", None),
])
def test_parse_yes_no(answer, expected):
    assert parse_yes_no(answer) == expected


CLOTHES = [("A", "shirt"), ("B", "crop top"), ("C", "hoodie")]


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"),
    ("b", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("[C]", "C"),
    ("B) crop top", "B"),
    ("B. crop top", "B"),
    ("Answer: B", "B"),
    ("The answer is (C).", "C"),
    ("Option C", "C"),
    ("**A**", "A"),
    ("I think the answer is C, the hoodie.", "C"),
    ("crop top", "B"),
    ("Crop top.", "B"),
    ("The shirt", "A"),
    ("A shirt", "A"),
    ("A hoodie", "C"),  # "A" is an article here, the text names option C
    ("B crop top", "B"),
    ("crop top B", "B"),  # the value, then its letter (the pocket model's answers)
    ("crop top (B).", "B"),
    ("shirt C", "C"),  # the letter counts: it is the answer the instruction asks for
    ("jacket B", None),  # not an option's text before the letter
    ("crop top D", None),
    ("D", None),  # not one of the options
    ("D. jacket", None),
    ("a jacket", None),
    ("None of the above", None),
    ("Optionally the shirt", None),
    ("", None),
    (None, None),
])
def test_parse_mcq_answer(answer, expected):
    assert parse_mcq_answer(answer, CLOTHES) == expected


def test_parse_mcq_answer_with_names_in_options():
    options = {"A": "<alice>", "B": "the person next to <alice>"}
    assert parse_mcq_answer("<alice>", options) == "A"
    assert parse_mcq_answer("The person next to <alice>.", options) == "B"
    assert parse_mcq_answer("C", options) is None


def test_pick_by_likelihood_ties_and_nan():
    assert pick_by_likelihood(["A", "B", "C"], [-3.0, -1.0, -2.0]) == "B"
    assert pick_by_likelihood(["A", "B"], [-1.0, -1.0]) == "A"
    assert pick_by_likelihood(["A", "B"], [float("nan"), -9.0]) == "B"


def test_parse_mcq_prompt_reads_back_the_options():
    options = [("A", "shirt"), ("B", "crop top"), ("C", "hoodie")]
    assert parse_mcq_prompt(mcq_prompt("What is <a> wearing?\nLook closely.", options)) == tuple(options)


def test_recipe_mcq_mode_comes_from_the_recipe():
    assert recipe_mcq_mode(load_recipe("pocket")) == "generate"  # it says the value first
    assert recipe_mcq_mode(load_recipe("tiny")) == "likelihood"
    with pytest.raises(PlvmError, match="eval.mcq"):
        recipe_mcq_mode(load_recipe("tiny", ["eval.mcq=vote"]))


def test_mcq_prompt_layout():
    prompt = mcq_prompt("What is <a> wearing?", [("A", "shirt"), ("B", "hoodie")])
    assert prompt == ("What is <a> wearing?\nA. shirt\nB. hoodie\n"
                      "Answer with the option's letter from the given choices directly.")


def test_clean_description():
    assert clean_description("A woman with blond hair.") == "a woman with blond hair"
    assert clean_description("This is a man in a suit.\nMore.") == "a man in a suit"
    assert clean_description('"The person is smiling"') == "smiling"
    assert clean_description("") == ""


# --------------------------------------------------------------------------------------------
# Metrics


def test_recognition_metrics_mixed_with_unparseable():
    pairs = [("yes", "yes"), ("yes", "no"), ("yes", None),
             ("no", "no"), ("no", "no"), ("no", None), ("no", "yes")]
    metrics = recognition_metrics(pairs)
    assert metrics["positive"] == pytest.approx(1 / 3)
    assert metrics["negative"] == pytest.approx(2 / 4)
    assert metrics["mean"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert (metrics["positive_correct"], metrics["positive_total"]) == (1, 3)
    assert (metrics["negative_correct"], metrics["negative_total"]) == (2, 4)
    assert metrics["unparseable"] == 2


def test_recognition_metrics_all_yes_and_all_no():
    expected = ["yes", "yes", "no", "no", "no"]
    all_yes = recognition_metrics([(e, "yes") for e in expected])
    assert (all_yes["positive"], all_yes["negative"], all_yes["mean"]) == (1.0, 0.0, 0.5)
    all_no = recognition_metrics([(e, "no") for e in expected])
    assert (all_no["positive"], all_no["negative"], all_no["mean"]) == (0.0, 1.0, 0.5)
    all_unparseable = recognition_metrics([(e, None) for e in expected])
    assert (all_unparseable["positive"], all_unparseable["negative"]) == (0.0, 0.0)
    assert all_unparseable["unparseable"] == 5


def test_recognition_metrics_empty_class_gives_none():
    metrics = recognition_metrics([("no", "no"), ("no", "yes")])
    assert metrics["positive"] is None and metrics["mean"] is None
    assert metrics["negative"] == 0.5


def test_mcq_metrics():
    metrics = mcq_metrics([("A", "A"), ("B", None), ("C", "A"), ("B", "B")])
    assert metrics == {"accuracy": 0.5, "correct": 2, "total": 4, "unparseable": 1}
    assert mcq_metrics([])["accuracy"] is None


# --------------------------------------------------------------------------------------------
# The real plvm-val set


@pytest.mark.skipif(not PLVM_VAL.is_dir(), reason="plvm-val is not in ../shared/testsets")
def test_plvm_val_counts():
    testset = load_testset(PLVM_VAL)
    folder = PLVM_VAL / "validation_recognition"
    folders = sorted(d for d in folder.iterdir() if d.is_dir())
    queries = [f for d in folders for f in d.iterdir() if f.name.startswith("query_img")]

    assert testset.is_plvm_val
    assert len(testset.identities) == len(folders) == 47
    assert sum(1 for i in testset.identities if i.queries) == 46
    assert [i.name for i in testset.identities if not i.queries] == ["Nancy"]
    assert testset.query_count == len(queries) == 346
    assert sum(len(i.references) for i in testset.identities) == 49
    assert all(i.reference.name == "ref_img.png" for i in testset.identities)
    assert (len(testset.visual), len(testset.text)) == (350, 71)

    missing = [row for row in testset.visual if row.missing]
    assert len(missing) == 6
    assert {row.missing for row in missing} == {
        "missing file validation_recognition/Drake/query_img1.png",
        "missing file validation_recognition/Hemsworth/query_img7.png",
        "missing file validation_recognition/Jeremy_Renner/query_img6.png",
    }
    assert not any(row.missing for row in testset.text)

    items = recognition_items(testset)
    assert len(items) == len(folders) * len(queries) == 47 * 346
    assert sum(1 for item in items if item.expected == "yes") == len(queries)
    assert len({item.key for item in items}) == len(items)

    sampled = recognition_items(testset, neg_per_identity=5, seed=3)
    assert len(sampled) == 346 + 47 * 5
    assert [i.key for i in sampled] == [i.key for i in recognition_items(testset, 5, seed=3)]
    assert [i.key for i in sampled] != [i.key for i in recognition_items(testset, 5, seed=4)]

    first = evaluate.build_items(testset)["visual"][0]
    assert first.question == ("What is <Billie> wearing in this photo?\nA. shirt\nB. crop top\n"
                              "C. hoodie\nAnswer with the option's letter from the given choices "
                              "directly.")
    assert first.image == PLVM_VAL / "validation_recognition/Billie/query_img1.jpg"


# --------------------------------------------------------------------------------------------
# A fake runtime and engine implementing the interface run_evaluation uses


@dataclass
class FakeRequest:
    question: str
    image: object = None


@dataclass
class FakeResult:
    request: FakeRequest
    answer: str | None = None
    error: str | None = None


@dataclass
class FakeScores:
    request: FakeRequest
    logprobs: list | None = None
    error: str | None = None


class FakeConcept:
    num_context = 4


class FakeRuntime:
    def __init__(self, name: str = "fake"):
        # one reference photo per concept: bob's ref_img0.png is never encoded (plvm-auto and plvm
        # would make a concept of every ref_img* up to aligner.max_references)
        self.recipe = recipe_from_dict({"generation": {"batch_size": 2}, "aligner": {"max_references": 1}}, name=name)
        self.encoded: list[str] = []

    def encode_concept(self, name, reference):
        assert Path(reference).name == "ref_img.png"
        self.encoded.append(name)
        return FakeConcept()


RECOGNITION = re.compile(r"Is <([\w-]+)> in this photo\?")


class FakeEngine:
    """Soft-prompt engines answer recognition right (except <carol> on bob's photo: "Hmm.");
    the text-prompt engine always says Yes, the no-info engine always No. Option scoring
    always prefers A; MCQ generation always answers "Answer: B"."""

    def __init__(self, api, concepts, descriptions, literal_names):
        self.api, self.concepts = api, concepts
        self.descriptions, self.literal_names = descriptions or {}, literal_names

    def _answer(self, request: FakeRequest) -> str:
        if request.question.startswith("Describe"):
            return "A person with short hair."
        match = RECOGNITION.fullmatch(request.question)
        if not match:
            return "Answer: B"
        name, owner = match.group(1), Path(request.image).parent.name
        if self.literal_names:
            return "No."
        if self.descriptions:
            assert name in self.descriptions
            return "Yes"
        assert name in self.concepts
        if name == "carol" and owner == "bob":
            return "Hmm."
        return f"Yes, <{name}> is in this photo." if owner == name else f"No, I don't see <{name}>."

    def ask(self, requests, batch_size=None, max_new_tokens=None, progress=False):
        self.api.asked.extend(r.question for r in requests)
        return [FakeResult(r, self._answer(r)) for r in requests]

    def score_options(self, requests, options, batch_size=None, progress=False):
        self.api.asked.extend(r.question for r in requests)
        return [FakeScores(r, [-float(i) for i in range(len(opts))])
                for r, opts in zip(requests, options)]


class FakeApi:
    AskRequest = FakeRequest

    def __init__(self):
        self.asked: list[str] = []

    def Engine(self, runtime, concepts, descriptions=None, literal_names=False):  # noqa: N802
        return FakeEngine(self, concepts, descriptions, literal_names)


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 100, 50)).save(path)


def make_testset(root: Path) -> Path:
    """alice (2 queries), bob (1 query, 2 references), carol (reference only); 4 visual rows
    (one with a missing photo) and 2 text rows, in the plvm-val layout."""
    folder = root / "validation_recognition"
    for rel in ["alice/ref_img.png", "alice/query_img1.png", "alice/query_img2.jpg",
                "bob/ref_img.png", "bob/ref_img0.png", "bob/query_img1.png", "carol/ref_img.png"]:
        _image(folder / rel)
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("not an identity")
    v = "validation_recognition"
    visual = [
        {"ref_img": f"{v}/alice/ref_img.png", "query_img": f"{v}/alice/query_img1.png",
         "question": "What is <sks> wearing?", "multiple_choice": {"A": "shirt", "B": "hoodie"},
         "correct_answer": "A"},
        {"ref_img": f"{v}/bob/ref_img.png", "query_img": f"{v}/bob/query_img1.png",
         "question": "Who is taller?",
         "multiple_choice": {"A": "<sks>", "B": "the person next to <sks>", "C": "nobody"},
         "correct_answer": "B"},
        {"ref_img": f"{v}/bob/ref_img.png", "query_img": f"{v}/bob/query_img9.png",
         "question": "Is <sks> smiling?", "multiple_choice": {"A": "yes", "B": "no"},
         "correct_answer": "A"},
        {"ref_img": f"{v}/alice/ref_img.png", "query_img": f"{v}/alice/query_img2.jpg",
         "question": "Where is <sks>?", "multiple_choice": {"A": "beach", "B": "office"},
         "correct_answer": "A"},
    ]
    text = [
        {"ref_img": f"{v}/alice/ref_img.png", "question": "What is <sks>'s hair color?",
         "multiple_choice": {"A": "black", "B": "brown"}, "correct_answer": "A"},
        {"ref_img": f"{v}/carol/ref_img.png", "question": "Does <sks> wear glasses?",
         "multiple_choice": {"A": "yes", "B": "no"}, "correct_answer": "B"},
    ]
    (folder / "query_ques.json").write_text(json.dumps(visual))
    (folder / "non_query_ques.json").write_text(json.dumps(text))
    return root


def test_load_synthetic_testset(tmp_path):
    testset = load_testset(make_testset(tmp_path / "set"))
    assert [i.name for i in testset.identities] == ["alice", "bob", "carol"]
    assert [q.name for q in testset.identities[0].queries] == ["query_img1.png", "query_img2.jpg"]
    assert [r.name for r in testset.identities[1].references] == ["ref_img.png", "ref_img0.png"]
    assert not testset.is_plvm_val
    assert [row.missing for row in testset.visual] == [
        None, None, "missing file validation_recognition/bob/query_img9.png", None]
    items = recognition_items(testset)
    assert len(items) == 3 * 3
    assert [i.key for i in items if i.expected == "yes"] == [
        "rec/alice/alice/query_img1.png", "rec/alice/alice/query_img2.jpg",
        "rec/bob/bob/query_img1.png"]
    assert len(recognition_items(testset, neg_per_identity=1)) == 3 + 3
    assert load_testset(tmp_path / "set" / "validation_recognition").root == tmp_path / "set"


def test_load_testset_errors(tmp_path):
    with pytest.raises(PlvmError, match="test set not found at .*pass --testset DIR"):
        load_testset(tmp_path / "nowhere")
    root = make_testset(tmp_path / "bad")
    (root / "validation_recognition" / "query_ques.json").write_text("[{\"question\": 1}]")
    with pytest.raises(PlvmError, match="row 0: needs the keys"):
        load_testset(root)


def test_limit_balances_recognition(tmp_path):
    testset = load_testset(make_testset(tmp_path / "set"))
    items = evaluate.build_items(testset, limit=2)
    assert [i.expected for i in items["recognition"]] == ["yes", "no"]
    assert len(items["recognition"]) == len(items["text"]) == len(items["visual"]) == 2


# --------------------------------------------------------------------------------------------
# End to end with the fake


def _table_row(markdown: str, method: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {method} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_run_evaluation_end_to_end(tmp_path):
    root = make_testset(tmp_path / "set")
    out = tmp_path / "out"
    runtime, api = FakeRuntime(), FakeApi()
    results = run_evaluation(runtime, root, ["plvm", "llava-text", "llava-none"], out,
                             progress=False, engine_api=api)

    plvm = results["methods"]["plvm"]
    assert plvm["recognition"]["positive"] == 1.0
    assert plvm["recognition"]["negative"] == pytest.approx(5 / 6)
    assert plvm["recognition"]["mean"] == pytest.approx(11 / 12)
    assert plvm["recognition"]["unparseable"] == 1
    assert plvm["unparseable"]["examples"] == [
        {"key": "rec/carol/bob/query_img1.png", "task": "recognition", "answer": "Hmm."}]
    assert plvm["text_qa"] == {"accuracy": 0.5, "correct": 1, "total": 2, "unparseable": 0}
    assert plvm["visual_qa"]["accuracy"] == pytest.approx(2 / 3)
    assert plvm["visual_qa"]["total"] == 3
    assert plvm["tokens_per_concept"] == 4
    assert plvm["seconds_per_concept"] >= 0
    assert sorted(runtime.encoded) == ["alice", "alice", "bob", "carol"]  # 1 warm-up
    assert plvm["skipped"]["total"] == 1
    assert plvm["skipped"]["reasons"] == [{
        "task": "visual", "reason": "missing file validation_recognition/bob/query_img9.png",
        "count": 1}]

    text = results["methods"]["llava-text"]
    assert (text["recognition"]["positive"], text["recognition"]["negative"]) == (1.0, 0.0)
    assert text["tokens_per_concept"] == 16  # the fake runtime has no tokenizer
    assert text["details"]["descriptions"]["bob"] == "a person with short hair"
    none = results["methods"]["llava-none"]
    assert (none["recognition"]["positive"], none["recognition"]["negative"]) == (0.0, 1.0)
    assert none["tokens_per_concept"] == 0

    # 9 recognition + 2 text + 3 visual per method, plus 3 descriptions for llava-text
    assert len(api.asked) == 14 * 3 + 3
    assert "What is <alice> wearing?\nA. shirt\nB. hoodie\nAnswer with" in "\n".join(api.asked)
    assert results["counts"]["recognition_items"] == 9
    assert "paper" not in results

    for name in ("results.json", "results.md", "results.png", "items/plvm.jsonl",
                 "items/llava-text.jsonl", "items/llava-none.jsonl",
                 "cache/llava-text-descriptions.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["methods"]["plvm"]["text_qa"][
        "accuracy"] == 0.5
    lines = (out / "items" / "plvm.jsonl").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(line)["error"] is None for line in lines)

    markdown = (out / "results.md").read_text()
    assert "| Method | Recognition Pos | Recognition Neg | Recognition Mean | Text QA | Visual QA" \
           in markdown
    assert _table_row(markdown, "plvm") == ["plvm", "100.0", "83.3", "91.7", "50.0", "66.7",
                                            _table_row(markdown, "plvm")[6], "4"]
    assert _table_row(markdown, "llava-none")[1:] == ["0.0", "100.0", "50.0", "50.0", "66.7",
                                                      "0", "0"]
    assert ("- plvm: 1 (visual QA: 1 × missing file validation_recognition/bob/query_img9.png)"
            in markdown)
    assert "paper: PLVM" not in markdown

    chart = Image.open(out / "results.png")
    assert chart.size == (960, 540)
    colours = {colour for _, colour in chart.convert("RGB").getcolors(1 << 20)}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= colours  # one colour per method

    # Resume: everything is in the item logs, so nothing is asked again.
    api.asked.clear()
    again = run_evaluation(runtime, root, ["plvm", "llava-text", "llava-none"], out,
                           progress=False, engine_api=api)
    assert api.asked == []
    assert all(again["methods"][m]["asked_this_run"] == 0 for m in again["methods"])
    for name in ("plvm", "llava-text", "llava-none"):
        for key in ("recognition", "text_qa", "visual_qa", "skipped"):
            assert again["methods"][name][key] == results["methods"][name][key]


def test_resume_after_a_crash_mid_file(tmp_path):
    root = make_testset(tmp_path / "set")
    out = tmp_path / "out"
    api = FakeApi()
    first = run_evaluation(FakeRuntime(), root, ["plvm"], out, progress=False, engine_api=api)
    log = out / "items" / "plvm.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # torn last line
    api.asked.clear()
    second = run_evaluation(FakeRuntime(), root, ["plvm"], out, progress=False, engine_api=api)
    assert len(api.asked) == 14 - 4
    assert second["methods"]["plvm"]["recognition"] == first["methods"]["plvm"]["recognition"]
    assert second["methods"]["plvm"]["visual_qa"] == first["methods"]["plvm"]["visual_qa"]
    records = [json.loads(line) for line in log.read_text().splitlines()[:4]]
    assert len(records) == 4  # the file stays one record per line


def test_generate_mode_reuses_recognition_answers(tmp_path):
    root = make_testset(tmp_path / "set")
    out = tmp_path / "out"
    api = FakeApi()
    run_evaluation(FakeRuntime(), root, ["llava-none"], out, progress=False, engine_api=api)
    api.asked.clear()
    results = run_evaluation(FakeRuntime(), root, ["llava-none"], out, mcq="generate",
                             progress=False, engine_api=api)
    assert len(api.asked) == 2 + 3  # only the MCQ items, now by generation ("Answer: B")
    none = results["methods"]["llava-none"]
    assert none["text_qa"]["accuracy"] == 0.5
    assert none["visual_qa"]["accuracy"] == pytest.approx(1 / 3)
    assert none["recognition"]["negative"] == 1.0


def test_run_evaluation_refuses_bad_requests(tmp_path):
    root = make_testset(tmp_path / "set")
    api = FakeApi()
    with pytest.raises(PlvmError, match="unknown method 'gpt'"):
        run_evaluation(FakeRuntime(), root, ["gpt"], tmp_path / "a", engine_api=api)
    if "yollava" not in METHODS:
        with pytest.raises(PlvmError, match="'yollava' is not available"):
            run_evaluation(FakeRuntime(), root, ["yollava"], tmp_path / "a", engine_api=api)
    with pytest.raises(PlvmError, match="--mcq"):
        run_evaluation(FakeRuntime(), root, ["plvm"], tmp_path / "a", mcq="vote", engine_api=api)
    run_evaluation(FakeRuntime(), root, ["llava-none"], tmp_path / "b", progress=False,
                   engine_api=api)
    other = make_testset(tmp_path / "other-set")
    with pytest.raises(PlvmError, match="holds answers for testset .*set', not .*other-set'"):
        run_evaluation(FakeRuntime(), other, ["llava-none"], tmp_path / "b",
                       progress=False, engine_api=api)


def test_unavailable_concept_is_skipped_with_reason(tmp_path):
    root = make_testset(tmp_path / "set")

    class PickyRuntime(FakeRuntime):
        def encode_concept(self, name, reference):
            if name == "carol":
                raise PlvmError("corrupt or truncated image")
            return super().encode_concept(name, reference)

    results = run_evaluation(PickyRuntime(), root, ["plvm"], tmp_path / "out", progress=False,
                             engine_api=FakeApi())
    plvm = results["methods"]["plvm"]
    # carol's 3 recognition pairs and her text row are skipped; the missing photo row too
    assert plvm["skipped"]["by_task"] == {"recognition": 3, "text": 1, "visual": 1}
    assert plvm["recognition"]["mean"] == 1.0
    assert plvm["concepts"]["unavailable"] == {
        "carol": "concept could not be made: corrupt or truncated image"}


@pytest.mark.skipif(not PLVM_VAL.is_dir(), reason="plvm-val is not in ../shared/testsets")
def test_report_on_plvm_val_has_paper_rows(tmp_path):
    results = run_evaluation(FakeRuntime(), PLVM_VAL, ["llava-none"], tmp_path / "out", limit=3,
                             progress=False, engine_api=FakeApi())
    assert results["counts"]["recognition_items"] == 3
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| *paper: PLVM* | 89.5 | 82.1 | 85.8 | 85.9 | 77.5 | 0.006 | 16 |" in markdown
    assert "*paper: Yo'LLaVA*" in markdown


# --------------------------------------------------------------------------------------------
# The command line


class FakeApp:
    def __init__(self, runtime):
        self.runtime = runtime
        self.recipe = runtime.recipe


def test_cli_eval(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from plvmctl.cli.evaluate import eval_command

    api = FakeApi()
    monkeypatch.setattr("plvmctl.evaluate.run.load_engine_api", lambda: api)
    root = make_testset(tmp_path / "set")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(eval_command, ["--testset", str(root), "--method", "plvm,llava-none",
                                          "--method", "plvm", "--out", str(out),
                                          "--batch-size", "3"], obj=FakeApp(FakeRuntime("tiny")))
    assert result.exit_code == 0, result.output
    assert "| Method | Recognition Pos" in result.output
    assert "| plvm | 100.0 | 83.3 | 91.7 | 50.0 | 66.7 |" in result.output
    assert "| llava-none | 0.0 | 100.0 | 50.0 |" in result.output
    assert "meaningless" in result.output  # the tiny-recipe warning
    assert str(out) in result.output
    saved = json.loads((out / "results.json").read_text())
    assert saved["method_order"] == ["plvm", "llava-none"]
    assert saved["protocol"]["batch_size"] == 3

    bad = runner.invoke(eval_command, ["--testset", str(root), "--method", "nope"],
                        obj=FakeApp(FakeRuntime()))
    assert isinstance(bad.exception, PlvmError) and "unknown method" in str(bad.exception)
    missing = runner.invoke(eval_command, ["--testset", str(tmp_path / "void")],
                            obj=FakeApp(FakeRuntime()))
    assert isinstance(missing.exception, PlvmError)
    assert "test set not found" in str(missing.exception)


def test_paper_rows_only_for_the_real_set(tmp_path):
    from plvmctl.evaluate.testset import _looks_like_plvm_val

    (tmp_path / "README.md").write_text("# Toy plvm-val: a synthetic evaluation set\n")
    assert not _looks_like_plvm_val(tmp_path)
    (tmp_path / "README.md").write_text("# plvm-val: the PLVM evaluation set (real photos)\n")
    assert _looks_like_plvm_val(tmp_path)


def test_verdict_start_splits_the_reasoning_from_the_verdict():

    answer = "left red hair red same tan skin pale different mismatch. No, <a> is not here."
    assert answer[verdict_start(answer):].startswith("No, <a>")
    assert verdict_start("Yes, that is <a>.") == 0
    assert verdict_start("I cannot tell.") is None


def test_conclusion_leaves_out_the_comparisons_a_model_writes_first():
    compared = ("left red hair red same tan skin pale different mismatch middle red hair red same "
                "pale skin pale same match. yes, <a> is in this photo.")
    assert conclusion(compared) == "yes, <a> is in this photo."
    assert conclusion("left red hair red same match. right") == "right"  # "Where is <a>?"
    assert conclusion(compared, "none") == compared
    cut = "left red hair red same tan skin pale different mismatch middle red hair"  # length limit
    assert conclusion(cut) == cut and conclusion(cut + " red same match.") == cut + " red same match."
    assert conclusion("No, <a> is not in this photo.") == "No, <a> is not in this photo."
    assert conclusion("a perfect match for <a>, who is on the left.") == "a perfect match for <a>, who is on the left."
    with pytest.raises(ValueError, match="reasoning must be one of"):
        conclusion(compared, "chain")
