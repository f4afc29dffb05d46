"""MyVLM: the concept head tells the toy identity from others, the concept embedding is injected
only when the head fires, a batch answers as its rows one by one, the model stays frozen, the
file round-trips and is refused by another model, and bad photos are reported, not fatal."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import copied_concept, save_portraits
from plvmctl.concept import Concept
from plvmctl.methods.myvlm.concept_head import ConceptHead
from plvmctl.photo_crops import crop_boxes, crop_features, photo_features
from plvmctl.engine import AskRequest
from plvmctl.errors import PlvmError
from plvmctl.images import load_image
from plvmctl.lab import toy
from plvmctl.methods import make_engine
from plvmctl.store import ConceptStore
from plvmctl.methods.myvlm.trainer import (
    EmbeddingTrainer,
    MyvlmConfig,
    Row,
    choose_threshold,
    fit_concept_head,
    train_myvlm,
)
from plvmctl.train.per_concept import list_photos


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


def small_config(**changes) -> MyvlmConfig:
    """A run that takes about a second on the tiny model."""
    settings = dict(embedding_steps=6, recognition_per_photo=1, qa_per_photo=1, qa_max_new_tokens=3,
                    negative_rows=4, head_steps=200)
    settings.update(changes)
    return MyvlmConfig(**settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Six portraits of one toy identity, one each of 16 others, and fresh ones of both."""
    root = tmp_path_factory.mktemp("myvlm")
    identities = toy.training_identities()
    me = identities[7]
    others = random.Random(5).sample([i for i in identities if i != me], 26)
    negatives = root / "negatives"
    for number, other in enumerate(others[:16]):
        save_portraits(negatives, other, 1, seed=100 + number)
    fresh_others = [p for number, other in enumerate(others[16:])
                    for p in save_portraits(root / "fresh_others", other, 1, seed=200 + number)]
    return {"root": root, "me": root / "me", "positives": save_portraits(root / "me", me, 6, seed=1),
            "negatives": negatives, "fresh_me": save_portraits(root / "fresh_me", me, 6, seed=2),
            "fresh_others": fresh_others}


@pytest.fixture(scope="module")
def trained(runtime, world):
    """One MyVLM run of <me>, with the model's state dict from before it."""
    before = {key: value.detach().clone() for key, value in runtime.backbone.model.state_dict().items()}
    attention = runtime.backbone.model.config._attn_implementation
    result = train_myvlm(runtime, "me", world["positives"], list_photos(world["negatives"]),
                         small_config(), world["root"] / "run")
    return {"before": before, "attention": attention, "result": result}


def _images(paths):
    return [load_image(path) for path in paths]


# -- the concept head ----------------------------------------------------------------------------


def test_linear_head_separates_new_photos_of_the_identity_from_others(runtime, world):
    # the classifier on whole portraits (the tiny model's encoder is random: many strangers'
    # windows look like <me> to it, so with windows the threshold rises; windows are tested below)
    config = small_config(head_steps=500, crops="whole")
    head, report = fit_concept_head(runtime, _images(world["positives"]),
                                    _images(list_photos(world["negatives"])), config)
    assert head.kind == "linear" and report.threshold_from == "held-out photos"
    assert report.held_positive >= 1 and report.held_negative >= 1
    looked = head.look(runtime, _images(world["fresh_me"] + world["fresh_others"]))
    fired = [f for f, _, _ in looked]
    hits = sum(fired[:6]) / 6
    rejections = sum(not f for f in fired[6:]) / len(world["fresh_others"])
    assert (hits + rejections) / 2 >= 0.75, (hits, rejections)
    features = photo_features(runtime, _images(world["fresh_me"] + world["fresh_others"]), "encoder")
    scores = head.scores(features)
    assert float(scores[:6].mean()) > float(scores[6:].mean())


def test_nearest_head_needs_no_training_and_uses_its_photos(runtime, world):
    config = small_config(head="nearest", features="vision")
    head, report = fit_concept_head(runtime, _images(world["positives"]),
                                    _images(list_photos(world["negatives"])), config)
    assert head.kind == "nearest" and report.losses == []
    assert head.references.shape[0] == 2 * len(world["positives"])  # photos and mirror images
    own = photo_features(runtime, _images(world["positives"][:1]), "vision")
    assert float(head.scores(own)[0]) == pytest.approx(1.0, abs=1e-5)
    fixed, fixed_report = fit_concept_head(runtime, _images(world["positives"]), [],
                                           small_config(head="nearest", threshold=0.9))
    assert fixed.threshold == 0.9 and fixed_report.threshold_from == "fixed"
    with pytest.raises(PlvmError, match="threshold"):
        fit_concept_head(runtime, _images(world["positives"]), [], small_config(head="nearest"))
    with pytest.raises(PlvmError, match="negative"):
        fit_concept_head(runtime, _images(world["positives"]), [], small_config())


# -- where the head looks ------------------------------------------------------------------------


def test_windows_are_the_whole_photo_and_half_overlapping_squares():
    assert crop_boxes(96, 96, "whole") == [(0, 0, 96, 96)]
    boxes = crop_boxes(96, 96, "windows")
    assert boxes[0] == (0, 0, 96, 96) and len(boxes) == 1 + 9 + 25 == len(set(boxes))
    assert {(r - l, b - t) for l, t, r, b in boxes[1:]} == {(48, 48), (32, 32)}
    assert all(0 <= l < r <= 96 and 0 <= t < b <= 96 for l, t, r, b in boxes)
    wide = crop_boxes(120, 60, "windows")  # squares of the shorter side's share, to both edges
    assert max(r for _, _, r, _ in wide) == 120 and max(b for _, _, _, b in wide) == 60
    with pytest.raises(PlvmError, match="crops"):
        crop_boxes(96, 96, "faces")


def _scene(tiles: list[Path], size: int = 96) -> "Image.Image":
    """A photo of several people: 48 px portraits side by side on the bottom half (left, right)
    and the top left, on a grey ground."""
    from PIL import Image

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    for tile, spot in zip(tiles, [(0, 48), (48, 48), (0, 0)]):
        canvas.paste(load_image(tile), spot)
    return canvas


def test_a_head_with_windows_finds_the_identity_among_others(runtime, world):
    """Trained on portraits of one identity: with windows it fires on a photo where that
    identity stands among others (and says where), not on a photo of the others alone; looking
    at the whole photo only, it misses the identity there."""
    negatives = list_photos(world["negatives"])
    head, _ = fit_concept_head(runtime, _images(world["positives"]), _images(negatives),
                               small_config(head_steps=500))
    assert head.crops == "windows"
    # the portrait of <me> the head is surest of (on the tiny model's random encoder, some
    # stranger's windows score above the weaker portraits, and the threshold with them)
    scores = head.scores(photo_features(runtime, _images(world["positives"]), "encoder"))
    mine = world["positives"][int(scores.argmax())]
    assert float(scores.max()) >= head.threshold
    # and strangers it rejects, each alone, at its best crop (ditto)
    looked = head.look(runtime, _images(negatives))
    first, second, third = sorted(range(len(negatives)), key=lambda i: looked[i][1])[:3]
    assert not any(looked[i][0] for i in (first, second, third))
    together = _scene([negatives[first], mine, negatives[second]])  # <me> bottom right
    strangers = _scene([negatives[first], negatives[third], negatives[second]])
    (fired, _, box), (stranger_fired, _, _) = head.look(runtime, [together, strangers])
    assert fired and box == (48, 48, 96, 96)
    assert not stranger_fired
    whole = ConceptHead(head.kind, head.features, head.threshold, weight=head.weight, bias=head.bias,
                        crops="whole")
    assert [f for f, _, _ in whole.look(runtime, [together, strangers])] == [False, False]

    concept = _concept_with_head(runtime, head)
    engine = make_engine(runtime, {"me": concept})
    seen, unseen = engine.score_options([AskRequest("Is <me> here?", together),
                                         AskRequest("Is <me> here?", strangers)], [["Yes", "No"]] * 2)
    assert list(seen.notes.get("seen", {})) == ["me"] and seen.notes.get("seen", {}) == {"me": (48, 48, 96, 96)}
    assert list(unseen.notes.get("seen", {})) == [] and unseen.notes.get("seen", {}) == {}


def test_the_threshold_is_chosen_on_what_the_head_sees(runtime, world, monkeypatch):
    """The picker gets each held-out photo's best-crop score, negatives' windows included."""
    import plvmctl.methods.myvlm.trainer as myvlm

    picked = {}
    original = myvlm.choose_threshold

    def spy(positive, negative):
        picked.update(positive=positive, negative=negative)
        return original(positive, negative)

    monkeypatch.setattr(myvlm, "choose_threshold", spy)
    config = small_config()
    negatives = _images(list_photos(world["negatives"]))
    head, report = fit_concept_head(runtime, _images(world["positives"]), negatives, config)
    assert report.threshold_from == "held-out photos"
    _, held = myvlm.split_holdout(len(negatives), config.holdout, f"myvlm-negatives-{config.seed}")
    looked = head.look(runtime, [negatives[i] for i in held])
    assert picked["negative"] == pytest.approx([score for _, score, _ in looked], abs=1e-5)
    whole = head.scores(photo_features(runtime, [negatives[i] for i in held], "encoder"))
    assert all(best >= float(w) - 1e-6 for best, w in zip(picked["negative"], whole))
    assert any(box != (0, 0, 48, 48) for _, _, box in looked)  # a window counted, not only the photo
    _, held_p = myvlm.split_holdout(len(world["positives"]), config.holdout, f"myvlm-positives-{config.seed}")
    assert len(picked["positive"]) == 2 * len(held_p)  # each held-out photo and its mirror image


def _concept_with_head(runtime, head: ConceptHead) -> Concept:
    concept = copied_concept(runtime.backbone, "me", 5, k=0)
    meta = concept.meta
    meta.extra.update(head.meta())
    return Concept(concept.name, concept.word, concept.head, concept.context, meta,
                   visual=torch.randn(1, concept.hidden_size), parts=head.parts())


def test_the_crop_setting_survives_the_file_and_old_files_look_at_the_whole_photo(runtime, tmp_path):
    features = photo_features(runtime, [toy.render_portrait(toy.training_identities()[0], random.Random(0))],
                              "encoder")
    for crops in ("windows", "whole"):
        head = ConceptHead("nearest", "encoder", 0.5, references=features, crops=crops)
        path = _concept_with_head(runtime, head).save(tmp_path / f"{crops}.concept")
        assert ConceptHead.from_concept(Concept.load(path)).crops == crops
    old = _concept_with_head(runtime, ConceptHead("nearest", "encoder", 0.5, references=features))
    del old.meta.extra["concept_head.crops"]  # written before heads had a crop setting
    path = old.save(tmp_path / "old.concept")
    assert ConceptHead.from_concept(Concept.load(path)).crops == "whole"


def test_threshold_is_the_best_balanced_cut_on_the_held_out_scores():
    assert choose_threshold([0.9, 0.8], [0.1, 0.2]) == pytest.approx(0.5)
    # one negative above one positive: 0.3 < t <= 0.7 keeps 1/2 + 2/2 ... the middle of the ties
    t = choose_threshold([0.9, 0.3], [0.1, 0.2, 0.7])
    assert 0.2 < t < 0.3
    with pytest.raises(PlvmError):
        choose_threshold([0.5], [])


# -- training ------------------------------------------------------------------------------------


def test_model_is_bit_identical_after_training(runtime, trained):
    after = runtime.backbone.model.state_dict()
    assert set(after) == set(trained["before"])
    assert [key for key, value in after.items() if not torch.equal(value, trained["before"][key])] == []
    assert not any(p.requires_grad for p in runtime.backbone.model.parameters())
    # the eager attention the penalty needs is switched off again
    assert runtime.backbone.model.config._attn_implementation == trained["attention"]


def test_the_concept_is_a_myvlm_concept_with_a_trained_embedding(runtime, trained, world):
    result = trained["result"]
    concept = result.concept
    assert concept.meta.method == "myvlm" and concept.meta.base_model == runtime.backbone.fingerprint
    assert concept.num_context == 0 and concept.num_visual == 1
    assert concept.visual.shape == (1, runtime.backbone.hidden_size)
    start = EmbeddingTrainer(runtime, "me", small_config(), {p: load_image(p) for p in world["positives"]})
    start.start_embedding(world["positives"])
    assert not torch.equal(start.embedding.detach().cpu(), concept.visual)
    assert not torch.equal(start.word.detach().cpu(), concept.word)
    assert all(step["attention"] > 0 for step in result.steps)  # the penalty is really computed
    assert result.counts["positive"] == 6 and result.counts["negative"] == 4 and result.counts["qa"] > 0
    head = ConceptHead.from_concept(concept)
    assert head.threshold == result.head.threshold
    for name in ("log.jsonl", "loss.png", "result.json"):
        assert (result.out / name).is_file()


def test_attention_penalty_pulls_attention_off_the_embedding(runtime, world):
    """With a large λ the attention the LM pays the embedding falls; with λ = 0 it is not
    even computed."""
    photos = world["positives"][:2]
    rows = [Row("positive", "Is <me> in this photo?", "Yes, <me> is here.", photo, True) for photo in photos]
    trainer = EmbeddingTrainer(runtime, "me", small_config(attention_weight=50.0, lr=1e-2),
                               {p: load_image(p) for p in photos})
    trainer.start_embedding(photos)
    from plvmctl.methods.myvlm.trainer import eager_attention

    with eager_attention(runtime.backbone.model):
        first = trainer.step(rows)["attention"]
        for _ in range(10):
            last = trainer.step(rows)["attention"]
    assert last < first
    plain = EmbeddingTrainer(runtime, "me", small_config(attention_weight=0.0), {p: load_image(p) for p in photos})
    plain.start_embedding(photos)
    assert plain.step(rows)["attention"] == 0.0


# -- the file ------------------------------------------------------------------------------------


def test_file_round_trip_and_refusal_by_another_model(tmp_path, trained):
    from plvmctl.families import load_backbone

    concept = trained["result"].concept
    path = ConceptStore(tmp_path).save(concept)
    loaded = ConceptStore(tmp_path).load("me")
    for part in ("word", "head", "context", "visual"):
        assert torch.equal(getattr(loaded, part), getattr(concept, part)), part
    assert set(loaded.parts) == set(concept.parts)
    assert all(torch.equal(loaded.parts[key], concept.parts[key]) for key in concept.parts)
    before, after = ConceptHead.from_concept(concept), ConceptHead.from_concept(loaded)
    assert (after.kind, after.features, after.threshold, after.bias, after.crops) == \
        (before.kind, before.features, before.threshold, before.bias, "windows")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "2" and handle.metadata()["method"] == "myvlm"
    other = load_backbone("tiny", device="cpu", seed=1)
    with pytest.raises(PlvmError, match="fingerprint"):
        loaded.check_compatible(other.fingerprint, other.hidden_size, other.name)


def test_a_plain_concept_is_still_written_as_version_1(tmp_path, runtime):
    from safetensors import safe_open

    path = copied_concept(runtime.backbone, "plain", 5).save(tmp_path / "plain.concept")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1"
    assert Concept.load(path).num_visual == 0


# -- injection -----------------------------------------------------------------------------------


def _with_nearest_head(runtime, concept: Concept, photo: Path, visual: torch.Tensor | None = None) -> Concept:
    """`concept` with a head that fires on `photo` only (its own features, threshold 0.9999)."""
    references = photo_features(runtime, [load_image(photo)], "encoder")
    head = ConceptHead("nearest", "encoder", 0.9999, references=references)
    concept.meta.extra.update(head.meta())
    return Concept(concept.name, concept.word, concept.head, torch.zeros(0, concept.hidden_size),
                   concept.meta, visual=concept.visual if visual is None else visual, parts=head.parts())


def test_embedding_is_injected_only_when_the_head_fires(runtime, trained, world):
    seen_photo, unseen_photo = world["positives"][0], list_photos(world["negatives"])[0]
    base = _with_nearest_head(runtime, trained["result"].concept, seen_photo)
    other = _with_nearest_head(runtime, trained["result"].concept, seen_photo,
                               visual=torch.randn(1, base.hidden_size))
    question = "Is <me> in this photo?"
    requests = [AskRequest(question, seen_photo), AskRequest(question, unseen_photo), AskRequest(question)]
    options = [["Yes", "No"]] * 3
    first = make_engine(runtime, {"me": base}).score_options(requests, options)
    second = make_engine(runtime, {"me": other}).score_options(requests, options)
    assert [list(r.notes.get("seen", {})) for r in first] == [["me"], [], []]
    assert first[0].logprobs != second[0].logprobs  # the embedding is read when injected
    assert first[1].logprobs == second[1].logprobs  # and not at all when the head does not fire
    assert first[2].logprobs == second[2].logprobs  # nor without a photo
    [answer] = make_engine(runtime, {"me": base}).ask([AskRequest(question, seen_photo)])
    assert answer.ok and list(answer.notes.get("seen", {})) == ["me"]


def test_a_batch_mixing_myvlm_plvm_and_none_answers_as_one_by_one(runtime, trained, world):
    seen_photo, unseen_photo = world["positives"][0], list_photos(world["negatives"])[1]
    concepts = {"me": _with_nearest_head(runtime, trained["result"].concept, seen_photo),
                "pal": copied_concept(runtime.backbone, "pal", 7, k=3, noise=0.1)}
    requests = [
        AskRequest("Is <me> in this photo?", seen_photo),
        AskRequest("Is <me> in this photo?", unseen_photo),
        AskRequest("Are <me> and <pal> together here?", seen_photo),
        AskRequest("Is <pal> in this photo?", seen_photo),
        AskRequest("What does <me> like?"),
        AskRequest("What is in this photo?", unseen_photo),
    ]
    options = [["Yes", "No", "<me>"]] * len(requests)
    engine = make_engine(runtime, concepts)
    batch = engine.score_options(requests, options, batch_size=8)
    alone = [engine.score_options([r], [o])[0] for r, o in zip(requests, options)]
    assert [list(r.notes.get("seen", {})) for r in batch] == [["me"], [], ["me"], [], [], []]
    for together, single in zip(batch, alone):
        assert together.error is None and single.error is None
        assert together.logprobs == pytest.approx(single.logprobs, abs=1e-4)
    asked = engine.ask(requests, batch_size=8)
    one_by_one = [engine.ask([r])[0] for r in requests]
    assert [a.answer for a in asked] == [a.answer for a in one_by_one]
    assert all(a.ok for a in asked)


# -- bad input and the command line --------------------------------------------------------------


def test_an_unreadable_photo_is_reported_and_skipped(runtime, world, tmp_path):
    folder = tmp_path / "me"
    folder.mkdir()
    for path in world["positives"][:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_text("not an image")
    said = []
    result = train_myvlm(runtime, "me", list_photos(folder), list_photos(world["negatives"]),
                         small_config(embedding_steps=1), tmp_path / "run", echo=said.append)
    assert result.counts["positive_photos"] == 3 and len(result.skipped) == 1
    assert "broken.png" in result.skipped[0] and any("broken.png" in line for line in said)
    with pytest.raises(PlvmError, match="none of the 1"):
        train_myvlm(runtime, "me", [folder / "broken.png"], list_photos(world["negatives"]),
                    small_config(), tmp_path / "run2")


@pytest.fixture(scope="module")
def cli():
    from plvmctl.cli import main

    return main


def test_cli_trains_a_concept_that_ask_uses(cli, world, tmp_path):
    runner = CliRunner()
    store = tmp_path / "store"
    common = ["--recipe", "tiny", "--device", "cpu", "--store", str(store)]
    args = common + ["train", "myvlm", str(world["me"]), "--name", "cli_me", "--negatives",
                     str(world["negatives"]), "--out", str(tmp_path / "run"),
                     "--set", "myvlm.embedding_steps=2", "--set", "myvlm.qa_max_new_tokens=3"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == store / "cli_me.concept" and Concept.load(path).meta.method == "myvlm"
    assert ConceptHead.from_concept(Concept.load(path)).crops == "windows"
    asked = runner.invoke(cli, common + ["ask", str(world["positives"][0]), "What is <cli_me> doing?"])
    assert asked.exit_code == 0, asked.output
    text_only = runner.invoke(cli, common + ["ask", "--no-image", "Who is <cli_me>?"])
    assert text_only.exit_code == 0, text_only.output
    shown = runner.invoke(cli, common + ["concepts", "show", "cli_me"])
    info = json.loads(shown.stdout)
    assert info["method"] == "myvlm" and info["k"] == 0 and info["norms"]["context_mean"] is None
    assert info["parts"]["concept_head.threshold"] == [1] and info["norms"]["visual_mean"] > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = runner.invoke(cli, common + ["train", "myvlm", str(empty), "--name", "nobody",
                                          "--negatives", str(world["negatives"])])
    assert failed.exit_code == 1 and "no photos" in failed.output
    assert len(failed.output.strip().splitlines()) == 1
    assert not (store / "nobody.concept").exists()
    no_negatives = runner.invoke(cli, common + ["train", "myvlm", str(world["me"]), "--name", "x"])
    assert no_negatives.exit_code == 1 and "negatives" in no_negatives.output
    wrong = runner.invoke(cli, args + ["--force", "--set", "generation.max_new_tokens=3"])
    assert wrong.exit_code == 1 and "myvlm.KEY=VALUE" in wrong.output


# -- the eval method -----------------------------------------------------------------------------


def test_eval_method_on_a_toy_testset_reports_text_questions_as_concept_absent(runtime, tmp_path):
    import dataclasses

    from plvmctl.evaluate import run_evaluation

    root = toy.write_testset(tmp_path / "set", 3, seed=0, queries_per_identity=2, progress=False)
    section = dataclasses.asdict(small_config(embedding_steps=2))
    recipe = dataclasses.replace(runtime.recipe, sections={**runtime.recipe.sections, "myvlm": section})
    local = dataclasses.replace(runtime, recipe=recipe)
    results = run_evaluation(local, root, ["myvlm"], tmp_path / "out", limit=4, progress=False)
    method = results["methods"]["myvlm"]
    assert method["concepts"]["unavailable"] == {}
    assert method["seconds_per_concept"] > 0 and method["tokens_per_concept"] == 1
    assert method["text_qa"]["total"] == results["counts"]["text_items"] > 0  # answered, not dropped
    assert method["skipped"]["total"] == 0
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## Method notes" in report and "myvlm: text QA is asked without a photo" in report
    assert len(list((tmp_path / "out" / "cache" / "myvlm").glob("*.concept"))) == 3
