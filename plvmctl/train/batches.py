"""Training batches: samples turned into prompt + answer token ids, labels and loss weights.

Every trainer that teaches a frozen LLaVA through a `ConceptTable` (the PLVM Aligner, Yo'LLaVA)
feeds it the same rows: the prompt of `prompt.build_prompt` with the sample's concepts, the
answer tokenized as it continues the prompt, labels on the answer only (IGNORE elsewhere) and a
weight per label (Eq. 2's w on the Yes/No verdict token). Encoding them in one place keeps the
trainers' prompts identical to the ones `ask` builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ..concept import Concept
from ..errors import PlvmError
from ..images import load_image
from ..prompt import build_prompt, encode_segments, split_names
from ..table import ConceptTable
from .data import Sample

IGNORE = -100  # label of prompt and padding positions: no loss there


@dataclass
class EncodedBatch:
    """Token ids of a batch, right-padded; the concepts' virtual ids follow `names` order.

    `labels[b, t]` is the answer token at position t (-100 on the prompt and padding) and
    `weights[b, t]` its weight as a target: shift both by one against the logits.
    """

    names: list[str]  # concepts of the batch, in table order
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T]
    weights: torch.Tensor  # [B, T]
    prompt_lengths: list[int]
    photos: list[Path]  # query photos of the rows that have one, in row order
    samples: list[Sample]


def _placeholder_concept(name: str, num_context: int, hidden: int) -> Concept:
    zeros = torch.zeros(hidden)
    return Concept(name, zeros, zeros, torch.zeros(num_context, hidden))


def encode_batch(samples: Sequence[Sample], backbone, template, num_context: int, *,
                 yes_no_weight: float, attribute_weight: float = 1.0, with_answers: bool = True,
                 image_cache: dict[Path, Any] | None = None,
                 names: Sequence[str] | None = None) -> EncodedBatch:
    """Prompt + answer ids of every sample; labels only on the answer.

    Virtual ids depend only on the order of the names and k, so they are laid out with
    placeholder concepts here; the real table (same order) is built from the Aligner's output
    at forward time. The answer is `split_names(prefix + answer)` + EOS (prefix: the template's
    `answer_prefix`, " " after Vicuna's "ASSISTANT:"), tokenized as it continues the prompt, so
    a `<name>` in the answer is the concept's word id and its head row gets trained too; a
    sample's `reasoning` comes first ("{prefix}{reasoning}.", then " {answer}"). A photo's slot
    count comes from the backbone (it depends on the photo's size for anyres families): with
    `image_cache` the photos are opened once here and kept for the forward. The verdict's first
    token of a recognition sample (the "Yes"/"No", after any reasoning) gets weight
    `yes_no_weight`, every answer token of an attribute sample `attribute_weight`, the others 1.
    A sample's `also` names further concepts whose sentences
    follow its own in the prompt (and that its question and answer may name). `names` (in
    table order) may hold more concepts than the samples': a rank of a multi-process run gives
    the whole global batch's, so its rows see the concept table one process would build.
    """
    own = list(dict.fromkeys(name for sample in samples for name in (sample.name, *sample.also)))
    names = own if names is None else list(names)
    if not set(own) <= set(names):
        raise PlvmError(f"encode_batch: the table's names lack {sorted(set(own) - set(names))}")
    layout = ConceptTable([_placeholder_concept(n, num_context, 1) for n in names],
                          backbone.vocab_size)
    tokenizer = backbone.tokenizer
    rows, labels, weights, prompt_lengths, photos = [], [], [], [], []
    for sample in samples:
        segments = build_prompt(sample.question, template=template,
                                has_image=sample.photo is not None,
                                concepts={name: num_context for name in (sample.name, *sample.also)},
                                also=sample.also)
        query = [] if sample.photo is None else \
            [sample.photo if image_cache is None else photo_image(sample.photo, image_cache)]
        prompt = encode_segments(segments, tokenizer, slot_id=layout.slot_id,
                                 image_token_id=backbone.image_token_id,
                                 num_image_tokens=backbone.image_token_counts(query),
                                 pieces=backbone.prompt_pieces)
        answer: list[int] = []
        reasoning: list[int] = []
        if with_answers:
            prefix = template.answer_prefix
            if sample.reasoning:
                reasoning = encode_segments([prefix + sample.reasoning.strip() + "."], tokenizer,
                                            slot_id=layout.slot_id, image_token_id=backbone.image_token_id,
                                            num_image_tokens=0, add_bos=False)
                prefix = " "
            answer = reasoning + encode_segments(split_names(prefix + sample.answer.strip(),
                                                             [sample.name, *sample.also]),
                                                 tokenizer, slot_id=layout.slot_id,
                                                 image_token_id=backbone.image_token_id,
                                                 num_image_tokens=0, add_bos=False,
                                                 pieces=backbone.prompt_pieces)
            answer.append(backbone.eos_token_id)
        answer_weights = [float(attribute_weight) if sample.kind == "attribute" else 1.0] * len(answer)
        if answer and sample.kind in ("positive", "negative"):
            answer_weights[len(reasoning)] = float(yes_no_weight)  # the verdict's first token
        rows.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
        weights.append([0.0] * len(prompt) + answer_weights)
        prompt_lengths.append(len(prompt))
        if sample.photo is not None:
            photos.append(sample.photo)
    width = max(len(row) for row in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), backbone.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    label_tensor = torch.full((batch, width), IGNORE, dtype=torch.long)
    weight_tensor = torch.zeros((batch, width), dtype=torch.float32)
    for i, (row, label, weight) in enumerate(zip(rows, labels, weights)):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
        label_tensor[i, :len(row)] = torch.tensor(label, dtype=torch.long)
        weight_tensor[i, :len(row)] = torch.tensor(weight, dtype=torch.float32)
    return EncodedBatch(names, input_ids, attention_mask, label_tensor, weight_tensor,
                        prompt_lengths, photos, list(samples))


def photo_image(photo: Path, image_cache: dict[Path, Any] | None = None):
    """The photo opened (once, when `image_cache` keeps it)."""
    if image_cache is not None and photo in image_cache:
        return image_cache[photo]
    image = load_image(photo)
    if image_cache is not None:
        image_cache[photo] = image
    return image


def first_token_id(backbone, text: str) -> int:
    """The first token of `text` as the start of an answer, right after its prompt: " Yes" is
    "▁Yes" (never the bare "▁" that the legacy LLaMA normalizer puts before a lone text).
    Callers put the template's `answer_prefix` in front of the word ("Yes" after ChatML's
    "assistant\n")."""
    ids = encode_segments([text], backbone.tokenizer, slot_id=lambda slot: 0,
                          image_token_id=backbone.image_token_id, num_image_tokens=0, add_bos=False)
    if not ids:
        raise PlvmError(f"the tokenizer gives no token for {text!r}")
    return ids[0]


__all__ = ["IGNORE", "EncodedBatch", "encode_batch", "photo_image", "first_token_id"]
