"""`eval --pairs`: questions that hold several concepts at once, scored apart; and the caption
name precision of `eval --captions`."""

import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from plvmctl import answers, evaluate
from plvmctl.evaluate.items import NOBODY_SHARE, PAIR_KINDS
from plvmctl.lab.toy import write_testset


@pytest.fixture(scope="module")
def toyset(tmp_path_factory) -> Path:
    """Six held-out identities, two query photos each, four group photos."""
    return write_testset(tmp_path_factory.mktemp("pairs") / "set", 6, seed=3, queries_per_identity=2,
                         progress=False, negatives=2, groups=4)


def _scenes(root: Path) -> dict[str, dict]:
    import json

    return json.loads((root / "toy_world.json").read_text())["scenes"]


def test_a_toy_set_has_group_photos_of_test_identities_with_their_places(toyset):
    testset = evaluate.load_testset(toyset)
    groups = evaluate.group_photos(testset)
    assert [photo.name for photo in groups] == [f"group_img{i}.png" for i in range(1, 5)]
    names = {identity.name for identity in testset.identities}
    for photo, people in groups.items():
        assert 2 <= len(people) <= 3 and {name for name, _ in people} <= names
        places = [place for _, place in people]
        assert places == sorted(places, key=["left", "middle", "right"].index)  # left to right
        scene = _scenes(toyset)[photo.relative_to(toyset).as_posix()]
        assert {(p["name"], p["position"]) for p in scene["people"]} == set(people)
    assert testset.counts()["query_photos"] == 12  # the plvm-val part does not see the groups


def test_pair_items_ask_every_kind_with_the_truth_of_the_photo(toyset):
    testset = evaluate.load_testset(toyset)
    items = evaluate.pair_items(testset)
    kinds = Counter(item.kind for item in items)
    assert set(kinds) == set(PAIR_KINDS)
    assert kinds["yes"] == kinds["no"] == kinds["which"] == kinds["which3"] == 12  # one each per query photo
    assert kinds["both-yes"] == kinds["left"] == 4 and kinds["who4"] == 12 + 4
    assert evaluate.pair_items(testset) == items  # seeded
    truth = evaluate.photo_truth(testset)
    groups = evaluate.group_photos(testset)
    for item in items:
        named = evaluate.item_concepts(item)
        assert set(re.findall(r"<([\w-]+)>", item.question)) <= set(named)
        present = truth.get(item.image) or {name for name, _ in groups[item.image]}
        if item.kind in ("which", "which3"):
            assert item.expected in present and len(named) == (2 if item.kind == "which" else 3)
            assert sum(name in present for name in named) == 1
        elif item.kind == "who4":
            listed = re.findall(r"<([\w-]+)>", item.question)
            assert len(listed) == 4 and set(listed) == set(named)
            assert set(filter(None, item.expected.split(","))) == present & set(listed)
        elif item.kind in ("both-yes", "both-no"):
            a, b = re.findall(r"<([\w-]+)>", item.question)
            assert item.expected == ("yes" if {a, b} <= present else "no")
        elif item.kind == "left":
            a, b = re.findall(r"<([\w-]+)>", item.question)
            places = dict(groups[item.image])
            assert item.expected == ("yes" if ["left", "middle", "right"].index(places[a])
                                     < ["left", "middle", "right"].index(places[b]) else "no")
    nobody = sum(1 for item in items if item.kind == "who4" and not item.expected)
    assert 0 < nobody < 12  # some query photos list four people who are not in them (NOBODY_SHARE)
    assert NOBODY_SHARE < 0.5
    capped = evaluate.pair_items(testset, limit=2)
    assert Counter(item.kind for item in capped)["yes"] == 2 and Counter(i.kind for i in capped)["left"] == 2


def _log(tmp_path, answered: dict[str, str | None]) -> evaluate.ItemLog:
    log = evaluate.ItemLog(tmp_path / "log.jsonl")
    log.append([{"key": key, "mode": "generate", "answer": answer, "error": None}
                for key, answer in answered.items()])
    return log


def _item(kind: str, question: str, expected: str, image: str = "p.png", **extra) -> evaluate.EvalItem:
    names = re.findall(r"<([\w-]+)>", question)
    return evaluate.EvalItem(f"pair/{kind}/{image}/{question}", "pair", names[0], question, Path(image),
                             expected, kind=kind, **extra)


def test_pair_metrics_score_each_kind_from_the_answers_conclusion(tmp_path):
    items = [
        _item("which3", answers.which_of_question(["a", "b", "c"]), "b"),
        _item("who4", answers.who_of_question(["a", "b", "c", "d"]), "a,c"),
        _item("who4", answers.who_of_question(["a", "b", "c", "d"]), "", image="q.png"),
        _item("both-yes", answers.BOTH_HERE_QUESTION.format(a="a", b="b"), "yes"),
        _item("both-no", answers.BOTH_HERE_QUESTION.format(a="a", b="d"), "no"),
        _item("left", answers.LEFT_OF_QUESTION.format(a="a", b="b"), "yes"),
        _item("left", answers.LEFT_OF_QUESTION.format(a="b", b="a"), "no"),
    ]
    said = {
        items[0].key: "left <a> hair red other mismatch. right <b> hair red same match. <b> is in this photo.",
        items[1].key: "<a> hair red match. <c> is not here. <a> is in this photo.",  # misses c
        items[2].key: "Nobody.",
        items[3].key: "Yes, both are here.",
        items[4].key: "Yes.",
        items[5].key: "Yes.",
        items[6].key: "Hmm.",
    }
    scored = evaluate.pair_metrics(items, _log(tmp_path, said), {}, reasoning="comparison")
    assert scored["which3"] == {"accuracy": 1.0, "items": 1, "unparseable": 0}  # not the scratchpad's <a>
    who = scored["who4"]
    assert (who["precision"], who["recall"], who["exact"], who["nobody"]) == (1.0, 0.5, 0.5, 1.0)
    assert who["f1"] == pytest.approx(2 / 3)
    assert (scored["both"]["positive"], scored["both"]["negative"]) == (1.0, 0.0)
    assert scored["left_of"]["accuracy"] == 0.5 and scored["left_of"]["unparseable"] == 1
    plain = evaluate.pair_metrics(items[:1], _log(tmp_path / "x", said), {}, reasoning="none")
    assert plain["which3"]["accuracy"] == 0.0  # the whole answer's first name is <a>


def test_pairs_are_asked_and_scored_apart_from_the_single_concept_numbers(tmp_path):
    from test_evaluate import FakeApi, FakeEngine, FakeRequest, FakeRuntime, make_testset

    @dataclasses.dataclass
    class Request(FakeRequest):
        concepts: tuple = ()

    class Pairs(FakeEngine):
        def _answer(self, request):
            if request.question.startswith("Which of"):
                return f"<{Path(request.image).parent.name}> is in this photo."
            return super()._answer(request)

    class Api(FakeApi):
        AskRequest = Request

        def Engine(self, runtime, concepts, descriptions=None, literal_names=False):  # noqa: N802
            return Pairs(self, concepts, descriptions, literal_names)

    root = make_testset(tmp_path / "set")
    testset = evaluate.load_testset(root)
    items = evaluate.pair_items(testset)
    assert Counter(item.kind for item in items) == {"yes": 3, "no": 3, "which": 3, "which3": 3}  # 3 ids: no who4
    yes, no, which = items[:3]
    assert (yes.expected, no.expected, which.expected) == ("yes", "no", yes.identity)
    assert yes.concepts == (no.identity,) and no.concepts == (yes.identity,)
    assert set(evaluate.item_concepts(which)) == {yes.identity, no.identity}
    assert len(evaluate.pair_items(testset, limit=1)) == 4
    assert answers.parse_which("Yes, <bob> and then alice", ["alice", "bob"]) == "bob"
    assert answers.parse_which("nobody", ["alice", "bob"]) is None

    plain = evaluate.run_evaluation(FakeRuntime(), root, ["plvm"], tmp_path / "plain", progress=False,
                                    engine_api=Api())
    both = evaluate.run_evaluation(FakeRuntime(), root, ["plvm"], tmp_path / "both", progress=False,
                                   engine_api=Api(), pairs=True)
    single = ("recognition", "text_qa", "visual_qa")
    assert {k: plain["methods"]["plvm"][k] for k in single} == {k: both["methods"]["plvm"][k] for k in single}
    pairs = both["methods"]["plvm"]["pairs"]
    assert pairs["recognition"]["positive_total"] == pairs["recognition"]["negative_total"] == 3
    assert pairs["which"] == {"accuracy": 1.0, "items": 3, "unparseable": 0}
    assert pairs["which3"] == {"accuracy": 1.0, "items": 3, "unparseable": 0}
    assert pairs["who4"]["items"] == 0 and pairs["left_of"]["items"] == 0
    report = (tmp_path / "both" / "results.md").read_text()
    assert "## Several concepts in one question" in report and "## Several concepts" not in \
        (tmp_path / "plain" / "results.md").read_text()


def test_caption_name_precision_counts_names_of_people_who_are_not_there(toyset, tmp_path):
    testset = evaluate.load_testset(toyset)
    items = evaluate.caption_items(testset)
    truth = evaluate.photo_truth(testset)
    assert len(items) == 12
    for item in items:
        present = set(item.expected.split(","))
        assert present == truth[item.image] and present < set(item.concepts)
        assert len(set(item.concepts) - present) == 1  # one test identity who is not there
    first, second, third = items[:3]
    absent = next(name for name in first.concepts if name not in truth[first.image])
    said = {first.key: f"<{first.identity}> stands next to <{absent}>.", second.key: f"<{second.identity}> waves.",
            third.key: f"left hair red same match. no, i do not see <{third.identity}> here."}
    names = [identity.name for identity in testset.identities]
    scored = evaluate.caption_metrics(items[:3], _log(tmp_path, said), {}, names, reasoning="comparison")
    assert (scored["recall"], scored["names_said"], scored["names_said_absent"]) == (2 / 3, 3, 1)
    assert scored["name_precision"] == pytest.approx(2 / 3) and scored["photos_naming_absent"] == pytest.approx(1 / 3)
    assert scored["missed_by_concept"] == {third.identity: 1}  # a denial does not name anyone as there
