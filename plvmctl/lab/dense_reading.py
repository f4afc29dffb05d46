"""Reading rows that ask several questions about one prompt: dense supervision for name binding.

A reading row ("<n1> is ... . <n2> is ... . user: What is <n2>'s hair color? assistant: red")
holds one lookup: the asked name's sentence, then the trait's value in it. bench/name_binding.py
shows that such a lookup over fresh name vectors is learned fast when every row holds many of
them. A dense row keeps one prompt and appends further turns, each "user: <question>
assistant: <answer></s>" about one of the described people, every answer with its loss; the
first turn is exactly the one-question row, so what a row looks like at ask time is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import PlvmError
from ..prompt import POCKET
from .lvlm import IGNORE, Batch, Row, encode_rows, padded


def encode_dense(groups: Sequence[Sequence[Row]], tokenizer, num_image_tokens: int, name_id: int) -> Batch:
    """One sequence per group of text rows that describe the same people in the same order:
    the first row's prompt and answer, then each further row's turn (from its `user` token on)
    and answer. Labels on every answer; `prompt_lengths` is the first turn's prompt."""
    user = tokenizer.convert_tokens_to_ids(POCKET.user)
    sequences, labels, lengths, counts = [], [], [], []
    for group in groups:
        if not group or any(row.image is not None or row.descriptions != group[0].descriptions for row in group):
            raise PlvmError("a dense group is one or more text rows with the same descriptions")
        batch = encode_rows(group, tokenizer, num_image_tokens, name_id=name_id)
        preamble: list[int] = []
        sequence: list[int] = []
        label: list[int] = []
        for i in range(len(group)):
            length = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i, :length].tolist()
            start = ids.index(user)
            if i == 0:
                preamble, start = ids[:start], 0
            elif ids[:start] != preamble:
                raise PlvmError("a dense group's rows must encode the same preamble")
            sequence += ids[start:]
            label += batch.labels[i, start:length].tolist()
        sequences.append(sequence)
        labels.append(label)
        lengths.append(batch.prompt_lengths[0])
        counts.append(batch.names_per_row[0])
    return Batch(*padded(sequences, labels), [], lengths, name_id, counts)


def dense_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every answer token of the batch (logits at t predict t + 1):
    each lookup weighs the same, however many a row holds."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)
