"""No test identity in any training: where the trained baselines' negatives come from, and
plvm-auto's store of people who are not in the test set."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from plvmctl.errors import PlvmError
from plvmctl.evaluate import load_testset, run_evaluation
from plvmctl.methods import METHODS, MethodContext, PreparedMethod, Reference, negative_pool
from plvmctl.methods.base import train_per_identity
from plvmctl.methods.yollava.trainer import YollavaConfig
from test_evaluate import FakeApi, FakeRuntime, make_testset


def _with_negatives(root: Path, count: int = 3) -> Path:
    for index in range(count):
        (root / "negatives").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10 * index, 200, 30)).save(root / "negatives" / f"other{index}.png")
    return root


def test_toy_testset_writes_negatives_of_training_part_people_only(tmp_path):
    from plvmctl.lab.toy import heldout_identities, training_identities, write_testset

    root = write_testset(tmp_path / "ts", 4, 0, queries_per_identity=1, progress=False)
    testset = load_testset(root)
    people = {photo.stem for photo in testset.negatives.iterdir()}
    assert testset.negatives == root / "negatives" and len(people) == 4
    assert people <= {identity.name for identity in training_identities()}
    assert not people & {identity.name for identity in heldout_identities()}
    assert not people & {identity.name for identity in testset.identities}


def test_the_negative_pool_is_never_the_test_identities(tmp_path):
    given, folder = tmp_path / "given", tmp_path / "set-negatives"
    given.mkdir(), folder.mkdir()
    assert negative_pool("yollava", YollavaConfig(), given, folder).folder == given  # the command line first
    assert negative_pool("yollava", YollavaConfig(negatives_dir=str(given)), None, folder).folder == given
    assert negative_pool("yollava", YollavaConfig(index="x.faiss"), None, folder).index == "x.faiss"
    assert negative_pool("yollava", YollavaConfig(), None, folder).folder == folder
    with pytest.raises(PlvmError, match="yollava trains on photos of other people and none are given: "
                                        "pass --negatives DIR"):
        negative_pool("yollava", YollavaConfig(), None, None)
    with pytest.raises(PlvmError, match="negatives folder not found"):
        negative_pool("myvlm", YollavaConfig(), tmp_path / "nowhere", None)


@pytest.mark.parametrize("method", ["yollava", "myvlm", "mcllava"])
def test_a_trained_method_without_negatives_is_refused_before_anything_is_asked(tmp_path, method):
    root = make_testset(tmp_path / "set")
    api = FakeApi()
    with pytest.raises(PlvmError, match=f"^{method} trains on photos of other people and none are given"):
        run_evaluation(FakeRuntime(), root, ["plvm", method], tmp_path / "out", progress=False, engine_api=api)
    assert api.asked == [] and not (tmp_path / "out" / "items").exists()


def test_eval_gives_a_trained_method_the_test_sets_negatives_or_the_given_folder(tmp_path, monkeypatch):
    root = _with_negatives(make_testset(tmp_path / "set"))
    seen = []

    def fake_yollava(context):
        seen.append(context.negatives)
        return PreparedMethod("yollava", context.engine_api.Engine(context.runtime, {"alice": 1, "bob": 1, "carol": 1}),
                              1.0, 4.0, details={"negatives": context.negatives.origin})

    monkeypatch.setitem(METHODS, "yollava", fake_yollava)
    results = run_evaluation(FakeRuntime(), root, ["yollava"], tmp_path / "a", progress=False, engine_api=FakeApi())
    assert seen[-1].folder == root / "negatives"
    assert results["methods"]["yollava"]["negatives"].startswith("the test set's negatives/ folder")
    other = _with_negatives(tmp_path / "elsewhere")
    results = run_evaluation(FakeRuntime(), root, ["yollava"], tmp_path / "b", progress=False,
                             engine_api=FakeApi(), negatives=other / "negatives")
    assert seen[-1].folder == other / "negatives"
    assert results["methods"]["yollava"]["negatives"].startswith("the folder given with --negatives")


class SavedConcept:
    def __init__(self):
        self.meta = SimpleNamespace(extra={})

    def save(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text("not a concept")


@pytest.mark.parametrize("pool_size", [3, 1])
def test_training_takes_its_negatives_from_the_pool_only(tmp_path, pool_size):
    root = _with_negatives(make_testset(tmp_path / "set"), pool_size)
    testset = load_testset(root)
    references = [Reference(identity.name, identity.reference) for identity in testset.identities]
    context = MethodContext(runtime=FakeRuntime(), references=references, cache_dir=tmp_path / "cache",
                            engine_api=FakeApi(),
                            negatives=negative_pool("yollava", YollavaConfig(), None, testset.negatives))
    given = {}

    class Trained:
        def __init__(self):
            self.concept = SavedConcept()
            self.seconds = {"total": 1.0}

    def train(name, positives, negatives, out):
        given[name] = list(negatives)
        return Trained()

    made = train_per_identity(context, "yollava", YollavaConfig(), train)
    assert sorted(made.concepts) == ["alice", "bob", "carol"]
    pool = sorted((root / "negatives").iterdir())
    test_photos = {photo for identity in testset.identities for photo in (*identity.references, *identity.queries)}
    for name, negatives in given.items():
        assert sorted(negatives) == pool, name
        assert not set(negatives) & test_photos
