"""Yo'LLaVA trainer: only the concept tensors learn, cached features are exact, the CLI and the
eval method make concepts that `ask` and the engine use, also two of them in one question."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import save_portraits
from plvmctl.concept import Concept
from plvmctl.engine import AskRequest, Engine
from plvmctl.errors import PlvmError
from plvmctl.images import load_image
from plvmctl.lab import toy
from plvmctl.store import ConceptStore
from plvmctl.methods.yollava.trainer import (
    CONVERSATIONS_FILE,
    CURVE_FILE,
    LOG_FILE,
    RESULT_FILE,
    YollavaConfig,
    train_yollava,
    yollava_trainer,
)
from plvmctl.train.data import Sample
from plvmctl.train.per_concept import attribute_plan, build_conversations, gather_negatives, list_photos, name_answer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


def small_config(**changes) -> YollavaConfig:
    """A run that takes seconds on the tiny model."""
    settings = dict(epochs=3, recognition_per_photo=2, attribute_per_photo=1, random_negatives=8,
                    hard_negatives=0, attribute_max_new_tokens=4, select_after_epoch=1,
                    num_context=4, batch_size=4)
    settings.update(changes)
    return YollavaConfig(**settings)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Photos of two toy identities (4 each) and 12 negatives of other identities."""
    root = tmp_path_factory.mktemp("yollava")
    identities = toy.training_identities()
    ana, bo = identities[0], identities[len(identities) // 2]
    save_portraits(root / "ana", ana, 4, seed=1)
    save_portraits(root / "bo", bo, 4, seed=2)
    others = random.Random(3).sample([i for i in identities if i not in (ana, bo)], 12)
    negatives = root / "negatives"
    negatives.mkdir()
    rng = random.Random(4)
    for number, other in enumerate(others):
        toy.render_portrait(other, rng, size=48).save(negatives / f"n{number:02d}.png")
    return {"root": root, "ana": root / "ana", "bo": root / "bo", "negatives": negatives}


@pytest.fixture(scope="module")
def trained(runtime, world):
    """One training run of <ana>, with the model's state dict from before it."""
    before = {key: value.detach().clone() for key, value in runtime.backbone.model.state_dict().items()}
    config = small_config()
    positives = list_photos(world["ana"])
    negatives = gather_negatives(runtime, positives, config, negatives_dir=world["negatives"]).photos
    result = train_yollava(runtime, "ana", positives, negatives, config, world["root"] / "run-ana")
    return {"before": before, "result": result, "config": config, "positives": positives,
            "negatives": negatives}


# -- only the concept learns -------------------------------------------------------------------


def test_model_is_bit_identical_after_training(runtime, trained):
    after = runtime.backbone.model.state_dict()
    assert set(after) == set(trained["before"])
    changed = [key for key, value in after.items() if not torch.equal(value, trained["before"][key])]
    assert changed == []
    assert not any(p.requires_grad for p in runtime.backbone.model.parameters())


def test_concept_tensors_moved_from_their_start(runtime, trained):
    start = yollava_trainer(runtime, "ana", trained["config"]).concept()
    concept = trained["result"].concept
    for part in ("word", "head", "context"):
        assert not torch.equal(getattr(start, part), getattr(concept, part)), part
    assert concept.num_context == trained["config"].num_context


def test_initial_rows_are_the_init_word_plus_small_noise(runtime):
    config = small_config(init_noise=0.0)
    trainer = yollava_trainer(runtime, "ana", config)
    person = runtime.backbone.tokenizer.convert_tokens_to_ids("person")
    embedding = runtime.backbone.model.get_input_embeddings().weight
    head = runtime.backbone.model.get_output_embeddings().weight
    assert torch.equal(trainer.word[0].detach(), embedding[person])
    assert torch.equal(trainer.head[0].detach(), head[person])
    noisy = yollava_trainer(runtime, "ana", small_config(init_noise=0.1))
    rows = noisy.context[0].detach()
    assert not torch.equal(rows[0], rows[1])  # every latent token gets its own noise
    assert float((rows - embedding[person]).norm(dim=-1).max()) < float(embedding[person].norm())


def test_loss_falls(runtime, trained):
    epochs = trained["result"].epochs
    assert epochs[-1]["mean_loss"] < epochs[0]["mean_loss"]
    trainer = yollava_trainer(runtime, "ana", small_config())
    samples = build_conversations(runtime, "ana", trained["positives"][:2], trained["negatives"][:2],
                                  small_config(), None).samples[:4]
    first = trainer.step(samples)
    for _ in range(15):
        last = trainer.step(samples)
    assert last < first - 0.05


# -- cached vision features --------------------------------------------------------------------


def test_cached_features_give_the_same_loss_and_gradient(runtime, trained):
    samples = build_conversations(runtime, "ana", trained["positives"], trained["negatives"][:3],
                                  small_config(), None).samples
    picked = [s for s in samples if s.kind == "positive"][:2] + \
        [s for s in samples if s.kind == "negative"][:1] + [s for s in samples if s.kind == "attribute"][:1]
    assert {s.kind for s in picked} == {"positive", "negative", "attribute"}
    trainer = yollava_trainer(runtime, "ana", small_config())
    gradients = []
    losses = []
    for cached in (True, False):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = trainer.loss(picked, cached=cached)
        loss.backward()
        losses.append(float(loss.detach()))
        gradients.append(trainer.context.grad.clone())
    assert trainer.features  # the cached run filled the cache
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    assert torch.allclose(gradients[0], gradients[1], rtol=1e-5, atol=1e-8)
    flips = [True, False, True]  # one per photo row
    flipped = [float(trainer.loss(picked, cached=c, flips=flips).detach()) for c in (True, False)]
    assert flipped[0] == pytest.approx(flipped[1], rel=1e-6, abs=1e-7)
    assert flipped[0] != pytest.approx(losses[0], rel=1e-9, abs=1e-12)


# -- the run's outputs -------------------------------------------------------------------------


def test_run_writes_its_files_and_picks_the_best_epoch(runtime, trained):
    result = trained["result"]
    config = trained["config"]
    for name in (CONVERSATIONS_FILE, LOG_FILE, CURVE_FILE, RESULT_FILE):
        assert (result.out / name).is_file(), name
    assert result.best_epoch > config.select_after_epoch
    scored = [row for row in result.epochs if "accuracy" in row]
    assert [row["epoch"] for row in scored] == list(range(config.select_after_epoch + 1, config.epochs + 1))
    best = max(row["accuracy"]["mean"] for row in scored)
    assert result.best_accuracy["mean"] == best
    steps = [json.loads(line) for line in (result.out / LOG_FILE).read_text().splitlines()]
    assert sum(1 for row in steps if row["kind"] == "step") == len(result.losses)
    meta = result.concept.meta
    assert meta.method == "yollava"
    assert meta.base_model == runtime.backbone.fingerprint
    assert result.counts["positive"] == config.recognition_per_photo * len(trained["positives"])
    assert result.counts["negative"] == len(trained["negatives"])


def test_concept_file_round_trip(tmp_path, trained):
    concept = trained["result"].concept
    store = ConceptStore(tmp_path)
    store.save(concept)
    loaded = store.load("ana")
    assert loaded.meta.method == "yollava"
    assert torch.equal(loaded.context, concept.context)
    assert loaded.meta.extra["best_epoch"] == str(trained["result"].best_epoch)


def test_conversations_are_cached_and_not_asked_again(runtime, trained, world):
    config = small_config()
    cache = trained["result"].out / CONVERSATIONS_FILE
    again = build_conversations(runtime, "ana", trained["positives"], trained["negatives"], config, cache)
    plan = attribute_plan(trained["positives"], config.attribute_per_photo, config.seed)
    assert again.asked == 0 and again.reused == len(plan)
    attributes = [s for s in again.samples if s.kind == "attribute"]
    assert attributes and all(s.photo is None and "<ana>" in s.question for s in attributes)
    assert all(s.photo is not None for s in again.samples if s.kind != "attribute")
    stored = json.loads(cache.read_text())
    assert stored["base_model"] == runtime.backbone.fingerprint


def test_name_answer_puts_the_name_in():
    assert name_answer("The person has short red hair.", "ana") == "<ana> has short red hair."
    assert name_answer(" this person wears glasses", "bo") == "<bo> wears glasses"
    assert name_answer("Blue.", "ana") == "Blue."


# -- several concepts at once ------------------------------------------------------------------


def test_two_yollava_concepts_in_one_question(runtime, trained, world):
    config = small_config(epochs=1, select_after_epoch=1)
    bo = train_yollava(runtime, "bo", list_photos(world["bo"]), trained["negatives"], config,
                       world["root"] / "run-bo").concept
    ana = trained["result"].concept
    engine = Engine(runtime, {"ana": ana, "bo": bo})
    photo = list_photos(world["ana"])[0]
    question = "Are <ana> and <bo> both in this photo?"
    [result] = engine.ask([AskRequest(question, photo)])
    assert result.ok, result.error
    [scores] = engine.score_options([AskRequest(question, photo)], [["Yes", "No"]])
    assert scores.error is None and len(scores.logprobs) == 2
    # each concept is really read: swapping in a different <bo> changes the scores
    other = Concept("bo", bo.word, bo.head, torch.zeros_like(bo.context), bo.meta)
    [changed] = Engine(runtime, {"ana": ana, "bo": other}).score_options(
        [AskRequest(question, photo)], [["Yes", "No"]])
    assert changed.logprobs != scores.logprobs


# -- negatives ---------------------------------------------------------------------------------


def test_folder_negatives_exclude_the_positives(runtime, world, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    positives = list_photos(world["ana"])
    for path in positives[:2] + list_photos(world["negatives"])[:5]:
        (mixed / path.name).write_bytes(path.read_bytes())
    inside = [mixed / p.name for p in positives[:2]]
    negatives = gather_negatives(runtime, inside, small_config(random_negatives=100), negatives_dir=mixed)
    assert len(negatives.photos) == 5
    assert not set(inside) & set(negatives.photos)


def test_no_negatives_is_a_clear_error(runtime, world, tmp_path):
    with pytest.raises(PlvmError, match="negatives"):
        gather_negatives(runtime, list_photos(world["ana"]), small_config())
    with pytest.raises(PlvmError, match="negative photos"):
        train_yollava(runtime, "ana", list_photos(world["ana"]), [], small_config(), tmp_path)
    with pytest.raises(PlvmError, match="epochs"):
        small_config(epochs=0).validate()


@pytest.fixture(scope="module")
def index(runtime, world, tmp_path_factory):
    """An image-folder index (the backbone's embeddings) over the negatives + one copy of a
    positive of <ana> (a near-duplicate that must never become a negative)."""
    from plvmctl import image_index

    root = tmp_path_factory.mktemp("index")
    pool = root / "pool"
    pool.mkdir()
    for path in list_photos(world["negatives"]):
        (pool / path.name).write_bytes(path.read_bytes())
    (pool / "copy_of_ana.png").write_bytes(list_photos(world["ana"])[0].read_bytes())

    def embed(images):
        return runtime.backbone.embed_images(images).numpy()

    folder = image_index.embed_image_folder(pool, root / "work", embed, progress=False)
    image_index.build_index(folder.source, root / "pool.faiss", progress=False)
    return {"path": root / "pool.faiss", "pool": pool}


def test_index_negatives_hard_and_random_without_the_positives(runtime, world, index):
    from plvmctl import image_index

    positives = list_photos(world["ana"])[:1]
    copy_of_ana = index["pool"] / "copy_of_ana.png"
    query = runtime.backbone.embed_images([load_image(positives[0])]).numpy()
    [top, *_] = image_index.open_index(index["path"]).search(query, 3, dedup_threshold=None)[0]
    assert Path(top.metadata["path"]) == copy_of_ana  # the nearest neighbour, unless excluded
    # 13 rows: 5 hard, then all 8 others drawn at random; the copy is among them and dropped
    config = small_config(hard_negatives=5, random_negatives=8, exclude_threshold=0.9999)
    negatives = gather_negatives(runtime, positives, config, index=index["path"])
    assert len(negatives.hard) == 5 and len(negatives.easy) == 7
    assert not set(negatives.hard) & set(negatives.easy)
    assert copy_of_ana not in negatives.photos
    assert negatives.missing == 0
    assert all(path.parent == index["pool"] for path in negatives.photos)


def test_index_hits_without_a_file_are_counted_or_found_by_id(runtime, world, index, tmp_path):
    from plvmctl import image_index

    positives = list_photos(world["ana"])
    config = small_config(hard_negatives=3, random_negatives=0, exclude_threshold=0.99999)
    opened = image_index.open_index(index["path"])
    embeddings = runtime.backbone.embed_images([load_image(p) for p in positives]).numpy()
    [first, *_] = image_index.hard_negatives(opened, embeddings, 3, 0.99999)
    moved = tmp_path / "by_id"
    moved.mkdir()
    original = Path(first.metadata["path"])
    stash = tmp_path / "stash.png"
    original.rename(stash)
    try:
        lost = gather_negatives(runtime, positives, config, index=index["path"])
        assert lost.missing == 1 and len(lost.hard) == 2
        (moved / f"{first.id}.png").write_bytes(stash.read_bytes())
        found = gather_negatives(runtime, positives, config, index=index["path"], negatives_dir=moved)
        assert found.missing == 0 and moved / f"{first.id}.png" in found.hard
    finally:
        stash.rename(original)


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli():
    from plvmctl.cli import main

    return main


def test_cli_trains_a_concept_that_ask_loads(cli, world, tmp_path):
    runner = CliRunner()
    store = tmp_path / "store"
    common = ["--recipe", "tiny", "--device", "cpu", "--store", str(store)]
    args = common + ["train", "yollava", str(world["ana"]), "--name", "cli_ana",
                     "--negatives", str(world["negatives"]), "--out", str(tmp_path / "run"),
                     "--set", "yollava.epochs=1", "--set", "yollava.recognition_per_photo=1",
                     "--set", "yollava.attribute_per_photo=1", "--set", "yollava.random_negatives=4",
                     "--set", "yollava.num_context=3", "--set", "yollava.attribute_max_new_tokens=3"]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == store / "cli_ana.concept" and path.is_file()
    concept = Concept.load(path)
    assert concept.meta.method == "yollava" and concept.num_context == 3
    assert (tmp_path / "run" / CONVERSATIONS_FILE).is_file()

    photo = str(list_photos(world["ana"])[0])
    asked = runner.invoke(cli, common + ["ask", photo, "Is <cli_ana> in this photo?"])
    assert asked.exit_code == 0, asked.output

    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output
    wrong = runner.invoke(cli, args[:-2] + ["--set", "generation.max_new_tokens=3", "--force"])
    assert wrong.exit_code == 1 and "yollava.KEY=VALUE" in wrong.output


# -- the eval method ---------------------------------------------------------------------------


def test_eval_method_trains_once_and_reuses_the_cache(runtime, world, tmp_path):
    from plvmctl import engine as engine_api
    from plvmctl.methods import METHODS, MethodContext, Reference, negative_pool

    references = []
    for number, folder in enumerate((world["ana"], world["bo"], world["negatives"])):
        identity = tmp_path / "set" / f"person{number}"
        identity.mkdir(parents=True)
        source = list_photos(folder)
        (identity / "ref_img.png").write_bytes(source[0].read_bytes())
        (identity / "ref_img2.png").write_bytes(source[1].read_bytes())
        references.append(Reference(f"person{number}", identity / "ref_img.png"))
    section = dataclasses.asdict(small_config(epochs=1, select_after_epoch=1))
    recipe = dataclasses.replace(runtime.recipe, sections={**runtime.recipe.sections, "yollava": section})
    local = dataclasses.replace(runtime, recipe=recipe)
    pool = tmp_path / "pool"  # other people than the three references
    pool.mkdir()
    for photo in list_photos(world["negatives"])[2:]:
        (pool / photo.name).write_bytes(photo.read_bytes())
    context = MethodContext(runtime=local, references=references, cache_dir=tmp_path / "cache",
                            engine_api=engine_api, negatives=negative_pool("yollava", None, pool, None))
    prepared = METHODS["yollava"](context)
    assert prepared.unavailable == {}
    assert prepared.seconds_per_concept is not None and prepared.seconds_per_concept > 0
    files = sorted((tmp_path / "cache" / "yollava").glob("*.concept"))
    assert [f.stem for f in files] == ["person0", "person1", "person2"]
    stamps = [f.stat().st_mtime_ns for f in files]
    concept = Concept.load(files[0])
    assert concept.meta.extra["positives"] == "2"  # ref_img.png and ref_img2.png

    again = METHODS["yollava"](context)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # nothing trained again
    assert again.seconds_per_concept == pytest.approx(prepared.seconds_per_concept, rel=1e-3)
    [answer] = again.engine.ask([AskRequest("Is <person0> here?", references[1].path)])
    assert answer.ok, answer.error


# -- peft's TrainableTokens on the same row gives the same gradient ---------------------------


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_same_word_gradient_as_peft_trainable_tokens(runtime):
    from peft import TrainableTokensConfig, get_peft_model

    from plvmctl.prompt import build_prompt, encode_segments
    from plvmctl.table import ConceptTable

    backbone = runtime.backbone
    tokenizer = backbone.tokenizer
    vocab = backbone.vocab_size
    stand_in = tokenizer.convert_tokens_to_ids("purple")  # not in the prompt otherwise
    context_ids = [tokenizer.convert_tokens_to_ids(w) for w in ("red", "hat")]
    embedding = backbone.model.get_input_embeddings().weight.detach()
    head = backbone.model.get_output_embeddings().weight.detach()
    word = torch.nn.Parameter(embedding[stand_in].clone())
    concept = Concept("sks", word, head[stand_in].clone(), embedding[context_ids].clone())
    table = ConceptTable([concept], vocab)
    segments = build_prompt("Is <sks> in this photo?", template=runtime.template, has_image=False,
                            concepts={"sks": 2})

    def ids(slot_id):
        return encode_segments(segments, tokenizer, slot_id=slot_id,
                               image_token_id=backbone.image_token_id,
                               num_image_tokens=backbone.num_image_tokens)

    answer = tokenizer(" yes .", add_special_tokens=False)["input_ids"] + [backbone.eos_token_id]
    ours = torch.tensor([ids(table.slot_id) + answer])
    real = torch.tensor([ids(lambda s: stand_in if s.index < 0 else context_ids[s.index]) + answer])
    # `<sks>` twice (its sentence and the question) + 2 context tokens; nowhere else
    assert int((ours != real).sum()) == 4
    assert int((real == stand_in).sum()) == int((ours == table.word_id("sks")).sum()) == 2
    targets = torch.tensor(answer)

    def answer_loss(logits):
        return torch.nn.functional.cross_entropy(logits[0, -len(answer) - 1:-1, :vocab], targets)

    with table.active(backbone.model):
        loss_ours = answer_loss(backbone.model(input_ids=ours).logits)
    loss_ours.backward()

    peft_model = get_peft_model(copy.deepcopy(backbone.model),
                                TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[stand_in]))
    loss_peft = answer_loss(peft_model(input_ids=real).logits)
    loss_peft.backward()
    [delta] = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    assert float(loss_ours.detach()) == pytest.approx(float(loss_peft.detach()), rel=1e-6)
    assert torch.allclose(word.grad, delta.grad[0], rtol=1e-5, atol=1e-9)
    assert float(word.grad.abs().max()) > 0


# -- learning, on a model that can learn --------------------------------------------------------


POCKET = Path(__file__).resolve().parents[1] / "plvmctl" / "assets" / "pocket"


@pytest.mark.slow
@pytest.mark.skipif(not POCKET.is_dir(), reason="needs the pocket model (python -m plvmctl.lab.pocket)")
def test_yollava_beats_the_no_prompt_baseline_on_a_toy_identity(tmp_path):
    """On the random tiny model answers hardly depend on the photo, so this runs on the pocket
    model trained on the toy world: a concept trained on a held-out identity must recognise new
    photos of it better than plain LLaVA with the name as literal text. The pocket base
    reasons before its verdict, so answers are generated and read as `plvmctl eval` reads
    them, and the recipe's yollava settings (reasoning_base: recognition rows in the base
    model's own reasoning) apply."""
    from plvmctl.answers import parse_yes_no
    from plvmctl.recipe import load_recipe
    from plvmctl.runtime import load_runtime

    recipe = load_recipe("pocket")
    pocket = load_runtime(recipe, device="cpu")
    heldout = toy.heldout_identities()
    rng = random.Random(11)
    me = heldout[5]
    others = rng.sample([i for i in heldout if i != me], 40)
    positives = save_portraits(tmp_path / "me", me, 5, seed=21)
    negatives = [p for number, other in enumerate(others[:30])
                 for p in save_portraits(tmp_path / "neg" / str(number), other, 1, seed=100 + number)]
    test_yes = [toy.random_scene(me, rng, heldout)[0] for _ in range(10)]
    test_no = [toy.random_scene(other, rng, [i for i in heldout if i != me])[0] for other in others[30:]]
    config = recipe.section("yollava", YollavaConfig)
    config = dataclasses.replace(config, epochs=8, attribute_per_photo=5, random_negatives=30, hard_negatives=0,
                     attribute_max_new_tokens=12)
    result = train_yollava(pocket, "me", positives, negatives, config, tmp_path / "run")

    def accuracy(engine) -> tuple[float, float]:
        requests = [AskRequest("Is <me> in this photo?", p) for p in test_yes + test_no]
        said = [parse_yes_no(r.answer) for r in engine.ask(requests)]
        positive = sum(s == "yes" for s in said[:len(test_yes)]) / len(test_yes)
        negative = sum(s == "no" for s in said[len(test_yes):]) / len(test_no)
        return positive, negative

    trained = accuracy(Engine(pocket, {"me": result.concept}))
    baseline = accuracy(Engine(pocket, {}, literal_names=True))
    assert sum(trained) / 2 > sum(baseline) / 2 + 0.1, (trained, baseline)
    assert min(trained) >= 0.5, trained  # not one constant answer: it tells the person apart


def test_samples_mention_the_name(runtime, trained):
    samples: list[Sample] = build_conversations(runtime, "ana", trained["positives"][:1],
                                                trained["negatives"][:1], small_config(), None).samples
    assert all("<ana>" in s.question for s in samples)
    assert all(s.answer.startswith("Yes") for s in samples if s.kind == "positive")
    assert all(s.answer.startswith("No") for s in samples if s.kind == "negative")


def test_a_reasoning_base_gets_no_recognition_conversations_and_scores_verdicts(runtime, world, monkeypatch,
                                                                                 tmp_path):
    """For a base that compares before its verdict, the concept learns from attribute
    conversations only, and an epoch is scored by the verdict its generated answers reach."""
    from plvmctl import engine

    config = small_config(reasoning_base=True, epochs=2, select_after_epoch=0, reasoning_max_new_tokens=7)
    positives = list_photos(world["ana"])
    negatives = gather_negatives(runtime, positives, config, negatives_dir=world["negatives"]).photos
    asked = []

    def always_a_match(self, requests, **kwargs):
        if "Is <ana>" in requests[0].question:
            asked.append(kwargs["max_new_tokens"])
            return [engine.AskResult(r, "middle hair red red same match. Yes, <ana> is here.") for r in requests]
        return [engine.AskResult(r, "red") for r in requests]  # the attribute answers

    monkeypatch.setattr(engine.Engine, "ask", always_a_match)
    result = train_yollava(runtime, "ana", positives, negatives, config, tmp_path / "run")
    assert result.counts["positive"] == result.counts["negative"] == 0
    assert result.counts["attribute"] > 0
    assert asked == [7, 7]  # both epochs scored by generating
    assert result.best_accuracy == {"positive": 1.0, "negative": 0.0, "mean": 0.5}


def test_a_reasoning_base_gets_recognition_rows_in_its_own_words(tmp_path, monkeypatch):
    """reasoning_base: the base model describes the first photo, answers each recognition
    question with that description in its prompt, and rows with the right verdict keep its
    reasoning; a wrong verdict drops the row."""
    from plvmctl import engine as engine_module
    from plvmctl.engine import AskResult
    from plvmctl.train.per_concept import reasoned_recognition_samples

    positives = [tmp_path / "p0.png", tmp_path / "p1.png"]
    negatives = [tmp_path / "n0.png", tmp_path / "n1.png"]
    asked = []

    class ScriptedEngine:
        def __init__(self, runtime, concepts, descriptions=None, **kwargs):
            self.descriptions = dict(descriptions or {})

        def ask(self, requests, **kwargs):
            results = []
            for request in requests:
                asked.append((request.question, Path(request.image).name, self.descriptions))
                if not self.descriptions:
                    answer = "The person in this photo is a person with red hair."
                elif Path(request.image).name == "n1.png":  # misjudged: dropped
                    answer = "middle red hair red same match. Yes, <me> is here."
                else:
                    verdict = "Yes, <me> is here." if request.image in positives else "No."
                    answer = f"middle red hair red same match. {verdict}"
                results.append(AskResult(request, answer=answer))
            return results

    monkeypatch.setattr(engine_module, "Engine", ScriptedEngine)
    config = YollavaConfig(recognition_per_photo=2, reasoning_base=True)
    rows = reasoned_recognition_samples(None, "me", positives, negatives, config)
    assert asked[0][1] == "p0.png" and asked[0][2] == {}  # the first photo, described by the base model
    assert all(description == {"me": "a person with red hair"} for _, _, description in asked[1:])
    assert [(row.kind, row.photo.name) for row in rows] == [
        ("positive", "p0.png"), ("positive", "p0.png"), ("positive", "p1.png"), ("positive", "p1.png"),
        ("negative", "n0.png")]
    assert all(row.reasoning == "middle red hair red same match" for row in rows)
    from plvmctl.data.templates import NEGATIVE_ANSWERS, POSITIVE_ANSWERS, fill

    for row in rows:  # the verdict is the template's, not what the base model wrote after "Yes"
        templates = POSITIVE_ANSWERS if row.kind == "positive" else NEGATIVE_ANSWERS
        assert row.answer in [fill(answer, "me") for answer in templates]
