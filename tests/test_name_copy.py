"""The copy warm-up over fresh name vectors (plvmctl.lab.name_copy): every answer is what the
asked name's own block says, names are numbered as encode_rows numbers several people, and
the loss runs through lvlm.forward_logits."""

from __future__ import annotations

import random

import torch

from plvmctl.lab import lvlm, name_copy
from plvmctl.lab.name_marker import NameMarker
from plvmctl.lab.name_tags import sentence_tags
from plvmctl.tiny import BOS_ID, SPECIAL_TOKENS

VOCAB = 60


def _blocks(row: name_copy.NameCopyRow) -> dict[int, list[int]]:
    """Each name's block: the words after it up to the next name (the last block runs on into
    the filler and a first query that begins with a key, after the block's own words)."""
    blocks: dict[int, list[int]] = {}
    current = None
    for token in row.ids[1:]:
        if token >= VOCAB:
            if token in blocks:  # a name seen before: the queries have begun
                break
            current = blocks.setdefault(token, [])
        elif current is not None:
            current.append(token)
    return blocks


def test_rows_are_well_formed_and_every_answer_is_read_from_the_asked_block():
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        row = name_copy.name_copy_row(rng, VOCAB, VOCAB)
        assert row.ids[0] == BOS_ID and len(row.ids) == len(row.labels)
        assert 2 <= row.names <= 4
        assert sorted({t for t in row.ids if t >= VOCAB}) == list(range(VOCAB, VOCAB + row.names))
        assert all(len(SPECIAL_TOKENS) <= t for t in row.ids[1:])
        blocks = _blocks(row)
        answered = [i for i, label in enumerate(row.labels) if label != lvlm.IGNORE]
        assert 1 <= len(answered) == len(row.queries) <= 3
        for i, (name, key) in zip(answered, row.queries):
            assert row.ids[i] == row.labels[i]
            block = blocks[name]
            if key is None:  # "<n> ->" the first word of its block
                kinds.add("next")
                assert row.ids[i - 1] == name and row.labels[i] == block[0]
            else:  # the name and a key, 0 to 2 words apart, either first; the key's value
                kinds.add("key")
                cue = row.ids[i - 4:i]
                assert {name, key} <= set(cue) and row.ids[i - 1] in (name, key)
                assert block[block.index(key) + 1] == row.labels[i]  # the value after the key
    assert kinds == {"next", "key"}


def test_the_loss_runs_with_several_fresh_names_per_row():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    vocab_size = model.config.text_config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for _ in range(2):
        loss = name_copy.name_copy_loss(model, rng, rows=8)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    rows = [name_copy.name_copy_row(rng, vocab_size, vocab_size) for _ in range(4)]
    batch = name_copy.name_copy_batch(rows, vocab_size)
    assert batch.names_per_row == [row.names for row in rows] and batch.image_index == []
    logits = lvlm.forward_logits(model, batch, None)
    assert logits.shape == (4, max(len(row.ids) for row in rows), vocab_size + max(row.names for row in rows))


def test_a_curriculum_row_holds_at_most_its_stage_of_names_and_keys():
    rng = random.Random(2)
    for _ in range(200):
        row = name_copy.name_copy_row(rng, VOCAB, VOCAB, next_share=0.0, max_keys=2, max_people=2)
        assert row.names == 2 and all(key is not None for _, key in row.queries)
        assert all(label == lvlm.IGNORE for label in row.labels[:row.described])  # no answer among the blocks
        first_block = row.ids[2:row.ids.index(VOCAB + 1)]
        assert len(first_block) in (2, 3, 4, 5)  # 1-2 keys with their values, maybe a connective first


def test_a_marked_name_is_the_shared_marker_plus_a_random_part_and_the_marker_learns():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    marker = NameMarker(32, scale=0.5, identity_scale=0.25)
    names = marker.vectors(model, 400, 3).detach()
    assert names.shape == (400, 3, 32)
    assert torch.allclose(names.mean(dim=(0, 1)), marker.marker.detach(), atol=0.01)  # the random parts average out
    word_scale = model.get_input_embeddings().weight.detach().std()
    assert abs(float((names - marker.marker.detach()).std()) / float(word_scale) - 0.25) < 0.03
    loss = name_copy.name_copy_loss(model, random.Random(3), rows=8, marker=marker)
    loss.backward()
    assert marker.marker.grad is not None and float(marker.marker.grad.abs().sum()) > 0


def test_the_probe_scores_key_and_next_queries_apart_against_chance():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    scores = name_copy.name_copy_accuracy(model, random.Random(4), rows=16)
    assert set(scores) == {"key", "next", "chance_key", "chance_next"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert 0.25 <= scores["chance_key"] <= 1.0  # one value among the 1-4 blocks holding the key
    assert 0.25 <= scores["chance_next"] <= 0.5  # one name among 2-4


def test_dense_rows_ask_distinct_pairs_or_read_a_whole_block_back():
    rng = random.Random(5)
    kinds = set()
    for _ in range(200):
        row = name_copy.name_copy_row(rng, VOCAB, VOCAB, next_share=0.5, dense=True)
        blocks = _blocks(row)
        answered = [i for i, label in enumerate(row.labels) if label != lvlm.IGNORE]
        assert len(answered) == len(row.queries) and all(row.ids[i] == row.labels[i] for i in answered)
        if row.queries[0][1] is None:  # each name once, its whole block read back after it
            kinds.add("next")
            asked = [name for name, _ in row.queries]
            assert sorted(set(asked)) == list(range(VOCAB, VOCAB + row.names))
            for name in set(asked):
                read = [row.labels[i] for i, (who, _) in zip(answered, row.queries) if who == name]
                assert read == blocks[name][:len(read)] and len(read) >= 2
                assert row.ids[answered[asked.index(name)] - 1] == name
        else:  # up to 8 queries, no (name, key) twice, each answered by its block's value
            kinds.add("key")
            assert 1 <= len(row.queries) <= 8 and len(set(row.queries)) == len(row.queries)
            for i, (name, key) in zip(answered, row.queries):
                assert blocks[name][blocks[name].index(key) + 1] == row.labels[i]
    assert kinds == {"next", "key"}


def test_with_slots_the_i_th_name_of_a_row_gets_the_i_th_marker():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    marker = NameMarker(32, scale=0.5, identity_scale=0.25, slots=4)
    names = marker.vectors(model, 400, 3).detach()
    assert names.shape == (400, 3, 32)
    assert torch.allclose(names.mean(dim=0), marker.marker.detach()[:3], atol=0.01)
    assert not torch.allclose(marker.marker[0], marker.marker[1])


def test_a_binding_row_recalls_every_name_s_one_word_in_a_shuffled_order():
    rng = random.Random(6)
    orders = set()
    for _ in range(50):
        row = name_copy.binding_row(rng, VOCAB, VOCAB, pairs=8)
        assert row.names == 8 and row.described == 17 and len(row.ids) == len(row.labels) == 33
        described = row.ids[1:row.described]
        assert described[0::2] == list(range(VOCAB, VOCAB + 8))  # <n0> w0 <n1> w1 ...
        word = dict(zip(described[0::2], described[1::2]))
        assert all(len(SPECIAL_TOKENS) <= w < VOCAB for w in word.values())
        asked = row.ids[row.described::2]
        assert sorted(asked) == list(range(VOCAB, VOCAB + 8)) and [name for name, _ in row.queries] == asked
        answered = [i for i, label in enumerate(row.labels) if label != lvlm.IGNORE]
        assert answered == list(range(row.described + 1, 33, 2))
        assert [row.labels[i] for i in answered] == [word[name] for name in asked]
        orders.add(tuple(asked))
    assert len(orders) > 1


def test_binding_rows_tag_each_described_word_with_its_name_and_train():
    sizes = lvlm.LvlmSizes(hidden=32, layers=1, heads=2, image_size=32, patch_size=16, vision_hidden=32,
                           vision_layers=1)
    model, _, _ = lvlm.build_pocket_llava([f"w{i}" for i in range(VOCAB)], sizes, 0)
    vocab_size = model.config.text_config.vocab_size
    rows = [name_copy.binding_row(random.Random(7), vocab_size, vocab_size, pairs=3)]
    tags = sentence_tags(name_copy.name_copy_batch(rows, vocab_size).input_ids, vocab_size, [rows[0].described])
    assert tags[0].tolist() == [-1, -1, 0, -1, 1, -1, 2] + [-1] * 6
    loss = name_copy.rows_loss(model, rows, tag=True)
    loss.backward()
    assert torch.isfinite(loss) and model.get_input_embeddings().weight.grad is not None
    assert 0.0 <= name_copy.binding_accuracy(model, random.Random(8), rows=4, pairs=3, tag=True) <= 1.0
