"""Pretraining rows of the pocket base LVLM (plvmctl.lab.lvlm): prompts exactly as at
inference, answers as the only labels, reference portraits in the description's place."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from plvmctl.lab import toy
from plvmctl.errors import PlvmError
from plvmctl.prompt import POCKET, build_prompt, encode_segments
from plvmctl.tiny import IMAGE_ID
from plvmctl.lab import lvlm

SIZES = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                       vision_layers=1)
TOKENS_PER_IMAGE = (SIZES.image_size // SIZES.patch_size) ** 2


@pytest.fixture(scope="module")
def small():
    model, tokenizer, processor = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), SIZES, 0)
    return model.eval(), tokenizer, processor


def _step(reference_share: float, seed: int = 0):
    config = lvlm.LvlmTrainConfig(scenes_per_step=2, rows_per_scene=4, text_rows_per_step=3,
                                  describe_rows_per_step=1, reference_share=reference_share)
    return lvlm.sample_step(random.Random(seed), toy.training_identities(), config, scene_size=32,
                            portrait_size=32)


def test_a_row_is_its_inference_prompt_then_the_answer(small):
    _, tokenizer, _ = small
    row = lvlm.text_row(toy.training_identities()[7], random.Random(3), lvlm.LvlmTrainConfig())
    batch = lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE)
    prompt = encode_segments(build_prompt(row.question, template=POCKET, has_image=False,
                                          descriptions=row.descriptions, literal_names=True),
                             tokenizer, slot_id=lambda slot: -1, image_token_id=IMAGE_ID,
                             num_image_tokens=TOKENS_PER_IMAGE)
    length = batch.prompt_lengths[0]
    assert batch.input_ids[0, :length].tolist() == prompt
    labelled = batch.labels[0][batch.labels[0] != lvlm.IGNORE].tolist()
    answer = tokenizer(" " + row.answer, add_special_tokens=False)["input_ids"]
    assert labelled == answer + [tokenizer.eos_token_id]
    assert (batch.labels[0, :length] == lvlm.IGNORE).all()


def test_without_reference_share_every_person_is_described_in_words():
    rows, images, infos = _step(0.0)
    assert all(row.reference is None for row in rows)
    assert sum(info is None for info in infos) == 1  # the describe row's portrait only


def test_reference_rows_show_a_portrait_where_the_description_was(small):
    _, tokenizer, _ = small
    rows, images, infos = _step(1.0)
    referenced = [row for row in rows if row.reference is not None]
    assert referenced and all(row.kind in ("recognition", "about", "text") for row in referenced)
    for row in referenced:
        assert infos[row.reference] is None  # a portrait, not a scene
        assert list(row.descriptions.values()) == ["<image>"]
    row = next(row for row in referenced if row.image is not None)
    batch = lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE)
    ids = batch.input_ids[0].tolist()
    assert ids.count(IMAGE_ID) == 2 * TOKENS_PER_IMAGE
    assert batch.image_index == [row.reference, row.image]  # preamble first, then the photo
    words = tokenizer.convert_ids_to_tokens(ids[:ids.index(IMAGE_ID)])
    assert words[-1] == "is"  # "<name> is <image>."


def test_a_batch_answers_each_row_as_alone(small):
    model, tokenizer, processor = small
    rows, images, _ = _step(0.5, seed=4)
    pixels = lvlm.pixel_values(processor, images)
    rows = [row for row in rows if row.reference is not None or row.image is not None][:4]
    batch = lvlm.encode_rows(rows, tokenizer, TOKENS_PER_IMAGE)
    with torch.no_grad():
        together = lvlm.forward_logits(model, batch, pixels)
        for i, row in enumerate(rows):
            alone = lvlm.forward_logits(model, lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE), pixels)
            length = batch.prompt_lengths[i]
            torch.testing.assert_close(together[i, :length], alone[0, :length], atol=1e-4, rtol=1e-4)


def test_the_step_is_a_function_of_the_seed():
    first, second = _step(0.5, seed=9), _step(0.5, seed=9)
    assert [dataclasses.astuple(row) for row in first[0]] == [dataclasses.astuple(row) for row in second[0]]
    assert [image.tobytes() for image in first[1]] == [image.tobytes() for image in second[1]]


def test_measure_reports_reference_rows_apart(small):
    model, tokenizer, processor = small
    config = lvlm.LvlmTrainConfig(rows_per_scene=4, text_rows_per_step=4, reference_share=0.5)
    report = lvlm.measure(model, tokenizer, processor, scenes=4, config=config)
    assert {"recognition-ref", "recognition"} & set(report)
    assert any(kind.endswith("-ref") for kind in report)
    assert report["all"]["count"] == sum(v["count"] for k, v in report.items() if k != "all")


def test_the_committed_model_reads_english_sentences():
    identity = toy.training_identities()[11]
    assert lvlm.describe(identity) == "a person with " + identity.describe()
    assert lvlm.LvlmTrainConfig().description == "sentence"


def test_a_keyvalue_description_is_every_trait_in_a_fixed_order():
    identity = toy.training_identities()[11]
    words = lvlm.describe(identity, "keyvalue").split()
    assert len(words) == 2 * len(toy.TRAITS)
    assert words[0::2] == list(lvlm.DESCRIPTION_KEYS.values())
    assert words[1::2] == [getattr(identity, trait) for trait in lvlm.DESCRIPTION_KEYS]


def test_the_copy_warm_up_teaches_the_lm_to_look_back():
    """Random words cannot be guessed better than ln(vocabulary) from what came before,
    except by finding the earlier copy, wherever it is: a loss well under that floor means
    induction heads."""
    torch.manual_seed(0)
    sizes = dataclasses.replace(SIZES, layers=2, hidden=64)
    model, tokenizer, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), sizes, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    losses = []
    for _ in range(400):
        loss = lvlm.copy_warmup_loss(model, rng, rows=16, length=8, repeat_share=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    floor = torch.log(torch.tensor(float(len(tokenizer) - len(lvlm.SPECIAL_TOKENS)))).item()
    assert losses[0] > 0.95 * floor
    assert sum(losses[-10:]) / 10 < 0.95 * floor  # 0.90 measured (the pocket LM: card.json lvlm.copy_loss_last10)


def test_copy_warm_up_rows_are_answerable_only_by_content():
    """Recall rows ask pairs back in any order after a random gap; repeat rows put a random
    gap between the two copies: no fixed look-back distance gives the answers."""
    model, _, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), SIZES, 0)
    seen = []

    def spy(*args, **kwargs):
        seen.append((kwargs["input_ids"], kwargs["attention_mask"]))
        raise StopIteration

    model.forward = spy
    offsets = set()
    for seed in range(20):
        with pytest.raises(StopIteration):
            lvlm.copy_warmup_loss(model, random.Random(seed), rows=8, length=8)
    for ids, mask in seen:
        for row, length in zip(ids.tolist(), mask.sum(1).tolist()):
            row = row[:length]
            answer = len(row) - 1
            earlier = [i for i in range(answer - 1) if row[i] == row[answer - 1]]
            assert earlier, row  # the cue was shown before
            offsets.add(answer - earlier[0])
    assert len(offsets) > 5


def test_the_vision_probe_refuses_a_grid_without_three_places():
    with pytest.raises(PlvmError, match="at least 3 patch columns"):
        lvlm.VisionProbe(16, 2)


def test_the_position_head_exists_only_when_asked_for():
    assert not hasattr(lvlm.VisionProbe(16, 3), "column")  # the committed build's parameters, as they were
    assert lvlm.VisionProbe(16, 3, position_weight=1.0).column.out_features == 3


def test_the_position_head_reads_columns_only_when_patches_carry_them():
    """Patch features that hold their column one-hot are learned to near zero loss; features
    without any position stay at the ln(columns) floor."""
    grid, hidden = 3, 8
    columns = torch.arange(grid).repeat(grid)  # row-major patches
    located = torch.nn.functional.one_hot(columns, hidden).float().expand(4, -1, -1)
    blind = torch.ones(4, grid * grid, hidden)
    floor = torch.log(torch.tensor(float(grid))).item()
    for features, low in ((located, True), (blind, False)):
        torch.manual_seed(0)
        probe = lvlm.VisionProbe(hidden, grid, position_weight=1.0)
        optimizer = torch.optim.Adam(probe.column.parameters(), lr=0.1)
        for _ in range(100):
            loss = probe.position_loss(features)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        final = float(probe.position_loss(features).detach())
        assert (final < 0.1 * floor) if low else (final > 0.95 * floor)


def test_the_probe_loss_adds_the_position_term_by_its_weight():
    infos = [toy.random_scene(toy.training_identities()[0], random.Random(1), toy.training_identities(),
                              size=32)[1]]
    features = torch.randn(1, 9, 16)  # a 3 x 3 grid: one column per third
    torch.manual_seed(0)
    plain = lvlm.VisionProbe(16, 3)
    torch.manual_seed(0)
    located = lvlm.VisionProbe(16, 3, position_weight=2.0)
    expected = plain.loss(features, infos) + 2.0 * located.position_loss(features)
    torch.testing.assert_close(located.loss(features, infos), expected)


def test_a_caption_says_what_is_drawn_place_by_place():
    rng = random.Random(5)
    pool = toy.training_identities()
    image, info = toy.random_scene(pool[3], rng, pool, n_people=2, size=32)
    words = lvlm.scene_caption(info).split()
    starts = [words.index(position) for position in toy.POSITIONS]
    assert starts == sorted(starts)  # left, middle, right
    for position, start in zip(toy.POSITIONS, starts):
        person = info.person_at(position)
        said = words[start + 1:start + 2] if person is None else words[start + 1:start + 12]
        if person is None:
            assert said == ["nobody"]
        else:
            who = person.identity
            assert said == ["hair", who.hair_colour, who.hair_style, "shirt", person.shirt, "skin", who.skin,
                            "face", who.face, who.accessory, person.expression]


def test_caption_rows_are_added_per_photo_only_when_asked_for():
    for count in (0, 2):
        config = lvlm.LvlmTrainConfig(scenes_per_step=3, rows_per_scene=2, text_rows_per_step=1,
                                      describe_rows_per_step=1, caption_rows=count)
        rows, _, infos = lvlm.sample_step(random.Random(2), toy.training_identities(), config,
                                          scene_size=32, portrait_size=32)
        captions = [row for row in rows if row.kind == "caption"]
        scenes = [i for i, info in enumerate(infos) if info is not None]
        assert sorted(row.image for row in captions) == sorted(scenes * count)
        assert all(row.answer == lvlm.scene_caption(infos[row.image]) and not row.options for row in captions)


def test_caption_steps_train_on_captions_alone_first(monkeypatch, small):
    _, tokenizer, processor = small
    model, _, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), SIZES, 0)
    seen: list[set[str]] = []
    encode = lvlm.encode_rows

    def spy(rows, *args, **kwargs):
        seen.append({row.kind for row in rows})
        return encode(rows, *args, **kwargs)

    monkeypatch.setattr(lvlm, "encode_rows", spy)
    config = lvlm.LvlmTrainConfig(steps=3, scenes_per_step=2, rows_per_scene=3, text_rows_per_step=2,
                                  caption_rows=1, caption_steps=2, warmup_steps=1,
                                  vision_aux_weight=0.0)  # a 2 x 2 grid has no thirds to probe
    lvlm.train_lvlm(model, tokenizer, processor, config)
    assert seen[0] == seen[1] == {"caption"}
    assert "caption" in seen[2] and len(seen[2]) > 1
    with pytest.raises(PlvmError, match="caption_rows"):
        lvlm.train_lvlm(model, tokenizer, processor, dataclasses.replace(config, caption_rows=0))


# -- compare answers, name tokens, the curriculum ---------------------------------------------


def _compare_config(**changes) -> lvlm.LvlmTrainConfig:
    base = lvlm.LvlmTrainConfig(scenes_per_step=6, rows_per_scene=6, text_rows_per_step=4,
                                describe_rows_per_step=0, recognition_share=1.0, scene_share=0.0,
                                about_share=0.0, recognition_answer="compare")
    return dataclasses.replace(base, **changes)


def test_a_comparison_checks_every_person_trait_by_trait():
    pool = toy.training_identities()
    image, info = toy.random_scene(pool[5], random.Random(1), pool, n_people=2, size=32)
    words, found = lvlm.comparison(pool[5], info)
    assert found
    text = words.split()
    per_person = 1 + 4 * len(lvlm.COMPARE_TRAITS) + 1
    assert len(text) == 2 * per_person
    for start, person in zip((0, per_person), sorted(info.people, key=lambda p: toy.POSITIONS.index(p.position))):
        chunk = text[start:start + per_person]
        assert chunk[0] == person.position
        for i, trait in enumerate(lvlm.COMPARE_TRAITS):
            seen, key, stated, verdict = chunk[1 + 4 * i:5 + 4 * i]
            assert (key, stated, seen) == (lvlm.DESCRIPTION_KEYS[trait], getattr(pool[5], trait),
                                           getattr(person.identity, trait))
            assert verdict == ("same" if stated == seen else "different")
        everything = all(getattr(pool[5], t) == getattr(person.identity, t) for t in lvlm.COMPARE_TRAITS)
        assert chunk[-1] == ("match" if everything else "mismatch")


def test_compare_answers_reason_then_give_a_verdict_that_follows_from_the_reasoning():
    from plvmctl.answers import parse_yes_no

    rows, _, infos = lvlm.sample_step(random.Random(4), toy.training_identities(), _compare_config(),
                                      scene_size=32)
    recognition = [row for row in rows if row.kind == "recognition"]
    assert len(recognition) >= 30
    verdicts = []
    for row in recognition:
        reasoning, verdict = row.answer.split(". ", 1)
        said = parse_yes_no(verdict)
        verdicts.append(said)
        assert (" match" in " " + reasoning) == (said == "yes")  # never "match" with a No
        assert parse_yes_no(row.answer) == said
    assert {"yes", "no"} <= set(verdicts)


def test_compare_negatives_differ_from_everyone_in_a_trait_the_photo_shows():
    rng = random.Random(0)
    pool = toy.training_identities()
    for _ in range(200):
        _, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=32)
        absent = lvlm._absent_identity(info, rng, pool, 1.0, lvlm.COMPARE_TRAITS)
        assert all(any(getattr(absent, t) != getattr(p.identity, t) for t in lvlm.COMPARE_TRAITS)
                   for p in info.people)


def test_the_first_steps_of_the_curriculum_show_one_person_a_photo(monkeypatch, small):
    model, tokenizer, processor = small
    counts = []
    real = toy.random_scene

    def counting(*args, **kwargs):
        image, info = real(*args, **kwargs)
        counts.append(len(info.people))
        return image, info

    monkeypatch.setattr(toy, "random_scene", counting)
    config = dataclasses.replace(_compare_config(scenes_per_step=4, text_rows_per_step=0), steps=4,
                                 single_person_steps=2, vision_aux_weight=0.0, log_every=100)
    lvlm.train_lvlm(model, tokenizer, processor, config)
    model.eval()
    assert counts[:8] == [1] * 8
    assert max(counts[8:]) > 1


def test_name_rows_carry_one_name_token_in_prompt_and_answer(small):
    model, tokenizer, _ = small
    name_id = model.config.text_config.vocab_size
    rows, _, _ = lvlm.sample_step(random.Random(2), toy.training_identities(),
                                  _compare_config(name_share=1.0), scene_size=32)
    batch = lvlm.encode_rows(rows, tokenizer, TOKENS_PER_IMAGE, name_id=name_id)
    for i, row in enumerate(rows):
        assert row.name_token
        length = batch.prompt_lengths[i]
        prompt = batch.input_ids[i, :length]
        assert int((prompt == name_id).sum()) == row.question.count("<") + 1  # description + question
        if row.kind == "recognition" and "<" in row.answer:
            assert name_id in batch.labels[i].tolist()  # the answer says the name
    with pytest.raises(PlvmError, match="name_id"):
        lvlm.encode_rows(rows[:1], tokenizer, TOKENS_PER_IMAGE)


def test_a_name_token_is_one_vector_in_and_out(small):
    model, tokenizer, processor = small
    name_id = model.config.text_config.vocab_size
    row = lvlm.text_row(toy.training_identities()[3], random.Random(0),
                        lvlm.LvlmTrainConfig(name_share=1.0, mcq_share=0.0))
    batch = lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE, name_id=name_id)
    names = lvlm.name_vectors(model, 1)
    logits = lvlm.forward_logits(model, batch, None, names=names)
    assert logits.shape[-1] == name_id + 1
    # the name's logit is the hidden state times the same vector that was fed in
    embeds = model.get_input_embeddings()(batch.input_ids.clamp(max=name_id - 1))
    embeds = torch.where((batch.input_ids == name_id).unsqueeze(-1), names.unsqueeze(1), embeds)
    hidden = model.model(inputs_embeds=embeds, attention_mask=batch.attention_mask).last_hidden_state
    assert torch.allclose(logits[..., -1], (hidden * names.unsqueeze(1)).sum(-1), atol=1e-5)
    assert torch.allclose(logits[..., :-1], model.lm_head(hidden), atol=1e-5)


def test_generated_answers_write_a_name_token_back_as_the_name(small, monkeypatch):
    model, tokenizer, _ = small
    name_id = model.config.text_config.vocab_size
    row = lvlm.text_row(toy.training_identities()[3], random.Random(0),
                        lvlm.LvlmTrainConfig(name_share=1.0, mcq_share=0.0))
    script = iter([name_id, tokenizer.convert_tokens_to_ids("is"), tokenizer.eos_token_id])

    def scripted(model_, batch, pixels, **kwargs):
        logits = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1], name_id + 1)
        logits[:, :, next(script)] = 1.0
        return logits

    monkeypatch.setattr(lvlm, "forward_logits", scripted)
    answer = lvlm.generate_answers(model, tokenizer, [row], None, max_new_tokens=5)
    assert answer == [f"<{toy.training_identities()[3].name}> is"]


def test_an_interrupted_pretraining_resumes_exactly(tmp_path):
    vocabulary = lvlm.collect_vocabulary(samples=40)
    config = dataclasses.replace(_compare_config(scenes_per_step=2, rows_per_scene=3, text_rows_per_step=2),
                                 steps=4, copy_steps=1, vision_steps=1, name_share=0.5, log_every=100)

    def fresh():  # 48 px photos, 3 x 3 patches: the vision probe's three places
        return lvlm.build_pocket_llava(vocabulary, dataclasses.replace(SIZES, image_size=48), 0)

    straight, tokenizer, processor = fresh()
    lvlm.train_lvlm(straight, tokenizer, processor, config)

    class Stop(Exception):
        pass

    def stop_after_two(step: int) -> None:
        if step == 2:
            raise Stop

    first, tokenizer, processor = fresh()
    with pytest.raises(Stop):
        lvlm.train_lvlm(first, tokenizer, processor, config, after_step=stop_after_two,
                        checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed, tokenizer, processor = fresh()
    result = lvlm.train_lvlm(resumed, tokenizer, processor, config, checkpoint_dir=tmp_path, resume=True)
    assert result.steps == 4
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(PlvmError, match="nothing to resume"):
        lvlm.train_lvlm(resumed, tokenizer, processor, config, checkpoint_dir=tmp_path / "empty", resume=True)


def test_generated_answers_never_hold_image_or_padding_tokens(small, monkeypatch):
    """An untrained model may rank `<image>` first; writing it would break the next step."""
    model, tokenizer, _ = small
    name_id = model.config.text_config.vocab_size

    def image_first(model_, batch, pixels, **kwargs):
        logits = torch.zeros(batch.input_ids.shape[0], batch.input_ids.shape[1], name_id + 1)
        logits[:, :, IMAGE_ID] = 3.0
        logits[:, :, lvlm.PAD_ID] = 2.0
        logits[:, :, tokenizer.eos_token_id] = 1.0
        return logits

    monkeypatch.setattr(lvlm, "forward_logits", image_first)
    row = lvlm.text_row(toy.training_identities()[3], random.Random(0), lvlm.LvlmTrainConfig())
    assert lvlm.generate_answers(model, tokenizer, [row], None, max_new_tokens=3) == [""]


def test_multiple_choice_rows_say_the_value_then_its_letter_when_asked():
    from plvmctl.answers import parse_mcq_answer, parse_mcq_prompt

    rng = random.Random(0)
    config = lvlm.LvlmTrainConfig(mcq_share=1.0, mcq_answer="value_letter")
    rows = [lvlm.text_row(identity, rng, config) for identity in toy.training_identities()[:30]]
    for row in rows:
        options = dict(parse_mcq_prompt(row.question))
        value, letter = row.answer.rsplit(" ", 1)
        assert row.mcq and options[letter] == value  # "red B": B is the option "red"
        assert parse_mcq_answer(row.answer, options) == letter  # as `plvmctl eval` reads it
        assert row.options == tuple(options.values())  # the first word is one of the values
    letters = [lvlm.text_row(identity, rng, dataclasses.replace(config, mcq_answer="letter"))
               for identity in toy.training_identities()[:5]]
    assert all(row.answer in "ABCD" and row.options == tuple("ABCD"[:len(row.options)]) for row in letters)
    with pytest.raises(ValueError, match="mcq_answer"):
        lvlm.text_row(toy.training_identities()[0], rng, dataclasses.replace(config, mcq_answer="value"))


def test_measure_reads_the_letter_of_generated_multiple_choice_answers(small):
    model, tokenizer, processor = small
    config = lvlm.LvlmTrainConfig(mcq_share=1.0, mcq_answer="value_letter", text_rows_per_step=4)
    report = lvlm.measure(model, tokenizer, processor, scenes=2, config=config)
    assert report["text-mcq-said"]["count"] >= 4
    assert 0.0 <= report["text-mcq-said"]["accuracy"] <= 1.0
    assert 0.25 <= report["text-mcq-said"]["chance"] <= 0.5  # 2 to 4 options


def test_about_rows_find_the_person_before_they_answer_when_asked():
    from plvmctl.answers import parse_mcq_answer, parse_mcq_prompt

    rng = random.Random(3)
    config = lvlm.LvlmTrainConfig(about_answer="compare", mcq_answer="value_letter", mcq_share=0.5,
                                  scene_share=0.0, recognition_share=0.0, about_share=1.0)
    pool = toy.training_identities()[:50]
    rows = []
    for _ in range(6):
        info = toy.random_scene(pool[rng.randrange(50)], rng, pool)[1]
        rows += [(row, info) for row in lvlm.scene_rows(info, 0, rng, pool, config, 4)]
    assert {row.mcq for row, _ in rows} == {True, False}
    for row, info in rows:
        named = next(p.identity for p in info.people if p.identity.name in row.question)
        reasoning, _, answer = row.answer.partition(". ")
        assert reasoning == lvlm.comparison(named, info, config.compare_traits)[0]
        assert row.options == ()  # the first word is a place, so no first-token scoring
        if row.mcq:
            options = parse_mcq_prompt(row.question)
            assert parse_mcq_answer(row.answer, options) == answer.split()[-1]
