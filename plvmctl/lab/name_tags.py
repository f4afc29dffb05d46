"""Tagging each described person's words with their name: which name owns every token.

With several people described in one prompt, every sentence uses the same keys ("hair black"),
so to read the asked person's value the LM must know which sentence a value sits in: the
latest name before it. A lever that hands it that knowledge: each token of a person's
sentence gets that person's name vector added to its input embedding (`lvlm.forward_logits`'s
`tags`), the way a segment embedding marks which segment a token is in. At ask time a concept
table would add each concept's vector to the tokens of its own sentence.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def sentence_tags(input_ids: torch.Tensor, vocab: int, ends: Sequence[int] | None = None,
                  stop_id: int | None = None, follower_id: int | None = None,
                  stop_ids: Collection[int] = ()) -> torch.Tensor:
    """[B, T] the index of the name (token id - `vocab`) whose sentence holds each token, -1
    for none. A sentence starts after its name token (with `follower_id`, only a name that
    token follows: "<n> is", not a question's "<n>'s") and runs to the next name, the next
    `stop_id` or any of `stop_ids` (not tagged) or the row's end in `ends` (the described part;
    the whole row without). Without `follower_id`, a question's name tags the question's words
    after it and the answer that follows: the asked person's vector at the place that answers."""
    stops = set(stop_ids) | ({stop_id} if stop_id is not None else set())
    tags = torch.full_like(input_ids, -1)
    for b, row in enumerate(input_ids.tolist()):
        owner = -1
        for t, token in enumerate(row[:len(row) if ends is None else ends[b]]):
            if token >= vocab:
                starts = follower_id is None or (t + 1 < len(row) and row[t + 1] == follower_id)
                owner = token - vocab if starts else -1
            elif token in stops:
                owner = -1
            elif owner >= 0:
                tags[b, t] = owner
    return tags
