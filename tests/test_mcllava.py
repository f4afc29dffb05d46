"""MC-LLaVA: concepts trained together on the tiny model (only their tensors learn), the k-means
start, the personalized visual prompt (only above the threshold), batches, the CLI and eval."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from plvmctl.concept import Concept
from plvmctl.engine import AskRequest
from plvmctl.errors import PlvmError
from plvmctl.images import load_image
from plvmctl.lab import toy
from plvmctl.methods import make_engine
from plvmctl.methods.mcllava.hook import Location, draw_mark, patch_centre, place_words, visual_prompts
from plvmctl.prompt import Slot, build_prompt
from plvmctl.store import ConceptStore
from plvmctl.methods.mcllava.trainer import (
    PROTOTYPES,
    THRESHOLD,
    McllavaConfig,
    McllavaTrainer,
    check_concepts,
    joint_samples,
    kmeans,
    mean_embedding_norm,
    parse_concept_options,
    train_mcllava,
)
from plvmctl.train.per_concept import list_photos
from plvmctl.train.soft_prompt import initial_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread

NAMES = ("ana", "bo", "cy")


def small_config(**changes) -> McllavaConfig:
    """A joint run that takes seconds on the tiny model."""
    settings = dict(epochs=2, recognition_per_photo=2, attribute_per_photo=1, attribute_max_new_tokens=4,
                    select_after_epoch=1, num_context=4, joint_per_photo=1, batch_size=4,
                    hard_negatives=0, random_negatives=4)
    settings.update(changes)
    return McllavaConfig(**settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Three toy identities (3 portraits each, plus one scene of <ana> with <bo> in both
    their folders) and 6 negatives of other identities."""
    root = tmp_path_factory.mktemp("mcllava")
    identities = toy.training_identities()
    chosen = [identities[0], identities[len(identities) // 3], identities[2 * len(identities) // 3]]
    rng = random.Random(1)
    for name, identity in zip(NAMES, chosen):
        (root / name).mkdir()
        for number in range(3):
            toy.render_portrait(identity, rng, size=48).save(root / name / f"{name}_{number}.png")
    scene, _ = toy.random_scene(chosen[0], rng, [chosen[1]], n_people=2)
    for name in ("ana", "bo"):
        scene.save(root / name / "together.png")
    negatives = root / "negatives"
    negatives.mkdir()
    for number, other in enumerate(random.Random(2).sample(identities[1:200], 6)):
        toy.render_portrait(other, rng, size=48).save(negatives / f"n{number}.png")
    return {"root": root, "negatives": negatives, **{name: root / name for name in NAMES}}


@pytest.fixture(scope="module")
def trained(runtime, world):
    """One joint run of the three concepts, with the model's state dict from before it."""
    before = {key: value.detach().clone() for key, value in runtime.backbone.model.state_dict().items()}
    photos = {name: list_photos(world[name]) for name in NAMES}
    config = small_config()
    result = train_mcllava(runtime, photos, {}, config, world["root"] / "run")
    return {"before": before, "result": result, "photos": photos, "config": config}


# -- joint training ------------------------------------------------------------------------------


def test_three_concepts_train_together_and_the_model_stays_frozen(runtime, trained):
    result = trained["result"]
    assert list(result.concepts) == list(NAMES)
    assert result.losses and all(loss == loss for loss in result.losses)
    after = runtime.backbone.model.state_dict()
    assert [key for key, value in after.items() if not torch.equal(value, trained["before"][key])] == []
    assert not any(p.requires_grad for p in runtime.backbone.model.parameters())
    for name, concept in result.concepts.items():
        assert concept.meta.method == "mcllava"
        assert concept.meta.base_model == runtime.backbone.fingerprint
        assert concept.meta.extra["trained_with"] == "ana,bo,cy"
        assert concept.num_context == 4 and concept.parts[PROTOTYPES].shape == (4, concept.hidden_size)
        assert set(result.best_accuracy[name]) == {"positive", "negative", "mean"}
    for part in ("word", "head", "context"):  # the concepts are different tensors
        assert not torch.equal(getattr(result.concepts["ana"], part), getattr(result.concepts["bo"], part))
    for name in ("log.jsonl", "loss.png", "result.json", "conversations-ana.json"):
        assert (result.out / name).is_file(), name


def test_training_moves_every_concepts_tensors(runtime, trained):
    start = McllavaTrainer(runtime, trained["photos"], trained["config"])
    for name, concept in trained["result"].concepts.items():
        begun = start.concept(name=name)
        assert not torch.equal(begun.context, concept.context), name
        assert not torch.equal(begun.word, concept.word), name


def test_rows_name_every_concept_they_involve(runtime, world, trained):
    samples = joint_samples(runtime, trained["photos"], {}, trained["config"], None)
    together = [s for s in samples if s.photo is not None and s.photo.name == "together.png"]
    assert any(s.kind == "positive" and "and" in s.question and s.also for s in together)
    # a row about <ana> on the scene also shows <bo>: both are in its prompt
    assert all("bo" in s.also for s in together if s.name == "ana" and s.kind in ("positive", "negative"))
    negatives = [s for s in samples if s.kind == "negative" and s.name == "cy"]
    assert negatives and all(s.also for s in negatives if s.photo.parent.name in ("ana", "bo"))
    assert any(len(s.also) == 1 and s.photo is None for s in samples)  # distractor sentences
    assert {s.name for s in samples} == set(NAMES)


def test_concept_files_round_trip_and_answer_together(runtime, trained, tmp_path, world):
    store = ConceptStore(tmp_path / "store")
    for concept in trained["result"].concepts.values():
        store.save(concept)
    loaded = Concept.load(store.path_for("bo"))
    assert torch.equal(loaded.parts[PROTOTYPES], trained["result"].concepts["bo"].parts[PROTOTYPES])
    assert float(loaded.parts[THRESHOLD]) == float(trained["result"].concepts["bo"].parts[THRESHOLD])
    engine = make_engine(runtime, store)
    [result] = engine.ask([AskRequest("Is <ana> next to <bo>?", world["ana"] / "together.png")])
    assert result.ok and result.answer is not None


# -- k-means start -------------------------------------------------------------------------------


def test_kmeans_finds_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    points = torch.cat([centre + 0.1 * torch.randn(20, 2, generator=generator) for centre in centres])
    found = kmeans(points, 3, seed=1)
    for centre in centres:
        assert float((found - centre).norm(dim=-1).min()) < 0.2
    assert kmeans(points[:2], 4).shape == (4, 2)  # fewer points than k: centroids repeat


def test_kmeans_start_lands_at_the_mean_embedding_norm(runtime, trained):
    trainer = McllavaTrainer(runtime, trained["photos"], trained["config"])
    norm = mean_embedding_norm(runtime.backbone)
    for number, name in enumerate(NAMES):
        rows = trainer.prompts.context[number].detach()
        assert torch.allclose(rows.norm(dim=-1), torch.full((4,), norm), rtol=1e-2)
        centroid = torch.nn.functional.normalize(trainer.prototypes[name].mean(0), dim=0) * norm
        assert torch.allclose(trainer.prompts.word[number].detach(), centroid, atol=1e-5)
        # the prototypes are the unscaled centroids of the photos' visual tokens
        assert float(trainer.prototypes[name].norm(dim=-1).mean()) != pytest.approx(norm, rel=0.05)


def test_without_kmeans_the_start_is_the_init_word(runtime, trained):
    config = small_config(kmeans=False, init_noise=0.0)
    trainer = McllavaTrainer(runtime, trained["photos"], config)
    word, head = initial_rows(runtime.backbone, config.init_word)
    prompts = trainer.prompts
    assert torch.equal(prompts.word[1].detach(), word) and torch.equal(prompts.head[2].detach(), head)
    assert torch.equal(prompts.context[0, 3].detach(), word)


def test_a_mask_file_limits_the_tokens_clustered(runtime, world, tmp_path):
    photos = {"ana": list_photos(world["ana"])[:1]}
    masks = tmp_path / "ana"
    masks.mkdir()
    source = photos["ana"][0]
    copy = masks / source.name
    copy.write_bytes(source.read_bytes())
    (masks / "masks").mkdir()
    size = load_image(copy).size
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # the left half
    mask.save(masks / "masks" / f"{copy.stem}.png")
    trainer = McllavaTrainer(runtime, {"ana": [copy]}, small_config(mask="none"))
    every = trainer.features[(str(copy), False)].shape[0]
    assert 0 < trainer.visual_tokens("ana").shape[0] < every


# -- the personalized visual prompt ----------------------------------------------------------------


def _pinned(runtime, photo: Path, threshold: float, patch: int = 0) -> Concept:
    """A concept whose prototypes are exactly one patch of `photo` (its best score is 1.0)."""
    features = runtime.backbone.image_features([load_image(photo)])[0].float().cpu()
    hidden = features.shape[1]
    return Concept("pin", torch.zeros(hidden), torch.zeros(hidden), torch.zeros(2, hidden),
                   parts={PROTOTYPES: features[patch:patch + 1].repeat(2, 1),
                          THRESHOLD: torch.tensor(threshold, dtype=torch.float64)})


def _with_mcllava(runtime, **settings):
    recipe = dataclasses.replace(runtime.recipe, sections={**runtime.recipe.sections, "mcllava": settings})
    return dataclasses.replace(runtime, recipe=recipe)


def test_location_sentence_only_above_the_threshold(runtime, world):
    photo = list_photos(world["cy"])[0]
    below = make_engine(runtime, {"pin": _pinned(runtime, photo, 0.99)})
    above = make_engine(runtime, {"pin": _pinned(runtime, photo, 1.5)})
    [found] = below.ask([AskRequest("Where is <pin>?", photo)], max_new_tokens=2)
    [missed] = above.ask([AskRequest("Where is <pin>?", photo)], max_new_tokens=2)
    assert found.notes.get("located", {}) == {"pin": "at the top left"}  # patch 0 of the grid
    assert missed.notes.get("located", {}) == {}
    [off] = make_engine(runtime, {"pin": _pinned(runtime, photo, 0.99)}, locate=False).ask(
        [AskRequest("Where is <pin>?", photo)], max_new_tokens=2)
    assert off.notes.get("located", {}) == {}
    [text] = below.ask([AskRequest("Where is <pin>?", None)], max_new_tokens=2)
    assert text.notes.get("located", {}) == {}  # no photo, no visual prompt


def test_the_location_sentence_follows_the_concept_sentence(runtime):
    segments = build_prompt("Where is <a>?", template=runtime.template, has_image=True,
                            concepts={"a": 1, "b": 1}, also=["b"], located={"a": "on the left"})
    text = "".join(s if isinstance(s, str) else f"[{s.name}{'' if s.index < 0 else s.index}]" for s in segments)
    assert "[a] is [a0]. [a] is on the left. [b] is [b0]." in text
    assert Slot("a") in segments


def test_place_words():
    assert place_words(0, 0, 3) == "at the top left"
    assert place_words(1, 1, 3) == "in the middle"
    assert place_words(1, 2, 3) == "on the right"
    assert place_words(2, 1, 3) == "at the bottom"
    assert place_words(0, 2, 3, "columns") == "on the right"
    assert place_words(20, 5, 24, "columns") == "on the left"


def test_mark_mode_draws_on_the_photo_and_names_the_mark(runtime, world):
    photo = list_photos(world["cy"])[0]
    local = _with_mcllava(runtime, location="mark")
    concept = _pinned(runtime, photo, 0.5, patch=4)
    [(texts, shown)] = visual_prompts(local, [(load_image(photo), {"pin": concept})])
    assert texts == {"pin": "located at 'Mark 1'"}
    assert not np.array_equal(np.asarray(shown), np.asarray(load_image(photo)))
    location = Location("pin", 1.0, 0.5, 4, 4)  # cell (1, 0) of a 4 x 4 grid
    x, y = patch_centre(Image.new("RGB", (80, 40)), location)  # padded to 80 x 80: 20 px above
    assert (x, y) == (10.0, 30.0 - 20.0)
    assert draw_mark(Image.new("RGB", (80, 40)), location, 1).getpixel((int(x), int(y))) is not None


def test_a_batch_answers_as_one_by_one(runtime, trained, world):
    concepts = dict(trained["result"].concepts)
    concepts["pin"] = _pinned(runtime, list_photos(world["cy"])[0], 0.9).renamed("pin")
    engine = make_engine(runtime, concepts)
    requests = [AskRequest("Is <ana> in this photo?", world["ana"] / "together.png"),
                AskRequest("Where is <pin>?", list_photos(world["cy"])[0]),
                AskRequest("Are <bo> and <cy> both here?", list_photos(world["bo"])[0]),
                AskRequest("What colour is <cy>'s hair?", None)]
    together = engine.ask(requests, batch_size=4, max_new_tokens=4)
    alone = [engine.ask([request], batch_size=1, max_new_tokens=4)[0] for request in requests]
    assert [r.answer for r in together] == [r.answer for r in alone]
    assert [r.notes.get("located", {}) for r in together] == [r.notes.get("located", {}) for r in alone]
    assert together[1].notes.get("located", {})


# -- bad input -------------------------------------------------------------------------------------


def test_bad_concepts_are_one_clear_error(runtime, world, tmp_path):
    with pytest.raises(PlvmError, match="twice"):
        parse_concept_options(["ana=a", "ana=b"])
    with pytest.raises(PlvmError, match="NAME=PHOTOS_DIR"):
        parse_concept_options(["ana"])
    with pytest.raises(PlvmError, match="no photos of <bo>"):
        check_concepts({"ana": list_photos(world["ana"]), "bo": []})
    with pytest.raises(PlvmError, match="needs negatives"):
        train_mcllava(runtime, {"ana": list_photos(world["ana"])}, {}, small_config(), tmp_path)
    with pytest.raises(PlvmError, match="mcllava.location"):
        small_config(location="somewhere").validate()


@pytest.fixture()
def cli(tmp_path):
    from plvmctl.cli import main

    def invoke(*args):
        return CliRunner().invoke(main, ["--recipe", "tiny", "--device", "cpu", "--store",
                                         str(tmp_path / "store"), *args])

    return invoke


def test_cli_errors_leave_nothing_behind(cli, world, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("train", "mcllava", "--concept", f"ana={world['ana']}", "--concept", f"bo={empty}")
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        f"error: no photos (.jpg, .png, ...) of <bo> in {empty}"]
    result = cli("train", "mcllava", "--concept", f"ana={world['ana']}", "--concept", f"ana={world['bo']}")
    assert result.exit_code == 1 and "given twice" in result.output
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").iterdir())


def test_cli_trains_concepts_that_ask_uses(cli, world, tmp_path):
    out = tmp_path / "run"
    result = cli("train", "mcllava", "--concept", f"ana={world['ana']}", "--concept", f"bo={world['bo']}",
                 "--negatives", str(world["negatives"]), "--no-kmeans", "--epochs", "1", "--out", str(out),
                 "--set", "mcllava.recognition_per_photo=1", "--set", "mcllava.attribute_per_photo=1",
                 "--set", "mcllava.attribute_max_new_tokens=2", "--set", "mcllava.num_context=2",
                 "--set", "mcllava.joint_per_photo=1")
    assert result.exit_code == 0, result.output
    paths = [line for line in result.stdout.splitlines() if line.endswith(".concept")]
    assert [Path(p).stem for p in paths] == ["ana", "bo"]
    assert Concept.load(paths[0]).meta.extra["kmeans"] == "False"
    assert json.loads((out / "result.json").read_text())["config"]["epochs"] == 1
    answered = cli("ask", str(world["ana"] / "together.png"), "Is <ana> with <bo>?", "--json",
                   "--max-new-tokens", "2")
    assert answered.exit_code == 0, answered.output
    assert json.loads(answered.stdout)["error"] is None


# -- eval --------------------------------------------------------------------------------------------


def test_eval_method_trains_groups_once_and_reuses_them(runtime, world, tmp_path):
    from plvmctl.engine import AskRequest as Request
    from plvmctl.methods import MethodContext, Reference, get_method, negative_pool

    references = []
    for name in NAMES:
        folder = tmp_path / "set" / name
        folder.mkdir(parents=True)
        (folder / "ref_img.png").write_bytes(list_photos(world[name])[0].read_bytes())
        references.append(Reference(name, folder / "ref_img.png"))
    settings = {key: value for key, value in dataclasses.asdict(small_config(group_size=2)).items()
                if key in ("epochs", "recognition_per_photo", "attribute_per_photo", "attribute_max_new_tokens",
                           "select_after_epoch", "num_context", "joint_per_photo", "group_size")}
    local = _with_mcllava(runtime, **settings)

    class Api:
        Engine = make_engine
        AskRequest = Request

    context = MethodContext(runtime=local, references=references, cache_dir=tmp_path / "cache", engine_api=Api,
                            negatives=negative_pool("mcllava", None, world["negatives"], None))
    prepared = get_method("mcllava")(context)
    assert prepared.unavailable == {} and prepared.seconds_per_concept > 0
    files = {p.stem: Concept.load(p) for p in (tmp_path / "cache" / "mcllava").glob("*.concept")}
    assert files["ana"].meta.extra["trained_with"] == "ana,bo" and files["cy"].meta.extra["trained_with"] == "cy"
    again = get_method("mcllava")(context)
    assert again.seconds_per_concept == pytest.approx(prepared.seconds_per_concept, rel=1e-4)
    assert {p.name for p in (tmp_path / "cache" / "mcllava").iterdir()} >= {"group-ana-2", "group-cy-1"}
