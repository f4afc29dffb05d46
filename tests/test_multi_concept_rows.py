"""Rows that describe several people in one prompt (plvmctl.lab.lvlm: `crowd_row`,
`which_row`): right answers for a constructed photo, bounded lengths, one name token per
person, and nothing of it in the default pretraining mix."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from plvmctl.answers import conclusion, parse_which, parse_who, parse_yes_no
from plvmctl.lab import lvlm, toy
from plvmctl.prompt import POCKET, build_prompt

SIZES = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                       vision_layers=1)
TOKENS_PER_IMAGE = (SIZES.image_size // SIZES.patch_size) ** 2
COMPARE = lvlm.LvlmTrainConfig(description="keyvalue", recognition_answer="compare", name_share=0.0)


@pytest.fixture(scope="module")
def small():
    model, tokenizer, processor = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), SIZES, 0)
    return model.eval(), tokenizer, processor


def _identity(**traits) -> toy.Identity:
    base = toy.training_identities()[0]
    return dataclasses.replace(base, **traits)


def _scene() -> toy.SceneInfo:
    """Two people: red curly hair, tan skin on the left; black short hair, pale skin on the right."""
    _, info = toy.random_scene(toy.training_identities()[0], random.Random(0), toy.training_identities(),
                               n_people=2, size=32)
    left = _identity(hair_colour="red", hair_style="curly", skin="tan")
    right = _identity(hair_colour="black", hair_style="short", skin="pale")
    people = [dataclasses.replace(info.people[0], identity=left, position="left"),
              dataclasses.replace(info.people[1], identity=right, position="right")]
    return dataclasses.replace(info, people=people)


PER_PERSON = ("full", "short", "named")  # the which answers with a reasoning per person asked about


def test_which_answers_name_who_is_there_after_their_reasoning():
    """"full" and "short" reasonings name nobody; "named" ones name each person before their
    comparison, and the conclusion names who is there."""
    info = _scene()
    left, right = info.people[0].identity, info.people[1].identity
    absent = _identity(hair_colour="red", hair_style="curly", skin="pale")  # one trait from the left person
    for style in PER_PERSON:
        config = dataclasses.replace(COMPARE, which_answer=style)
        one = lvlm.which_answer([absent, left], info, config)
        reasoning, _, verdict = one.rpartition(". ")
        assert verdict == f"<{left.name}> is in this photo."
        assert parse_which(conclusion(one, "comparison"), [absent.name, left.name]) == left.name
        if style == "named":
            assert reasoning.startswith(f"<{absent.name}> ") and f". <{left.name}> " in reasoning
            continue
        assert "<" not in reasoning
        assert parse_which(one, [absent.name, left.name]) == left.name
        both = lvlm.which_answer([right, left], info, config)
        assert both.endswith(f"<{right.name}> is in this photo. <{left.name}> is in this photo.")
        neither = lvlm.which_answer([absent, _identity(hair_colour="blonde")], info, config)
        assert neither.endswith(lvlm.NEITHER_ANSWER)
        assert parse_which(neither, [absent.name]) is None
    full = lvlm.which_answer([absent, left], info, dataclasses.replace(COMPARE, which_answer="full"))
    assert full.startswith(lvlm.comparison(absent, info)[0] + ". " + lvlm.comparison(left, info)[0] + ". ")
    short = lvlm.which_answer([absent, left], info, dataclasses.replace(COMPARE, which_answer="short"))
    assert short == f"left mismatch right mismatch. left match right mismatch. <{left.name}> is in this photo."


def test_which_rows_are_bounded_and_describe_both_people_in_the_question_order(small):
    _, tokenizer, _ = small
    rng = random.Random(3)
    pool = toy.training_identities()
    longest = {style: 0 for style in lvlm.WHICH_ANSWER_STYLES}
    by_name = {identity.name: identity for identity in toy.all_identities()}
    for _ in range(30):
        _, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, n_people=3, size=32)
        for style in lvlm.WHICH_ANSWER_STYLES:
            row = lvlm.which_row(info, 0, rng, pool, dataclasses.replace(COMPARE, which_answer=style))
            first, second = list(row.descriptions)
            assert row.question.index(f"<{first}>") < row.question.index(f"<{second}>")
            assert row.name_token
            shown = [name for name in row.descriptions if lvlm.comparison(by_name[name], info)[1]]
            if style == "places":  # its verdict names them in the order it matched them
                said = parse_who(conclusion(row.answer, "comparison"), list(row.descriptions))
                assert set(said) == set(shown)
            else:
                assert parse_which(conclusion(row.answer, "comparison"), list(row.descriptions)) == \
                    (shown[0] if shown else None)
            batch = lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE, name_id=len(tokenizer))
            answer = int((batch.labels[0] != lvlm.IGNORE).sum()) - 1  # EOS not counted
            longest[style] = max(longest[style], answer)
    # 3 people x 2 asked: 14 words each ("full") or 2 ("short"), two full stops, two verdicts;
    # "named": a name before each person's comparison
    assert longest["full"] <= 2 * 3 * 14 + 2 + 2 * 6
    assert longest["named"] <= longest["full"] + 2
    assert longest["short"] <= 2 * 3 * 2 + 2 + 2 * 6 <= 26
    # "places": 18 words a person in the photo, however many are asked about
    assert longest["places"] <= 3 * 18 + 3 + 2 * 6


def test_places_answers_name_the_closest_description_for_each_person_in_the_photo():
    """One part per person in the photo, left to right: the values read, the asked person who
    agrees most (first on a tie), their stated values checked, match / mismatch; then who
    matched, in the photo's order."""
    info = _scene()
    left, right = info.people[0].identity, info.people[1].identity
    near = _identity(hair_colour="red", hair_style="curly", skin="pale")  # one trait from the left person
    far = _identity(hair_colour="blonde", hair_style="long", skin="dark")
    config = dataclasses.replace(COMPARE, which_answer="places")
    answer = lvlm.which_answer([far, right, near], info, config)
    assert answer == (f"left red hair tan skin curly style <{near.name}> hair red same skin pale different style "
                      f"curly same mismatch. right black hair pale skin short style <{right.name}> hair black same "
                      f"skin pale same style short same match. <{right.name}> is in this photo.")
    assert parse_who(conclusion(answer, "comparison"), [far.name, right.name, near.name]) == (right.name,)
    both = lvlm.which_answer([right, left], info, config)
    assert both.endswith(f". <{left.name}> is in this photo. <{right.name}> is in this photo.")
    assert lvlm.which_answer([near, far], info, config).endswith(". " + lvlm.NEITHER_ANSWER)
    first = dataclasses.replace(config, places_lookup="first")
    assert lvlm.which_answer([far, right, near], info, first) == answer  # the same hair colour is found
    assert lvlm.which_answer([far, right], info, first).startswith(
        f"left red hair tan skin curly style nobody mismatch. right black hair pale skin short style <{right.name}> ")
    other = _identity(hair_colour="blonde", hair_style="short", skin="tan")
    assert lvlm.which_answer([near, far, other], info, config).endswith(". " + lvlm.NOBODY_ANSWER)


def test_crowd_rows_keep_the_asked_answer_and_give_each_person_a_name_token(small):
    _, tokenizer, _ = small
    info = _scene()
    pool = toy.training_identities()
    config = dataclasses.replace(COMPARE, crowd_share=1.0)
    asked = info.people[1].identity
    rng = random.Random(5)
    for positive in (True, False):
        who = asked if positive else _identity(hair_colour="black", hair_style="short", skin="tan")
        base = lvlm.Row("recognition", f"Is <{who.name}> in this photo?",
                        lvlm.comparison(who, info)[0] + (f". Yes, <{who.name}> is here." if positive else ". No."), 0,
                        {who.name: lvlm.describe(who, "keyvalue")}, ("Yes", "No"))
        for _ in range(10):
            row = lvlm.crowd_row(base, who, info, rng, pool, config)
            assert row.answer == base.answer and parse_yes_no(row.answer) == ("yes" if positive else "no")
            assert 2 <= len(row.descriptions) <= 4 and who.name in row.descriptions
            assert row.descriptions[who.name] == base.descriptions[who.name]
            assert row.name_token
            name_id = len(tokenizer)
            batch = lvlm.encode_rows([row], tokenizer, TOKENS_PER_IMAGE, name_id=name_id)
            own = name_id + list(row.descriptions).index(who.name)
            prompt = batch.input_ids[0, :batch.prompt_lengths[0]].tolist()
            for i in range(len(row.descriptions)):  # each name in its sentence, the asked one in the question too
                assert prompt.count(name_id + i) == (2 if name_id + i == own else 1)
            if positive:
                assert own in batch.labels[0].tolist()


def test_the_preamble_follows_the_rows_order_and_matches_build_prompt():
    row = lvlm.Row("which", "Which of <Aa> and <Bb> is in this photo?", "x", 0,
                   {"Aa": "hair red", "Bb": "hair black"})
    natural = build_prompt(row.question, template=POCKET, has_image=True, descriptions=row.descriptions,
                           literal_names=True)
    assert lvlm.row_prompt(row) == natural
    swapped = dataclasses.replace(row, descriptions={"Bb": "hair black", "Aa": "hair red"})
    text = lvlm.row_prompt(swapped)[0]
    assert text.index("<Bb> is hair black.") < text.index("<Aa> is hair red.")


def test_several_names_get_their_own_columns_and_rows_only_their_own(small):
    model, tokenizer, _ = small
    vocab = model.config.text_config.vocab_size
    two = lvlm.Row("which", "Which of <Aa> and <Bb> is in this photo?", "<Bb> is in this photo.", None,
                   {"Aa": "hair red", "Bb": "hair black"}, name_token=True)
    one = lvlm.Row("text", "What colour is <Cc>'s hair?", "red", None, {"Cc": "hair red"}, name_token=True)
    batch = lvlm.encode_rows([two, one], tokenizer, TOKENS_PER_IMAGE, name_id=vocab)
    assert batch.names_per_row == [2, 1]
    assert vocab + 1 in batch.labels[0].tolist()  # the answer says the second name
    with torch.no_grad():
        logits = lvlm.forward_logits(model, batch, None)
    assert logits.shape[-1] == vocab + 2
    assert float(logits[1, :, vocab + 1].max()) == torch.finfo(logits.dtype).min  # one name only
    assert torch.isfinite(lvlm.answer_loss(logits, batch.labels))


def test_the_default_mix_has_no_multi_concept_rows():
    config = dataclasses.replace(COMPARE, name_share=0.5)
    rows, _, _ = lvlm.sample_step(random.Random(1), toy.training_identities(), config, scene_size=32)
    assert all(row.kind != "which" and len(row.descriptions) <= 1 for row in rows)
    mixed = dataclasses.replace(config, crowd_share=1.0, which_share=0.5)
    rows, _, _ = lvlm.sample_step(random.Random(1), toy.training_identities(), mixed, scene_size=32)
    assert any(row.kind == "which" for row in rows)
    assert all(len(row.descriptions) > 1 for row in rows if row.kind == "recognition")


def test_recall_restates_the_asked_persons_compared_traits_before_the_comparison():
    info = _scene()
    who = info.people[0].identity
    config = dataclasses.replace(COMPARE, recall=True)
    assert lvlm.recall(who, config) == f"<{who.name}> skin tan hair red style curly"
    rows, _, _ = lvlm.sample_step(random.Random(2), toy.training_identities(),
                                  dataclasses.replace(config, recognition_share=1.0, crowd_share=0.5), scene_size=32)
    for row in rows:
        if row.kind == "recognition":
            asked = row.question[row.question.index("<") + 1:row.question.index(">")]
            assert row.answer.startswith(f"<{asked}> skin ")
            assert parse_yes_no(row.answer) in ("yes", "no")


def test_which_rows_about_three_or_four_people_ask_as_the_evaluation_asks_and_answer_for_each():
    info = _scene()
    pool = toy.training_identities()
    config = dataclasses.replace(COMPARE, which_answer="named")
    by_name = {identity.name: identity for identity in toy.all_identities()}
    rng = random.Random(5)
    for count, opening in ((3, "Which of <"), (4, "Who of <")):
        for _ in range(10):
            row = lvlm.which_row(info, 0, rng, pool, config, count=count)
            names = list(row.descriptions)
            assert len(names) == count and row.question.startswith(opening)
            assert [row.question.index(f"<{name}>") for name in names] == \
                sorted(row.question.index(f"<{name}>") for name in names)
            shown = [name for name in names if lvlm.comparison(by_name[name], info)[1]]
            said = parse_who(conclusion(row.answer, "comparison"), names)
            assert said == tuple(shown)
            assert row.answer.endswith(lvlm.NOBODY_ANSWER) == (not shown)


def test_the_vocabulary_holds_the_words_of_several_people_only_when_asked():
    """A base trained with several people reads "and", "both", "who" as words; the one-person
    vocabulary (the committed base's) stays as it was."""
    plain = lvlm.collect_vocabulary(samples=40, description="keyvalue")
    several = lvlm.collect_vocabulary(samples=40, description="keyvalue", several_people=True)
    assert set(plain) < set(several)
    assert {"and", "both", "who", "nobody"} <= set(several)
    assert "and" not in plain and "both" not in plain


@pytest.mark.parametrize("by_place", [False, True])
def test_pair_rows_answer_left_of_and_both_here_as_the_evaluation_reads_them(by_place):
    """Left-of rows ask about two people in the photo and conclude yes exactly when the first
    stands left of the second; both-here rows conclude yes only when both are there, and name
    the one there otherwise. Both compare each person, named, first (or, by place, each
    person in the photo with the closer of the two)."""
    rng = random.Random(3)
    pool = toy.training_identities()
    config = dataclasses.replace(COMPARE, pair_share=1.0, pairs_by_place=by_place)
    seen = {"left-yes": 0, "left-no": 0, "both-yes": 0, "both-no": 0}
    for _ in range(120):
        _, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=32)
        row = lvlm.pair_row(info, 0, rng, pool, config)
        names = list(row.descriptions)
        assert len(names) == 2 and row.name_token
        if by_place:
            assert row.answer.split()[0] in toy.POSITIONS
            assert row.answer.count(" match.") + row.answer.count(" mismatch.") == len(info.people)
        else:
            assert row.answer.startswith(f"<{names[0]}> ") and f". <{names[1]}> " in row.answer
        verdict = parse_yes_no(conclusion(row.answer, "comparison"))
        places = {person.identity.name: toy.POSITIONS.index(person.position) for person in info.people}
        if row.question.startswith("Is "):
            assert row.question == f"Is <{names[0]}> to the left of <{names[1]}>?"
            assert verdict == ("yes" if places[names[0]] < places[names[1]] else "no")
            seen[f"left-{verdict}"] += 1
        else:
            assert row.question == f"Are <{names[0]}> and <{names[1]}> both in this photo?"
            assert verdict == ("yes" if all(name in places for name in names) else "no")
            seen[f"both-{verdict}"] += 1
    assert min(seen.values()) > 5, seen


def test_the_vocabulary_grows_without_moving_a_known_word(small):
    """A base trained on one person learns the several-people words: every known token keeps
    its id, the new ones get ids after them, the embeddings and head grow to match."""
    model, tokenizer, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40), SIZES, 0)
    words = lvlm.collect_vocabulary(samples=40, several_people=True)
    known = tokenizer.get_vocab()
    grown = lvlm.grow_vocabulary(model, tokenizer, words)
    assert len(grown) > len(tokenizer)
    assert all(grown.convert_tokens_to_ids(token) == index for token, index in known.items())
    assert grown.convert_tokens_to_ids("both") >= len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(grown)
    assert model.get_output_embeddings().weight.shape[0] == len(grown)
    assert model.config.text_config.vocab_size == len(grown)
    assert lvlm.grow_vocabulary(model, grown, words) is grown  # nothing new: unchanged


@pytest.mark.parametrize("by_place", [False, True])
def test_named_captions_name_exactly_the_described_people_there_in_their_conclusion(by_place):
    """"Describe this photo." with people described: after one comparison per described
    person (or per person in the photo, by place), one sentence a place; a described person
    there by their name, nobody else named, read as the evaluation reads captions (`parse_who`
    of the conclusion)."""
    rng = random.Random(5)
    pool = toy.training_identities()
    config = dataclasses.replace(COMPARE, pairs_by_place=by_place)
    for _ in range(60):
        _, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=32)
        row = lvlm.named_caption_row(info, 0, rng, pool, config)
        described = list(row.descriptions)
        there = {person.identity.name for person in info.people}
        assert row.question == "Describe this photo." and row.name_token and 1 <= len(described) <= 3
        assert any(name not in there for name in described)
        said = conclusion(row.answer, "comparison")
        assert said.split(". ")[0].split()[0] == "left" and len(said.split(". ")) == 3
        assert set(parse_who(said, described) or ()) == {name for name in described if name in there}


def test_the_base_measurement_expects_the_asked_person_who_is_in_the_photo():
    """Each which-of-two item of `several_people.evaluation_set` asks about one person in the
    photo and one absent, and expects the one there. (It used to expect the person the photo
    was drawn around, whom the row does not always ask about: a third of the items could not
    be answered right.)"""
    from plvmctl.lab import several_people

    items, _ = several_people.evaluation_set(30, 32, COMPARE, seed=1)
    which = [item for item in items if item.group == "which"]
    assert len(which) == 30
    for item in which:
        assert item.expected in item.row.descriptions
        assert parse_which(conclusion(item.row.answer, "comparison"), list(item.row.descriptions)) == item.expected


def test_places_answers_with_the_one_word_lookup_conclude_who_is_there():
    """With `places_lookup="first"`, the conclusion still names exactly the asked people who
    match someone in the photo, whoever the parts name."""
    rng = random.Random(11)
    pool = toy.training_identities()
    by_name = {identity.name: identity for identity in toy.all_identities()}
    config = dataclasses.replace(COMPARE, which_answer="places", places_lookup="first")
    nobody_parts = 0
    for _ in range(60):
        _, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, n_people=3, size=32)
        row = lvlm.which_row(info, 0, rng, pool, config, count=rng.choice([2, 3, 4]))
        shown = {name for name in row.descriptions if lvlm.comparison(by_name[name], info)[1]}
        assert set(parse_who(conclusion(row.answer, "comparison"), list(row.descriptions))) == shown
        nobody_parts += row.answer.count(" nobody mismatch.")
    assert nobody_parts > 10
