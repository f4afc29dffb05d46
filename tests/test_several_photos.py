"""A concept from several reference photos: `encode a b c --name x`, `concepts add-photo`,
bad photos among good ones, and `find`'s index holding every photo's key."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.concept import Concept
from plvmctl.concept_index import KEY_PART, KEYS_PART, KeyIndex, StoreIndex, concept_keys
from plvmctl.fileio import sha256_file
from plvmctl.recipe import load_recipe
from plvmctl.references import CONTEXT_PART, SHA256_META, encode_photos
from plvmctl.runtime import load_runtime
from plvmctl.store import ConceptStore


@pytest.fixture()
def cli(tmp_path):
    store = tmp_path / "store"

    def run(*args, recipe="tiny", input=None):
        return CliRunner().invoke(main, ["--recipe", recipe, "--store", str(store), *map(str, args)], input=input)

    run.store = store
    return run


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(load_recipe("tiny"), device="cpu")


def _tensors(path) -> dict[str, torch.Tensor]:
    concept = Concept.load(path)
    return {"word": concept.word, "head": concept.head, "context": concept.context, **concept.parts}


def _bit_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_one_photo_gives_the_concept_of_today(cli, photos, runtime):
    assert cli("encode", photos["plain0.png"], "--name", "avril").exit_code == 0
    saved = Concept.load(cli.store / "avril.concept")
    today = runtime.encode_concept("avril", photos["plain0.png"])
    assert torch.equal(saved.word, today.word) and torch.equal(saved.context, today.context)
    assert set(saved.parts) == {KEY_PART} and SHA256_META not in saved.meta.extra


def test_several_photos_make_one_concept_that_records_them_in_order(cli, photos, runtime):
    names = ["plain0.png", "plain1.png", "plain2.png"]
    result = cli("encode", *[photos[n] for n in names], "--name", "avril")
    assert result.exit_code == 0, result.output
    concept = Concept.load(cli.store / "avril.concept")
    assert json.loads(concept.meta.extra[SHA256_META]) == [sha256_file(photos[n]) for n in names]
    one = [runtime.encode_concept("avril", photos[n]) for n in names]
    for part in ("word", "head", "context"):  # the mean of each photo's Aligner output
        expected = torch.stack([getattr(c, part) for c in one]).mean(0)
        assert torch.allclose(getattr(concept, part), expected, atol=1e-6)
    assert concept.parts[CONTEXT_PART].shape[0] == 3 and concept.parts[KEYS_PART].shape[0] == 3
    assert concept.meta.extra["retrieval.photos"] == "3"


@pytest.mark.parametrize("first, then", [(["plain0.png"], ["plain1.png", "plain2.png"]),
                                         (["plain0.png", "plain1.png"], ["plain2.png"])])
def test_add_photo_equals_encoding_all_photos_at_once(cli, photos, first, then):
    assert cli("encode", *[photos[n] for n in first + then], "--name", "once").exit_code == 0
    assert cli("encode", *[photos[n] for n in first], "--name", "later").exit_code == 0
    result = cli("concepts", "add-photo", "later", *[photos[n] for n in then])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(cli.store / "later.concept")
    assert _bit_equal(_tensors(cli.store / "once.concept"), _tensors(cli.store / "later.concept"))
    once, later = Concept.load(cli.store / "once.concept"), Concept.load(cli.store / "later.concept")
    assert once.meta.extra[SHA256_META] == later.meta.extra[SHA256_META]


def test_bad_photos_among_good_ones_are_reported_one_line_each_and_the_rest_used(cli, photos):
    result = cli("encode", photos["plain0.png"], photos["corrupt.jpg"], photos["plain1.png"],
                 photos["missing.png"], "--name", "avril")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and "corrupt.jpg" in lines[0] and "missing.png" in lines[1]
    assert all(line.startswith("skipped ") for line in lines)
    concept = Concept.load(cli.store / "avril.concept")
    assert json.loads(concept.meta.extra[SHA256_META]) == [sha256_file(photos["plain0.png"]),
                                                           sha256_file(photos["plain1.png"])]


def test_all_bad_photos_are_an_error_and_nothing_is_written(cli, photos):
    result = cli("encode", photos["corrupt.jpg"], photos["text.png"], "--name", "avril")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "no usable reference photo" in result.output and "corrupt.jpg" in result.output
    assert not (cli.store / "avril.concept").exists()


def test_adding_only_bad_or_known_photos_leaves_the_concept_as_it_was(cli, photos):
    assert cli("encode", photos["plain0.png"], "--name", "avril").exit_code == 0
    before = (cli.store / "avril.concept").read_bytes()
    result = cli("concepts", "add-photo", "avril", photos["plain0.png"], photos["text.png"])
    assert result.exit_code == 1 and "already a reference" in result.output
    assert (cli.store / "avril.concept").read_bytes() == before


def test_more_photos_than_the_recipe_allows_is_one_line(cli, photos):
    three = [photos[f"plain{i}.png"] for i in range(3)]
    result = cli("--set", "aligner.max_references=2", "encode", *three, "--name", "avril")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "at most 2 reference photos" in result.output and not (cli.store / "avril.concept").exists()
    assert cli("--set", "aligner.max_references=2", "encode", *three[:2], "--name", "avril").exit_code == 0
    added = cli("--set", "aligner.max_references=2", "concepts", "add-photo", "avril", three[2])
    assert added.exit_code == 1 and "at most 2 reference photos" in added.output


def test_find_scores_a_concept_by_the_best_of_its_photos_keys(runtime, photos, tmp_path):
    concept = encode_photos(runtime, "avril", [photos["plain0.png"], photos["plain1.png"]]).concept
    other = runtime.encode_concept("bob", photos["plain3.png"])
    keys, _ = concept_keys(concept)
    index = KeyIndex.from_concepts({"avril": concept, "bob": other})
    assert index.count == 3
    [hits] = index.search(keys[1:2].numpy(), 1)
    assert hits[0][0] == "avril" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    mean_score = float(concept.parts[KEY_PART] @ keys[1])
    assert mean_score < 0.9999  # the mean key alone would score the photo lower
    store = ConceptStore(tmp_path / "store")
    store.save(other)
    StoreIndex(store).build()
    store.save(concept)  # refreshes the index on disk: both of avril's keys
    on_disk = StoreIndex(store).load()
    assert sorted(on_disk.names.values()) == ["avril", "avril", "bob"]
    store.remove("avril")
    assert list(StoreIndex(store).load().names.values()) == ["bob"]
    assert np.isclose(StoreIndex(store).build().index.search(keys[:1].numpy(), 1)[0][0][1],
                      float(other.parts[KEY_PART] @ keys[0]), atol=1e-5)


def test_chat_add_takes_the_name_first(cli, photos):
    script = f"/add {photos['plain0.png']} avril\n/quit\n"
    result = cli("chat", input=script)
    assert "usage: /add NAME PHOTO..." in result.output and not (cli.store / "avril.concept").exists()


def test_eval_makes_plvm_concepts_of_every_ref_img_and_fingerprints_them(runtime, photos, tmp_path):
    """A test identity with several `ref_img*` gets the concept of all of them (at most the
    recipe's aligner.max_references), and which photos they are is part of PLVM's answer
    fingerprint, so answers made with other reference photos are never reused."""
    import shutil

    from plvmctl.evaluate import load_testset
    from plvmctl.evaluate.run import several_references_digest
    from plvmctl.methods.base import Reference
    from plvmctl.methods.plvm.adapter import encode_reference

    one, two = photos["plain0.png"], photos["plain1.png"]
    both = encode_reference(runtime, Reference("avril", one, (one, two)))
    assert torch.equal(both.word, encode_photos(runtime, "avril", [one, two]).concept.word)
    assert torch.equal(encode_reference(runtime, Reference("avril", one, (one,))).word,
                       runtime.encode_concept("avril", one).word)

    folder = tmp_path / "set" / "validation_recognition" / "Avril"
    folder.mkdir(parents=True)
    shutil.copy(one, folder / "ref_img.png")
    shutil.copy(photos["plain2.png"], folder / "query_img1.png")
    assert several_references_digest(load_testset(tmp_path / "set")) is None  # one photo: as before
    shutil.copy(two, folder / "ref_img2.png")
    first = several_references_digest(load_testset(tmp_path / "set"))
    shutil.copy(photos["plain3.png"], folder / "ref_img2.png")
    assert first is not None and several_references_digest(load_testset(tmp_path / "set")) != first
