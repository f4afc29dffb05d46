"""Tests for PLVM Aligner training: Eq. 2, batches, the sampler, the loop, resume, Ctrl-C, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from plvmctl.aligner import load_aligner
from plvmctl.concept import Concept
from plvmctl.data.templates import ATTRIBUTE_QUESTIONS, NEGATIVE_ANSWERS, POSITIVE_ANSWERS
from plvmctl.errors import PlvmError
from plvmctl.lab import toy as toy_world
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.train.aligner import TrainConfig, logged_losses, train_aligner, weighted_answer_loss
from plvmctl.train.batches import IGNORE, encode_batch
from plvmctl.train.common import (
    TrainingInterrupted,
    capture_rng_state,
    draw_loss_curve,
    lr_multiplier,
    read_jsonl,
    restore_rng_state,
)
from plvmctl.train.data import (
    PlvmSampler,
    Sample,
    fill_attributes,
    hard_neighbours,
    neutral_question,
    read_manifest,
)

COLOURS = {"ann": (220, 40, 40), "bob": (40, 200, 60), "cid": (40, 60, 220)}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


def write_world(root: Path, attributes: bool = True) -> Path:
    """Three identities, a plain-colour reference and two simple query photos each."""
    rows = []
    for index, (name, colour) in enumerate(COLOURS.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), colour).save(folder / "ref.png")
        queries = []
        for j in range(2):
            image = Image.new("RGB", (24, 24), (255, 255, 255))
            ImageDraw.Draw(image).rectangle([4 + 4 * j, 4, 18, 20], fill=colour)
            image.save(folder / f"q{j}.png")
            queries.append(f"{name}/q{j}.png")
        row = {"name": name, "reference": f"{name}/ref.png", "queries": queries, "extra": index}
        if attributes:
            row["attributes"] = [
                {"question": "What colour is <sks>'s hair?", "answer": ["red", "green", "blue"][index]},
                {"question": "Does <sks> wear glasses?", "answer": "No."},
            ]
        rows.append(row)
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def runtime():
    return load_runtime(load_recipe("tiny"), device="cpu")


def config_for(manifest: Path, out: Path, **changes) -> TrainConfig:
    base = TrainConfig(lr=1e-3, batch_size=2, grad_accum=2, steps=6, warmup_steps=2,
                       checkpoint_every=2, data=str(manifest), out=str(out))
    return replace(base, **changes)


def leftovers(folder: Path) -> list[str]:
    """Temporary or backup files and folders left anywhere under `folder`."""
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))
            or (p.name.startswith(".") and p.name != ".")]


# ------------------------------------------------------------------------------ Eq. 2


def test_weighted_answer_loss_hand_computed():
    # V = 2. Row 0: t0 is prompt (label -100, its weight must not count), t1 is the Yes/No
    # token (w = 20) with logits [ln 3, 0] and label 0, so p = 3/4 and CE = ln(4/3);
    # t2 has logits [0, 0], label 1: CE = ln 2, w = 1. Row 1: t0 logits [0, 0], label 0:
    # CE = ln 2, w = 1; t1, t2 are padding.
    # L = (20 ln(4/3) + ln 2 + ln 2) / (20 + 1 + 1) = 7.1399358 / 22 = 0.3245425
    logits = torch.tensor([[[5.0, -5.0], [math.log(3.0), 0.0], [0.0, 0.0]],
                           [[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]])
    labels = torch.tensor([[IGNORE, 0, 1], [0, IGNORE, IGNORE]])
    weights = torch.tensor([[5.0, 20.0, 1.0], [1.0, 0.0, 0.0]])
    loss = weighted_answer_loss(logits, labels, weights)
    assert loss.item() == pytest.approx(0.3245425, abs=1e-6)
    total, norm = weighted_answer_loss(logits, labels, weights, reduction="sum")
    assert total.item() == pytest.approx(7.1399358, abs=1e-6)
    assert norm.item() == 22.0
    # all weights 1: plain mean cross-entropy over the answer tokens
    ones = torch.ones_like(weights)
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1),
                                              ignore_index=IGNORE)
    assert weighted_answer_loss(logits, labels, ones).item() == pytest.approx(plain.item(), abs=1e-6)
    with pytest.raises(ValueError):
        weighted_answer_loss(logits, labels[:, :2], weights)


def test_weighted_answer_loss_gradient_follows_weights():
    logits = torch.zeros(1, 2, 3, requires_grad=True)
    labels = torch.tensor([[0, 1]])
    weighted_answer_loss(logits, labels, torch.tensor([[20.0, 1.0]])).backward()
    grad = logits.grad[0]
    # d/dlogit of w·CE / Σw: the weighted token pulls 20 times harder
    assert grad[0, 0].item() == pytest.approx(20 * (1 / 3 - 1) / 21, abs=1e-6)
    assert grad[1, 1].item() == pytest.approx(1 * (1 / 3 - 1) / 21, abs=1e-6)


# ------------------------------------------------------------------------------ batches


def test_encode_batch_labels_weights_and_padding(runtime, world):
    backbone = runtime.backbone
    ann = world.parent / "ann"
    samples = [
        Sample("ann", "positive", "Is <ann> in this photo?", "Yes, that is <ann>.", ann / "ref.png"),
        Sample("bob", "attribute", "Does <bob> wear glasses?", "No.", None),
        Sample("ann", "negative", "Is <ann> in this photo?", "No.", ann / "q0.png"),
    ]
    batch = encode_batch(samples, backbone, runtime.template, 4, yes_no_weight=20.0)
    assert batch.names == ["ann", "bob"]
    assert [p.name for p in batch.photos] == ["ref.png", "q0.png"]  # rows 0 and 2, in order
    yes_id = backbone.tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no_id = backbone.tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    vocab = backbone.vocab_size
    for row, first, yes_no in ((0, yes_id, True), (1, no_id, False), (2, no_id, True)):
        length = int(batch.attention_mask[row].sum())
        start = batch.prompt_lengths[row]
        ids = batch.input_ids[row]
        assert (batch.labels[row, :start] == IGNORE).all()
        assert torch.equal(batch.labels[row, start:length], ids[start:length])
        assert ids[start].item() == first
        assert batch.weights[row, start].item() == (20.0 if yes_no else 1.0)
        assert (batch.weights[row, start + 1:length] == 1.0).all()
        assert ids[length - 1].item() == backbone.eos_token_id
        # right padding: pad ids, no attention, no label, no weight
        assert (ids[length:] == backbone.pad_token_id).all()
        assert (batch.labels[row, length:] == IGNORE).all() and (batch.weights[row, length:] == 0).all()
        has_image = (ids == backbone.image_token_id).any().item()
        assert has_image == (samples[row].photo is not None)
    # the prompt holds `<ann> is <t1>…<t4>.`; `<ann>` in the answer is its virtual word id
    answer = batch.input_ids[0, batch.prompt_lengths[0]:int(batch.attention_mask[0].sum())]
    assert vocab + 0 in answer.tolist()
    prompt = batch.input_ids[0, :batch.prompt_lengths[0]].tolist()
    assert [vocab + 2 + j for j in range(4)] == [i for i in prompt if i >= vocab + 2][:4]


# ------------------------------------------------------------------------------ data


def test_manifest_errors_and_skips(tmp_path, world):
    with pytest.raises(PlvmError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "a"}\n{not json\n', encoding="utf-8")
    with pytest.raises(PlvmError, match="line 2"):
        read_manifest(bad)
    lines = world.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows[0]["queries"].append("ann/missing.png")
    rows[1]["reference"] = "bob/gone.png"
    rows[2]["name"] = "no spaces"
    copy = world.parent / "edited.jsonl"
    copy.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n", encoding="utf-8")
    manifest = read_manifest(copy)
    assert [i.name for i in manifest.identities] == ["ann"]
    assert len(manifest.identities[0].queries) == 2
    text = "\n".join(manifest.problems)
    assert "missing.png" in text and "gone.png" in text and "invalid concept name" in text


def test_sampler_mix_is_deterministic_and_follows_the_shares(world):
    identities = read_manifest(world).identities
    sampler = PlvmSampler(identities, seed=3)
    again = PlvmSampler(identities, seed=3)
    assert [sampler.sample(i) for i in range(50)] == [again.sample(i) for i in range(50)]
    assert [sampler.sample(i) for i in range(50)] != [PlvmSampler(identities, seed=4).sample(i)
                                                      for i in range(50)]
    samples = [sampler.sample(i) for i in range(3000)]
    kinds = [s.kind for s in samples]
    recognition = [k for k in kinds if k != "attribute"]
    assert len(recognition) / len(kinds) == pytest.approx(0.5, abs=0.04)
    assert recognition.count("positive") / len(recognition) == pytest.approx(0.6, abs=0.04)
    for sample in samples:
        owner = sample.photo.parent.name if sample.photo else None
        if sample.kind == "attribute":
            assert sample.photo is None and "<sks>" not in sample.question
        elif sample.kind == "positive":
            assert owner == sample.name and sample.answer.startswith("Yes")
            assert sample.answer.replace(f"<{sample.name}>", "<sks>") in POSITIVE_ANSWERS
        else:
            assert owner != sample.name and sample.answer.startswith("No")
            assert sample.answer.replace(f"<{sample.name}>", "<sks>") in NEGATIVE_ANSWERS
    # each epoch visits every identity once
    assert sorted(s.name for s in samples[:3]) == ["ann", "bob", "cid"]


def test_hard_negatives_come_from_the_most_similar_identities(world):
    identities = read_manifest(world).identities
    names = [i.name for i in identities]
    cls = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # ann ~ bob, cid far away
    ranking = hard_neighbours(names, cls)
    assert ranking["ann"] == ["bob", "cid"] and ranking["cid"][0] == "bob"
    import plvmctl.train.data as data_module

    sampler = PlvmSampler(identities, seed=0, negatives="hard", hard_neighbours=ranking)
    original = data_module.HARD_POOL
    data_module.HARD_POOL = 1
    try:
        negatives = [s for s in (sampler.sample(i) for i in range(300)) if s.kind == "negative"]
    finally:
        data_module.HARD_POOL = original
    assert negatives
    assert all(s.photo.parent.name == "bob" for s in negatives if s.name == "ann")



def test_sampler_puts_other_concepts_beside_a_share_of_samples(world):
    """also_share: that share of samples has 1-2 other concepts after its own; the sample is
    otherwise the one drawn without, and half the negatives with others have the person in the
    photo among them."""
    identities = read_manifest(world).identities
    plain = [PlvmSampler(identities, seed=3).sample(i) for i in range(600)]
    mixed = [PlvmSampler(identities, seed=3, also_share=0.5).sample(i) for i in range(600)]
    assert [replace(s, also=()) for s in mixed] == plain
    beside = [s for s in mixed if s.also]
    assert len(beside) / len(mixed) == pytest.approx(0.5, abs=0.06)
    assert all(1 <= len(s.also) <= 2 and s.name not in s.also and len(set(s.also)) == len(s.also)
               for s in beside)
    negatives = [s for s in beside if s.kind == "negative"]
    shown = [s for s in negatives if s.photo.parent.name in s.also]
    assert 0.3 < len(shown) / len(negatives) < 0.9  # half by design, plus random picks of the owner
    with pytest.raises(PlvmError, match="also_share"):
        PlvmSampler(identities, also_share=1.5)

def test_sampler_asks_a_share_of_attribute_samples_about_a_photo(tmp_path):
    """visual_share: that share of the attribute samples asks one of the person's "visual"
    questions, with its photo, in place of the text-only one; every other sample is the one
    drawn without. The manifest keeps only visual questions whose photo exists."""
    manifest = toy_world.generate_training_data(tmp_path, 6, 2, seed=2, progress=False, extra_scenes=0,
                                                visual_mcq_per_photo=2)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["visual"][0]["image"] = "images/nobody/q9.png"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    read = read_manifest(manifest)
    assert len(read.identities[0].visual) == 3 and len(read.identities[1].visual) == 4
    assert any("visual question's photo" in problem for problem in read.problems)
    plain = [PlvmSampler(read.identities, seed=1).sample(i) for i in range(400)]
    mixed = [PlvmSampler(read.identities, seed=1, visual_share=0.5).sample(i) for i in range(400)]
    asked = [(s, m) for s, m in zip(plain, mixed) if s != m]
    assert all(s.kind == m.kind == "attribute" and s.photo is None and m.photo is not None for s, m in asked)
    attributes = sum(s.kind == "attribute" for s in plain)
    assert len(asked) / attributes == pytest.approx(0.5, abs=0.1)
    by_name = read.by_name()
    for _, sample in asked:
        assert (sample.photo, sample.question.replace(f"<{sample.name}>", "<sks>"), sample.answer) in \
            by_name[sample.name].visual
    assert PlvmSampler(read.identities, visual_share=0.5).state_dict()["visual_share"] == 0.5
    with pytest.raises(PlvmError, match="visual_share"):
        PlvmSampler(read.identities, visual_share=1.5)


def test_attribute_weight_scales_every_answer_token_of_attribute_samples(runtime):
    """attribute_weight: each answer token of an attribute sample weighs that much; a
    recognition sample keeps 1 and w on its verdict."""
    attribute = Sample("alice", "attribute", "What colour is <alice>'s hair?", "red", None)
    recognition = Sample("alice", "positive", "Is <alice> in this photo?", "Yes, she is.", None)
    batch = encode_batch([attribute, recognition], runtime.backbone, runtime.template, 2,
                         yes_no_weight=20.0, attribute_weight=5.0)
    answer = batch.weights[0][batch.labels[0] != IGNORE]
    assert answer.tolist() == [5.0] * len(answer)
    verdict = batch.weights[1][batch.labels[1] != IGNORE]
    assert verdict[0] == 20.0 and set(verdict[1:].tolist()) == {1.0}


def test_description_loss_is_zero_when_the_context_reads_the_description(runtime):
    """description_targets: the input embeddings of the description's first k tokens as it
    reads after "<name> is"; description_loss: 0 for a concept whose first rows are those, and
    grows with the distance."""
    from plvmctl.train.aligner import description_loss, description_targets
    from plvmctl.train.data import Identity

    person = Identity("alice", Path("ref.png"), [], [], description="red hair and a hat")
    targets = description_targets(runtime.backbone, [person], num_context=2)
    assert targets["alice"].shape == (2, runtime.backbone.hidden_size)
    context = torch.cat([targets["alice"], torch.randn(3, runtime.backbone.hidden_size)])
    exact = Concept("alice", context[0], context[0], context)
    assert float(description_loss([exact], targets)) == 0.0
    off = Concept("alice", context[0], context[0], context + 0.1)
    assert float(description_loss([off], targets)) > 0.0
    with pytest.raises(PlvmError, match="description"):
        description_targets(runtime.backbone, [Identity("bob", Path("ref.png"), [], [])], num_context=2)


def test_training_with_descriptions_reads_them_from_the_manifest(runtime, world, tmp_path):
    """description_weight: the manifest's "description" becomes each concept's target; the
    term is part of the loss (another curve than without), and a manifest without
    descriptions is refused."""
    rows = [json.loads(line) for line in world.read_text().splitlines() if line.strip()]
    described = world.parent / "described.jsonl"
    described.write_text("".join(json.dumps({**row, "description": f"a person called {row['name']}"}) + "\n"
                                 for row in rows))
    assert all(i.description.startswith("a person") for i in read_manifest(described).identities)
    plain = train_aligner(runtime, config_for(described, tmp_path / "plain"))
    pulled = train_aligner(runtime, config_for(described, tmp_path / "pulled", description_weight=1.0))
    assert all(math.isfinite(x) for x in pulled.losses) and pulled.losses != plain.losses
    with pytest.raises(PlvmError, match="description"):
        train_aligner(runtime, config_for(world, tmp_path / "none", description_weight=1.0))


def test_neutral_question():
    assert neutral_question("What colour is <sks>'s hair?") == "What colour is the person's hair?"
    assert neutral_question("<sks> wears what?") == "The person wears what?"


def test_rng_state_round_trip_and_schedule():
    state = capture_rng_state()
    first = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    restore_rng_state(state)
    second = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]
    assert lr_multiplier(0, total_steps=10, warmup_steps=3) == pytest.approx(0.25)
    assert lr_multiplier(5, total_steps=10, warmup_steps=3) == 1.0
    assert lr_multiplier(3, total_steps=10, warmup_steps=3, schedule="cosine") == 1.0
    assert lr_multiplier(10, total_steps=10, warmup_steps=3, schedule="cosine") == pytest.approx(0.0)
    with pytest.raises(PlvmError):
        lr_multiplier(0, total_steps=10, schedule="linear")


def test_loss_curve_png(tmp_path):
    path = draw_loss_curve(range(30), [5 - 0.05 * i for i in range(30)], tmp_path / "loss.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (640, 400)
        # the curve is drawn: some pixels are neither white nor black
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 16)}
        assert (30, 90, 200) in colours


# ------------------------------------------------------------------------------ the loop


def test_loss_falls_when_overfitting_one_batch(runtime, world, tmp_path):
    config = config_for(world, tmp_path / "run", steps=40, lr=3e-3, batch_size=4, grad_accum=1,
                        warmup_steps=0, overfit_batches=1, checkpoint_every=0)
    losses = train_aligner(runtime, config).losses
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05, (first, last)
    assert losses[-1] < losses[0]



def test_training_with_other_concepts_beside_puts_their_sentences_in_the_prompt(runtime, world, tmp_path):
    """also_share: the batches hold the other concepts' sentences too (their concepts made by
    the Aligner as well), and training runs and resumes as without."""
    config = config_for(world, tmp_path / "also", also_share=1.0, recognition_share=1.0)
    result = train_aligner(runtime, config)
    assert len(result.losses) == 6 and all(math.isfinite(x) for x in result.losses)
    sampler = PlvmSampler(read_manifest(world).identities, seed=0, also_share=1.0, recognition_share=1.0)
    sample = sampler.sample(0)
    batch = encode_batch([sample], runtime.backbone, runtime.template, 2, yes_no_weight=20.0)
    assert batch.names == [sample.name, *sample.also]
    ids = batch.input_ids[0].tolist()
    words = [runtime.backbone.vocab_size + i for i in range(len(batch.names))]
    assert all(word in ids for word in words)
    with pytest.raises(PlvmError, match="also_share"):
        train_aligner(runtime, config_for(world, tmp_path / "bad", also_share=2.0))

def test_frozen_weights_resume_and_interrupt_match_a_straight_run(runtime, world, tmp_path):
    backbone_before = {k: v.clone() for k, v in runtime.backbone.model.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in runtime.encoder.model.state_dict().items()}

    straight = train_aligner(runtime, config_for(world, tmp_path / "straight"))
    assert len(straight.losses) == 6 and all(math.isfinite(x) for x in straight.losses)

    # only the Aligner learned: backbone and reference encoder are bit-identical
    for key, value in runtime.backbone.model.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key
    for key, value in runtime.encoder.model.state_dict().items():
        assert torch.equal(value, encoder_before[key]), key
    assert not any(p.requires_grad for p in runtime.backbone.model.parameters())
    assert not any(p.requires_grad for p in runtime.encoder.model.parameters())

    # N steps, then --resume to 2N steps
    split = tmp_path / "split"
    train_aligner(runtime, config_for(world, split, steps=3))
    resumed = train_aligner(runtime, config_for(world, split), resume=True)
    assert resumed.start_step == 3
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    assert logged_losses(split) == pytest.approx(dict(enumerate(straight.losses)), abs=1e-6)

    # starting again in a used folder without --resume is refused
    with pytest.raises(PlvmError, match="--resume"):
        train_aligner(runtime, config_for(world, split))

    # Ctrl-C (a KeyboardInterrupt from inside the loop) after 3 steps, no periodic checkpoint
    stopped = tmp_path / "stopped"

    def interrupt(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="after step 3 of 6"):
        train_aligner(runtime, config_for(world, stopped, checkpoint_every=0), on_step=interrupt)
    assert leftovers(stopped) == []
    state = json.loads((stopped / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and len(state["losses"]) == 3
    assert not (stopped / "aligner").exists()  # no final Aligner from an unfinished run
    assert all("loss" in row for row in read_jsonl(stopped / "log.jsonl"))
    load_aligner(stopped / "checkpoint" / "aligner")
    again = train_aligner(runtime, config_for(world, stopped, checkpoint_every=0), resume=True)
    assert again.losses == pytest.approx(straight.losses, abs=1e-6)

    # a real SIGINT: the loop finishes the step, saves, stops
    signalled = tmp_path / "signalled"

    def send_sigint(step: int, loss: float) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="after step 4 of 6"):
        train_aligner(runtime, config_for(world, signalled), on_step=send_sigint)
    assert leftovers(signalled) == []
    final = train_aligner(runtime, config_for(world, signalled), resume=True)
    assert final.losses == pytest.approx(straight.losses, abs=1e-6)


def test_cli_train_then_encode_with_the_trained_aligner(world, tmp_path):
    from plvmctl.cli import main

    out = tmp_path / "run"
    store = tmp_path / "store"
    runner = CliRunner()
    args = ["--recipe", "tiny", "--device", "cpu", "--set", "train.val_identities=1",
            "--set", "train.validate_every=2", "--set", "train.negatives=hard",
            "--set", "train.checkpoint_every=2", "train", "aligner", "--data", str(world),
            "--out", str(out), "--steps", "3"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith(str(out / "aligner"))
    rows = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [0, 1, 2]
    assert any("val_mean" in r for r in rows)
    assert set(rows[0]) == {"step", "loss", "lr", "seconds"}
    with Image.open(out / "loss.png") as image:
        assert image.format == "PNG"
    run = json.loads((out / "run.json").read_text())
    assert len(run["val_identities"]) == 1 and run["steps"] == 3

    result = runner.invoke(main, args)  # same folder, no --resume
    assert result.exit_code == 1 and "--resume" in result.output
    result = runner.invoke(main, args[:-1] + ["4", "--resume"])
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_jsonl(out / "log.jsonl") if "loss" in r] == [0, 1, 2, 3]

    reference = world.parent / "ann" / "ref.png"
    result = runner.invoke(main, ["--recipe", "tiny", "--device", "cpu", "--set",
                                  f"aligner.path={out / 'aligner'}", "--store", str(store),
                                  "encode", str(reference), "--name", "ann"])
    assert result.exit_code == 0, result.output
    concept = Concept.load(store / "ann.concept")
    # it is the trained Aligner's output for that photo
    rt = load_runtime(load_recipe("tiny", [f"aligner.path={out / 'aligner'}"]), device="cpu")
    trained = load_aligner(out / "aligner")
    expected = trained(rt.encoder.encode([Image.open(reference)]))
    assert torch.allclose(concept.word, expected.word[0], atol=1e-5)
    assert torch.allclose(concept.context, expected.context[0], atol=1e-5)


# ------------------------------------------------------------------------------ data attributes


def test_data_attributes_fills_missing_answers_and_skips_filled(runtime, tmp_path):
    manifest = write_world(tmp_path)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines]
    rows[1].pop("attributes")  # bob: nothing yet
    rows[2]["attributes"] = [{"question": "What is <sks> wearing?"}]  # cid: one unanswered
    manifest.write_text("\n".join([lines[0]] + [json.dumps(r) for r in rows[1:]]) + "\n")
    untouched = manifest.read_text().splitlines()[0]

    # stopped after the first write: bob answered and saved, cid still pending
    def stop(answered: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill_attributes(runtime, manifest, identities_per_write=1, on_write=stop)
    after = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [a["question"] for a in after[1]["attributes"]] == list(ATTRIBUTE_QUESTIONS)
    assert all(isinstance(a["answer"], str) for a in after[1]["attributes"])
    assert "answer" not in after[2]["attributes"][0]
    assert leftovers(tmp_path) == []

    from plvmctl.cli import main

    result = CliRunner().invoke(main, ["--recipe", "tiny", "--device", "cpu", "data",
                                       "attributes", str(manifest)])
    assert result.exit_code == 0, result.output
    assert "1 identities answered, 2 already answered" in result.output
    final = manifest.read_text().splitlines()
    assert final[0] == untouched  # already answered: the line is kept as it was
    cid = json.loads(final[2])
    assert cid["extra"] == 2 and isinstance(cid["attributes"][0]["answer"], str)
    result = CliRunner().invoke(main, ["--recipe", "tiny", "--device", "cpu", "data",
                                       "attributes", str(manifest)])
    assert "0 identities answered, 3 already answered" in result.output
    assert manifest.read_text().splitlines() == final

    result = CliRunner().invoke(main, ["data", "attributes", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "manifest not found" in result.output


# ------------------------------------------------------------------------------ compare answers


def write_compared_world(root: Path) -> Path:
    """The three-identity world with traits and, per query photo, who is in it."""
    manifest = write_world(root)
    hair = {"ann": "red", "bob": "green", "cid": "blue"}
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["traits"] = {"hair": hair[row["name"]], "skin": "tan"}
        row["people"] = [[{"place": "left", "traits": row["traits"]},
                          {"place": "right", "traits": {"hair": "grey", "skin": "dark"}}]] * len(row["queries"])
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return manifest


def test_the_manifest_keeps_traits_and_who_is_in_each_photo(tmp_path):
    identities = read_manifest(write_compared_world(tmp_path)).identities
    ann = identities[0]
    assert ann.traits == {"hair": "red", "skin": "tan"}
    assert ann.people[1] == [("left", {"hair": "red", "skin": "tan"}), ("right", {"hair": "grey", "skin": "dark"})]


def test_compare_samples_reason_about_the_photo_they_show(tmp_path):
    identities = read_manifest(write_compared_world(tmp_path)).identities
    sampler = PlvmSampler(identities, seed=0, recognition_share=1.0, compare_keys=["hair", "skin"])
    samples = [sampler.sample(i) for i in range(40)]
    assert {s.kind for s in samples} == {"positive", "negative"}
    for sample in samples:
        assert sample.answer.startswith("Yes" if sample.kind == "positive" else "No")
        own = sample.reasoning.startswith("left red hair red same tan skin tan same match") if sample.name == "ann" else None
        if sample.name == "ann":
            assert own == (sample.kind == "positive")
        assert sample.reasoning.endswith("right grey hair " + {"ann": "red", "bob": "green", "cid": "blue"}[sample.name]
                                         + " different dark skin tan different mismatch")
    plain = PlvmSampler(identities, seed=0, recognition_share=1.0)
    assert all(plain.sample(i).reasoning == "" for i in range(10))


def test_compare_answers_need_traits_for_every_photo(world):
    identities = read_manifest(world).identities  # no traits, no people
    with pytest.raises(PlvmError, match="traits hair"):
        PlvmSampler(identities, seed=0, compare_keys=["hair"])


def test_the_yes_no_weight_lands_on_the_verdict_after_the_reasoning(runtime, world):
    backbone = runtime.backbone
    ann = world.parent / "ann"
    sample = Sample("ann", "negative", "Is <ann> in this photo?", "No, <ann> is not here.", ann / "q0.png",
                    reasoning="left hair red blue different mismatch")
    batch = encode_batch([sample], backbone, runtime.template, 4, yes_no_weight=20.0)
    start = batch.prompt_lengths[0]
    reasoning = backbone.tokenizer(" left hair red blue different mismatch.", add_special_tokens=False)["input_ids"]
    no_id = backbone.tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    ids = batch.input_ids[0].tolist()
    assert ids[start:start + len(reasoning)] == reasoning
    assert ids[start + len(reasoning)] == no_id
    weights = batch.weights[0, start:int(batch.attention_mask[0].sum())].tolist()
    assert weights[len(reasoning)] == 20.0
    assert sorted(set(weights[:len(reasoning)] + weights[len(reasoning) + 1:])) == [1.0]


def test_compare_validation_generates_and_reads_the_verdict(runtime, tmp_path, monkeypatch):
    from plvmctl.train.aligner import validate_recognition
    from plvmctl.train.data import validation_samples

    identities = read_manifest(write_compared_world(tmp_path)).identities
    samples = validation_samples(identities[:1], identities, seed=0, photos_per_identity=2,
                                 compare_keys=["hair", "skin"])
    assert all(s.reasoning for s in samples)
    config = config_for(tmp_path / "manifest.jsonl", tmp_path / "out")
    from plvmctl.train.aligner import ReferenceTokens, new_aligner

    aligner = new_aligner(runtime, config)
    references = ReferenceTokens(runtime.encoder)
    references.prepare(identities)
    result = validate_recognition(aligner, samples, references, runtime, max_new_tokens=4)
    assert set(result) == {"val_positive", "val_negative", "val_mean"}
    assert all(0.0 <= value <= 1.0 for value in result.values())
    # the verdict after the reasoning is what counts: a model that always finds a match says yes
    from plvmctl import engine

    def always_a_match(self, requests, **kwargs):
        assert kwargs["max_new_tokens"] == 4
        return [engine.AskResult(r, "left hair red red same match. Yes, <ann> is here.") for r in requests]

    monkeypatch.setattr(engine.Engine, "ask", always_a_match)
    result = validate_recognition(aligner, samples, references, runtime, max_new_tokens=4)
    assert (result["val_positive"], result["val_negative"]) == (1.0, 0.0)
