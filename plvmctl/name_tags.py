"""Name tags: each token of a named person's words carries that person's name vector.

With several people described in one prompt, every sentence uses the same words ("hair black
skin pale ..."), so to answer about one of them a model must know which sentence each word
belongs to and which person the question asks about. A model trained with name tags is handed
both: every token after a name word, up to the next full stop or end of sequence (or the next
name), gets that name's input vector added to its own embedding, the way a segment embedding
marks which segment a token is in. A described person's sentence (` <n> is <t1>…<tk>.`) is then
tagged with `<n>`, and so are a question's words after `<n>` and the answer that follows, so
the place that answers and the asked sentence carry the same vector (docs/research-log.md,
"Two concepts in one prompt": reading among several sentences goes from 0.5 to 0.8-0.9).

The rule is the same in pretraining (`plvmctl.lab.lvlm.forward_logits`) and at ask time
(`ConceptTable.active`, where the names are the concept words). A model trained with tags
says so in its config (`TAGS_KEY`: the ids that end a tag); every other model is untouched.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

TAGS_KEY = "plvmctl_name_tags"  # config attribute: {"stop_ids": [...]} on a model trained with tags


def tag_stop_ids(config) -> frozenset[int] | None:
    """The ids that end a name's tag, from a model config (None: the model has no name tags)."""
    found = getattr(config, TAGS_KEY, None)
    if not found:
        return None
    return frozenset(int(i) for i in found["stop_ids"])


def name_tags(ids: Sequence[Sequence[int]], first_name: int, names: int, stops: Collection[int],
              owners: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
    """([B, T] the index of the name whose tag each token carries, -1 for none; each row's owner
    after its last token).

    A name is an id in [first_name, first_name + names): it is not tagged itself and starts its
    tag on the tokens after it. A stop id ends the tag (and is not tagged). `owners` continues
    rows whose earlier tokens were tagged before (generation one token at a time)."""
    tags = torch.full((len(ids), max((len(row) for row in ids), default=0)), -1, dtype=torch.long)
    last: list[int] = []
    for b, row in enumerate(ids):
        owner = -1 if owners is None else owners[b]
        for t, token in enumerate(row):
            if first_name <= token < first_name + names:
                owner = token - first_name
            elif token in stops:
                owner = -1
            elif owner >= 0:
                tags[b, t] = owner
        last.append(owner)
    return tags, last


def add_tags(embeds: torch.Tensor, tags: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """`embeds` [B, T, H] with each tagged token's name vector added: `vectors` [B, N, H] (each
    row its own names) or [N, H] (names shared by the batch)."""
    tags = tags.to(embeds.device)
    if vectors.dim() == 2:
        vectors = vectors.unsqueeze(0).expand(len(embeds), -1, -1)
    if vectors.shape[1] == 0:
        return embeds
    index = tags.clamp(min=0, max=vectors.shape[1] - 1).unsqueeze(-1).expand(-1, -1, vectors.shape[-1])
    owner = torch.gather(vectors.to(embeds.dtype), 1, index)
    return embeds + torch.where((tags >= 0).unsqueeze(-1), owner, torch.zeros_like(owner))
