"""Which name owns each token (plvmctl.lab.name_tags) and the tag's effect on the forward pass."""

from __future__ import annotations

import torch

from plvmctl.lab import lvlm
from plvmctl.lab.name_tags import sentence_tags

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
