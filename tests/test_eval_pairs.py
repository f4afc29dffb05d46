"""`eval --pairs`: questions that hold several concepts at once, scored apart."""

import dataclasses
from pathlib import Path


def test_pair_items_hold_two_concepts_and_are_scored_apart(tmp_path):
    from test_evaluate import FakeApi, FakeEngine, FakeRequest, FakeRuntime, make_testset

    from plvmctl import answers, evaluate

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
    assert len(items) == 3 * 3  # three query photos, three items each
    yes, no, which = items[:3]
    assert (yes.expected, no.expected, which.expected) == ("yes", "no", yes.identity)
    assert yes.concepts == (no.identity,) and no.concepts == (yes.identity,)
    assert set(evaluate.item_concepts(which)) == {yes.identity, no.identity}
    assert evaluate.pair_items(testset, seed=0) == items  # seeded
    assert len(evaluate.pair_items(testset, limit=1)) == 3
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
    report = (tmp_path / "both" / "results.md").read_text()
    assert "## Two concepts in one question" in report and "## Two concepts" not in \
        (tmp_path / "plain" / "results.md").read_text()
