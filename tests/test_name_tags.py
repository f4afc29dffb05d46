"""Which name owns each token (plvmctl.lab.name_tags), the tag's effect on the forward pass, and
reading rows that ask about every described person (plvmctl.lab.lvlm.encode_dense)."""

from __future__ import annotations

import pytest
import torch

from plvmctl.errors import PlvmError
from plvmctl.lab import lvlm, toy
from plvmctl.lab.lvlm import dense_loss, encode_dense
from plvmctl.lab.name_tags import sentence_tags
from plvmctl.name_tags import name_tags, tag_stop_ids

VOCAB = 20
IS, STOP, QUOTE = 5, 6, 7


def test_a_sentence_runs_from_its_name_and_is_to_the_full_stop_and_a_question_name_starts_none():
    # <s> a <n0> is x y . <n1> is z . what <n1> ' s w
    ids = torch.tensor([[1, 8, VOCAB, IS, 9, 10, STOP, VOCAB + 1, IS, 11, STOP, 12, VOCAB + 1, QUOTE, 13, 14]])
    tags = sentence_tags(ids, VOCAB, stop_id=STOP, follower_id=IS)
    assert tags[0].tolist() == [-1, -1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1, -1, -1, -1]


def test_without_stops_a_block_runs_to_the_next_name_or_the_described_end():
    ids = torch.tensor([[1, VOCAB, 9, 10, VOCAB + 1, 11, 12, 13, VOCAB, 9, 10]])
    tags = sentence_tags(ids, VOCAB, ends=[7])
    assert tags[0].tolist() == [-1, -1, 0, 0, -1, 1, 1, -1, -1, -1, -1]


def test_a_tagged_token_gets_its_name_vector_added():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    vocab = model.config.text_config.vocab_size
    ids = torch.tensor([[1, vocab, 9, 10, vocab + 1, 11, 12]])
    batch = lvlm.Batch(ids, torch.ones_like(ids), torch.full_like(ids, lvlm.IGNORE), [], [7], vocab, [2])
    names = torch.randn(1, 2, 32)
    tags = sentence_tags(ids, vocab)
    plain = lvlm.forward_logits(model, batch, None, names=names)
    tagged = lvlm.forward_logits(model, batch, None, names=names, tags=tags)
    assert torch.allclose(plain[0, :2], tagged[0, :2])  # before the first tagged token: the same
    assert not torch.allclose(plain[0, 2:], tagged[0, 2:])
    untagged = lvlm.forward_logits(model, batch, None, names=names, tags=torch.full_like(ids, -1))
    assert torch.allclose(plain, untagged)


def _question(people: list[toy.Identity], asked: toy.Identity, trait: str) -> lvlm.Row:
    descriptions = {person.name: lvlm.describe(person, "keyvalue") for person in people}
    return lvlm.Row("text", toy._ATTRIBUTE_TEMPLATES[trait][0].replace("<sks>", f"<{asked.name}>"),
                    getattr(asked, trait), None, descriptions, tuple(toy.TRAITS[trait]), name_token=True)


def test_a_dense_row_is_the_first_question_s_row_then_each_further_turn_with_its_answer():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, tokenizer, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40, description="keyvalue"), sizes, 0)
    vocab, images = model.config.text_config.vocab_size, lvlm.num_image_tokens(model)
    people = toy.training_identities()[:3]
    turns = [_question(people, people[2], "skin"), _question(people, people[0], "hair_colour"),
             _question(people, people[1], "eye_colour")]
    single = lvlm.encode_rows(turns[:1], tokenizer, images, name_id=vocab)
    dense = encode_dense([turns, turns[1:2]], tokenizer, images, vocab)
    first = int(single.attention_mask[0].sum())
    assert dense.input_ids[0, :first].tolist() == single.input_ids[0, :first].tolist()
    assert dense.labels[0, :first].tolist() == single.labels[0, :first].tolist()
    assert dense.names_per_row == [3, 3] and dense.prompt_lengths[0] == single.prompt_lengths[0]
    words = [tokenizer.convert_ids_to_tokens(t) if t < vocab else f"<n{t - vocab}>"
             for t in dense.input_ids[0, first:int(dense.attention_mask[0].sum())].tolist()]
    assert words[:2] == ["user", ":"] and words.count("user") == 2 and "<n0>" in words and "<n1>" in words
    answers = [t for t in dense.labels[0].tolist() if t != lvlm.IGNORE]
    expected = [people[2].skin, people[0].hair_colour, people[1].eye_colour]
    assert tokenizer.convert_ids_to_tokens(answers[0::2]) == expected and set(answers[1::2]) == {tokenizer.eos_token_id}
    tags = sentence_tags(dense.input_ids, vocab, stop_id=tokenizer.convert_tokens_to_ids("."),
                         follower_id=tokenizer.convert_tokens_to_ids("is"))
    assert (tags[0, single.prompt_lengths[0]:] == -1).all() and set(tags[0].tolist()) == {-1, 0, 1, 2}
    loss = dense_loss(lvlm.forward_logits(model, dense, None, tags=tags), dense.labels)
    assert torch.isfinite(loss)


def test_a_dense_group_must_describe_the_same_people():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, tokenizer, _ = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40, description="keyvalue"), sizes, 0)
    people = toy.training_identities()[:3]
    mixed = [_question(people, people[0], "skin"), _question(people[:2], people[0], "skin")]
    with pytest.raises(PlvmError, match="same descriptions"):
        encode_dense([mixed], tokenizer, lvlm.num_image_tokens(model), model.config.text_config.vocab_size)


def test_without_a_follower_a_question_s_name_tags_its_words_up_to_the_end_of_the_answer():
    # <s> <n0> is x . <n1> is y . user <n1> ' s z assistant v </s> user <n0> w
    eos = 2
    ids = torch.tensor([[1, VOCAB, IS, 9, STOP, VOCAB + 1, IS, 10, STOP, 11, VOCAB + 1, QUOTE, 12, 13, 14, eos, 11,
                         VOCAB, 15]])
    tags = sentence_tags(ids, VOCAB, stop_id=STOP, stop_ids=(eos,))
    assert tags[0].tolist() == [-1, -1, 0, 0, -1, -1, 1, 1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, 0]


def test_the_rule_tags_after_a_name_up_to_a_stop_and_continues_a_row_it_saw_before():
    # a <n0> x y . <n1> z <n0> w  (names from 20; stop 6)
    ids = [[8, 20, 9, 10, 6, 21, 11, 20, 12]]
    tags, last = name_tags(ids, 20, 2, {6})
    assert tags[0].tolist() == [-1, -1, 0, 0, -1, -1, 1, -1, 0]
    assert last == [0]
    more, last = name_tags([[13, 6, 14]], 20, 2, {6}, owners=last)  # generation, one call later
    assert more[0].tolist() == [0, -1, -1] and last == [-1]
    beyond, _ = name_tags([[22, 9]], 20, 2, {6})  # not a name of this call (a context token): no tag
    assert beyond[0].tolist() == [-1, -1]


def test_a_base_trained_with_name_tags_says_so_in_its_config_and_reads_them_always(tmp_path):
    """train_lvlm with name_tags writes the rule into the model's config (saved with it), and
    forward_logits then tags by that rule without being told."""
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, tokenizer, processor = lvlm.build_pocket_llava(lvlm.collect_vocabulary(samples=40, description="keyvalue"),
                                                          sizes, 0)
    config = lvlm.LvlmTrainConfig(steps=1, scenes_per_step=1, rows_per_scene=2, text_rows_per_step=1,
                                  describe_rows_per_step=0, vision_aux_weight=0.0, description="keyvalue",
                                  name_share=1.0, name_tags=True, dense_text_groups=2, dense_questions=3)
    lvlm.train_lvlm(model, tokenizer, processor, config)
    stops = tag_stop_ids(model.config)
    assert stops == {tokenizer.convert_tokens_to_ids("."), tokenizer.eos_token_id}
    model.config.save_pretrained(tmp_path)
    assert tag_stop_ids(type(model.config).from_pretrained(tmp_path)) == stops
    people = toy.training_identities()[:2]
    batch = lvlm.encode_rows([_question(people, people[1], "skin")], tokenizer, lvlm.num_image_tokens(model),
                             name_id=model.config.text_config.vocab_size)
    names = torch.randn(1, 2, 32)
    vocab = model.config.text_config.vocab_size
    tags, _ = name_tags(batch.input_ids.tolist(), vocab, 2, stops)
    assert (tags >= 0).any()
    said = lvlm.forward_logits(model, batch, None, names=names)
    assert torch.equal(said, lvlm.forward_logits(model, batch, None, names=names, tags=tags))
    assert not torch.allclose(said, lvlm.forward_logits(model, batch, None, names=names,
                                                        tags=torch.full_like(tags, -1)))
