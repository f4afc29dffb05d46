"""A copy warm-up over fresh name vectors: look a name up, read what its own block says.

`lvlm.copy_warmup_loss` teaches the pocket LM induction over vocabulary words. A person in a
prompt is different: their name is a fresh random vector (a name token, `lvlm.name_vectors`),
and several people's descriptions use the same keys ("hair black" in every sentence), so the
value to read is the one after the asked key *inside the asked name's block*, not the nearest
one. These rows teach exactly that lookup on random words, before any description is seen:

    <s> <n1> [w] k1 v11 k2 v12 k3 v13 <n2> [w] k1 v21 k3 v23 k2 v22 ... filler ... <n2> [x] k3 v23 <n1> [x] k1 v11

Every row has 2 to 4 names (name tokens `name_id + i`, as `lvlm.encode_rows` numbers several
people), one block per name holding the row's keys in its own random order, each with a value
of its own; an optional connective word `w` after each name (a sentence's "is"); then
queries, each a name and a key in either order with 0 to 2 filler words between (a question
names its person before or after the trait: "what is <n>'s hair colour", "the hair colour of
<n>"), answered by that block's value. A share `next_share` of the rows asks instead for the
word that follows a name ("<n2> ->" the first word of <n2>'s block: the plain induction
pattern on a name vector; these rows'
blocks are distinct random words, no keys). Only the answers carry loss; special tokens are
never drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..tiny import BOS_ID, PAD_ID, SPECIAL_TOKENS
from .lvlm import IGNORE, Batch, forward_logits
from .name_marker import NameMarker
from .name_tags import sentence_tags


@dataclass
class NameCopyRow:
    """One warm-up row: token ids (names as `name_id + i`), the answer id at each answered
    position (IGNORE elsewhere), how many names it holds, and what each answer was asked by:
    (name token, key), the key None when the word after the name was asked; `described` is
    how many tokens come before the queries (the blocks and the filler)."""

    ids: list[int]
    labels: list[int]
    names: int
    queries: list[tuple[int, int | None]]
    described: int = 0


def name_copy_row(rng: random.Random, vocab_size: int, name_id: int, next_share: float = 0.25,
                  max_keys: int = 5, max_people: int = 4, dense: bool = False) -> NameCopyRow:
    """A random row (see the module docstring); `name_id` is the first name token's id. A
    curriculum starts with small problems: `max_people` names (2 at least) and `max_keys` keys.

    `dense` rows carry more answers for the same length: up to 8 queries, each a different
    (name, key) of the row, and a "next" query reads its name's whole block back (every word
    an answer: the first needs the name, the rest plain induction)."""
    first = len(SPECIAL_TOKENS)
    people = rng.randint(2, max_people)
    keys_count = rng.randint(2, max_keys)
    words = rng.sample(range(first, vocab_size), keys_count + 3)
    keys, connective, filler_words = words[:keys_count], words[keys_count], words[keys_count + 1:]
    taken = set(words)
    free = [word for word in range(first, vocab_size) if word not in taken]
    asked_next = rng.random() < next_share
    use_connective = not asked_next and rng.random() < 0.5
    blocks: list[list[int]] = []  # per name: its block's words after the name (and connective)
    ids = [BOS_ID]
    for person in range(people):
        if asked_next:  # distinct words: the one after the name tells the names apart
            block = rng.sample(free, rng.randint(2, 2 * max_keys))
        else:
            order = rng.sample(keys, rng.randint(max(1, keys_count - 1), keys_count))
            block = [token for key in order for token in (key, rng.choice(free))]
        blocks.append(block)
        ids += [name_id + person] + ([connective] if use_connective else []) + block
    ids += [rng.choice(free) for _ in range(rng.randint(0, 4))]
    described = len(ids)
    labels = [IGNORE] * len(ids)
    queries: list[tuple[int, int | None]] = []
    if dense:  # every name once ("next"), or every (name, key) of the row at most once
        targets = ([(person, 0) for person in range(people)] if asked_next else
                   [(person, pair) for person in range(people) for pair in range(len(blocks[person]) // 2)])
        asked: list[tuple[int, int] | None] = rng.sample(targets, min(8, len(targets)))
    else:
        asked = [None] * rng.randint(1, 3)
    for target in asked:
        person = rng.randrange(people) if target is None else target[0]
        if asked_next:
            cue, answers, key = [name_id + person], blocks[person] if dense else blocks[person][:1], None
        else:
            pair = rng.randrange(len(blocks[person]) // 2) if target is None else target[1]
            key, answers = blocks[person][2 * pair], [blocks[person][2 * pair + 1]]
            between = [rng.choice(filler_words) for _ in range(rng.randint(0, 2))]
            cue = [name_id + person] + between + [key] if rng.random() < 0.5 else [key] + between + [name_id + person]
        ids += cue + answers
        labels += [IGNORE] * len(cue) + answers
        queries += [(name_id + person, key)] * len(answers)
    return NameCopyRow(ids, labels, people, queries, described)


def binding_row(rng: random.Random, vocab_size: int, name_id: int, pairs: int = 8) -> NameCopyRow:
    """bench/name_binding.py's row on name tokens: `pairs` names each followed by one random
    word, then every name again in a shuffled order, each answered by its word:

        <s> <n0> w0 <n1> w1 ... <n7> w7   <n3> w3 <n0> w0 ...

    the plain one-hop recall (a name's word) that a dense, tagged warm-up learns fast."""
    first = len(SPECIAL_TOKENS)
    words = [rng.randrange(first, vocab_size) for _ in range(pairs)]
    ids = [BOS_ID] + [token for person in range(pairs) for token in (name_id + person, words[person])]
    described = len(ids)
    labels = [IGNORE] * described
    order = rng.sample(range(pairs), pairs)
    for person in order:
        ids += [name_id + person, words[person]]
        labels += [IGNORE, words[person]]
    return NameCopyRow(ids, labels, pairs, [(name_id + person, None) for person in order], described)


def name_copy_batch(rows: list[NameCopyRow], name_id: int) -> Batch:
    """The rows right-padded into an `lvlm.Batch` (no photos) that `lvlm.forward_logits` reads;
    `labels[t]` is the answer predicted from position t - 1, as in `encode_rows`."""
    width = max(len(row.ids) for row in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row.ids)] = torch.tensor(row.ids)
        mask[i, :len(row.ids)] = 1
        labels[i, :len(row.labels)] = torch.tensor(row.labels)
    return Batch(ids, mask, labels, [], [len(row.ids) for row in rows], name_id, [row.names for row in rows])


def name_copy_loss(model, rng: random.Random, rows: int = 64, next_share: float = 0.25, max_keys: int = 5,
                   max_people: int = 4, marker: NameMarker | None = None, dense: bool = False,
                   tag: bool = False) -> torch.Tensor:
    """Cross-entropy of the answers of `rows` fresh rows, every name a fresh random vector
    (input embedding and output-head row, `lvlm.forward_logits`), with `marker`'s shared part
    added when given; with `tag`, every block token also gets its name added (`name_tags`)."""
    vocab_size = model.config.text_config.vocab_size
    batch_rows = [name_copy_row(rng, vocab_size, vocab_size, next_share, max_keys, max_people, dense)
                  for _ in range(rows)]
    return rows_loss(model, batch_rows, marker, tag)


def rows_loss(model, batch_rows: list[NameCopyRow], marker: NameMarker | None = None,
              tag: bool = False) -> torch.Tensor:
    """Cross-entropy of the answers of `batch_rows` (fresh name vectors, `name_copy_loss`)."""
    vocab_size = model.config.text_config.vocab_size
    batch = name_copy_batch(batch_rows, vocab_size)
    names = None if marker is None else marker.vectors(model, len(batch_rows), max(batch.names_per_row))
    tags = sentence_tags(batch.input_ids, vocab_size, [row.described for row in batch_rows]) if tag else None
    logits = forward_logits(model, batch, None, names=names, tags=tags)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


@torch.no_grad()
def binding_accuracy(model, rng: random.Random, rows: int = 128, pairs: int = 8, tag: bool = False) -> float:
    """Top-1 accuracy over every answer of `rows` fresh `binding_row`s (chance 1/200)."""
    vocab_size = model.config.text_config.vocab_size
    batch_rows = [binding_row(rng, vocab_size, vocab_size, pairs) for _ in range(rows)]
    batch = name_copy_batch(batch_rows, vocab_size)
    tags = sentence_tags(batch.input_ids, vocab_size, [row.described for row in batch_rows]) if tag else None
    was_training = model.training
    model.eval()
    predicted = forward_logits(model, batch, None, tags=tags).argmax(-1)
    model.train(was_training)
    answered = batch.labels[:, 1:] != IGNORE
    return round(float((predicted[:, :-1] == batch.labels[:, 1:])[answered].float().mean()), 3)


@torch.no_grad()
def name_copy_accuracy(model, rng: random.Random, rows: int = 128, marker: NameMarker | None = None,
                       tag: bool = False) -> dict[str, float]:
    """Top-1 accuracy of the answers of `rows` fresh full-size rows (2-4 names, up to 5 keys),
    apart for the ``key`` queries (a name and a key: the lookup reading needs) and the ``next``
    queries (the word after a name: plain induction on a name vector), against ``chance_key``,
    what one value picked among the blocks holding the asked key would score, and
    ``chance_next``, what the first word after a name picked among the row's names would."""
    vocab_size = model.config.text_config.vocab_size
    batch_rows = [name_copy_row(rng, vocab_size, vocab_size, 0.5) for _ in range(rows)]
    batch = name_copy_batch(batch_rows, vocab_size)
    names = None if marker is None else marker.vectors(model, rows, max(batch.names_per_row))
    tags = sentence_tags(batch.input_ids, vocab_size, [row.described for row in batch_rows]) if tag else None
    was_training = model.training
    model.eval()
    predicted = forward_logits(model, batch, None, names=names, tags=tags).argmax(-1)
    model.train(was_training)
    hits = {"key": [], "next": []}
    chance: list[float] = []
    chance_next: list[float] = []
    for i, row in enumerate(batch_rows):
        answered = [t for t, label in enumerate(row.labels) if label != IGNORE]
        for t, (name, key) in zip(answered, row.queries):
            hits["next" if key is None else "key"].append(int(predicted[i, t - 1]) == row.labels[t])
            if key is not None:
                chance.append(1 / row.ids[:row.described].count(key))
            else:
                chance_next.append(1 / row.names)
    return {kind: round(sum(found) / max(1, len(found)), 3) for kind, found in hits.items()} | {
        "chance_key": round(sum(chance) / max(1, len(chance)), 3),
        "chance_next": round(sum(chance_next) / max(1, len(chance_next)), 3)}
