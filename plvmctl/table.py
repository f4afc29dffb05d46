"""The concept table: virtual token ids for concepts, active only during a call.

For the active concepts c_0 … c_{n-1} (k_i context tokens each) the ids above the real
vocabulary V are laid out as

    V + i                      the word `<c_i>` (has an output-head row: can be generated)
    V + n + offset_i + j       context token j of c_i (input only)
    V + n + Σk + voffset_i + j visual token j of c_i (input only; placed after a photo's
                               image tokens when the concept is recognised in it)

`ConceptTable.active()` puts two hooks around the backbone for the duration of a `with`:

- on the input embedding: ids ≥ V are looked up in the table, real ids go through the real
  matrix untouched (`torch.where`, so their rows are bit-identical);
- on the output head: V + n + Σk + Σm columns are appended: the concepts' head rows give the
  words' logits, context and visual columns get the dtype's lowest value (never generated).

A model trained with name tags (`plvmctl.name_tags`, in its config) also gets, on the input
embedding, each concept's word vector added to the tokens that follow the word up to the next
full stop: its context tokens, and a question's words after it and the answer generated there,
one token at a time included.

Nothing in the model is resized or overwritten, any number of concepts can share one batch,
stock `generate()` (KV cache, sampling, logits processors) keeps working, and gradients flow
into the concept tensors, so trainers use the same mechanism.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .concept import Concept
from .errors import PlvmError
from .name_tags import add_tags, name_tags, tag_stop_ids
from .prompt import Slot


class ConceptTable:
    def __init__(self, concepts: Sequence[Concept], vocab_size: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        names = [c.name for c in concepts]
        if len(set(names)) != len(names):
            raise PlvmError(f"the same concept is listed twice: {names}")
        self.vocab_size = vocab_size
        self.names = names
        self.num_concepts = len(concepts)
        self._word_id = {c.name: vocab_size + i for i, c in enumerate(concepts)}
        self._context_start: dict[str, int] = {}
        self._num_context: dict[str, int] = {}
        start = vocab_size + self.num_concepts
        for concept in concepts:
            self._context_start[concept.name] = start
            self._num_context[concept.name] = concept.num_context
            start += concept.num_context
        self._visual_start: dict[str, int] = {}
        self._num_visual: dict[str, int] = {}
        for concept in concepts:
            self._visual_start[concept.name] = start
            self._num_visual[concept.name] = concept.num_visual
            start += concept.num_visual
        self.total_ids = start  # width of the extended logits
        hidden = concepts[0].hidden_size if concepts else 0
        rows = ([c.word.reshape(1, hidden) for c in concepts] + [c.context for c in concepts]
                + [c.visual for c in concepts])
        # [n + Σk + Σm, H]: input embeddings of every virtual id, in id order
        self.input_rows = (torch.cat(rows, 0) if concepts else torch.zeros(0, 1)).to(device, dtype)
        # [n, H]: output-head rows of the concept words
        self.head_rows = (torch.stack([c.head for c in concepts]) if concepts
                          else torch.zeros(0, 1)).to(device, dtype)

    # -- ids ----------------------------------------------------------------------------
    def slot_id(self, slot: Slot) -> int:
        if slot.name not in self._word_id:
            raise PlvmError(f"concept <{slot.name}> is not in this call's table")
        if slot.index < 0:
            return self._word_id[slot.name]
        if slot.index >= self._num_context[slot.name]:
            raise PlvmError(f"concept <{slot.name}> has {self._num_context[slot.name]} context tokens")
        return self._context_start[slot.name] + slot.index

    def word_id(self, name: str) -> int:
        return self.slot_id(Slot(name))

    def visual_ids(self, name: str) -> list[int]:
        """The ids of `name`'s visual tokens (none for a concept without them)."""
        if name not in self._visual_start:
            raise PlvmError(f"concept <{name}> is not in this call's table")
        start = self._visual_start[name]
        return list(range(start, start + self._num_visual[name]))

    def name_for_id(self, token_id: int) -> str | None:
        """The concept whose word is `token_id`, or None for real (or context or visual) ids."""
        index = token_id - self.vocab_size
        if 0 <= index < self.num_concepts:
            return self.names[index]
        return None

    # -- hooks --------------------------------------------------------------------------
    def row_mask(self, rows: Sequence[Sequence[str]]) -> torch.Tensor:
        """[B, n] bool: which concept words each batch row may produce (its own concepts)."""
        mask = torch.zeros(len(rows), self.num_concepts, dtype=torch.bool)
        for row, names in enumerate(rows):
            for name in names:
                mask[row, self.names.index(name)] = True
        return mask

    @contextlib.contextmanager
    def active(self, model: torch.nn.Module,
               rows: Sequence[Sequence[str]] | None = None) -> Iterator["ConceptTable"]:
        """Hook the table into `model`'s input embedding and output head for one call.

        `rows`, one list of concept names per batch row, limits each row's output to its own
        concepts, so a batch answers exactly as its rows would one by one.
        """
        if self.num_concepts == 0:  # nothing to add: the plain model
            yield self
            return
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings()
        vocab = self.vocab_size
        if head.weight.shape[0] != vocab:
            raise PlvmError(f"table built for {vocab} vocabulary rows, model head has {head.weight.shape[0]}")
        pending: list[torch.Tensor] = []
        allowed = None if rows is None else self.row_mask(rows).to(self.head_rows.device)
        stops = tag_stop_ids(model.config)  # a model trained with name tags reads them here too
        owners: list[int] | None = None  # each row's tag owner after the tokens seen so far

        def tagged(ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            # A call of one token a row continues the call before it (generation with a KV
            # cache); any longer call starts afresh (a prompt, a training batch).
            nonlocal owners
            fresh = ids.shape[1] > 1 or owners is None or len(owners) != ids.shape[0]
            tags, owners = name_tags(ids.tolist(), vocab, self.num_concepts, stops, None if fresh else owners)
            return add_tags(output, tags, self.input_rows[:self.num_concepts].to(output.dtype))

        def before_embedding(module, args):
            ids = args[0]
            pending.append(ids)
            return (ids.clamp(max=vocab - 1),) + tuple(args[1:])

        def after_embedding(module, args, output):
            ids = pending.pop()
            virtual = ids >= vocab
            if bool(virtual.any()):
                rows = self.input_rows[(ids - vocab).clamp(min=0)].to(output.dtype)
                output = torch.where(virtual.unsqueeze(-1), rows, output)
            return output if stops is None else tagged(ids, output)

        def after_head(module, args, output):
            hidden = args[0]
            word_logits = (hidden.to(self.head_rows.dtype) @ self.head_rows.T).to(output.dtype)
            if allowed is not None and allowed.shape[0] == word_logits.shape[0]:
                mask = allowed.view(allowed.shape[0], *[1] * (word_logits.ndim - 2), -1)
                word_logits = word_logits.masked_fill(~mask, torch.finfo(output.dtype).min)
            context_logits = output.new_full(
                (*output.shape[:-1], self.total_ids - vocab - self.num_concepts),
                torch.finfo(output.dtype).min,
            )
            return torch.cat([output, word_logits, context_logits], dim=-1)

        handles = [
            embedding.register_forward_pre_hook(before_embedding),
            embedding.register_forward_hook(after_embedding),
            head.register_forward_hook(after_head),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            pending.clear()
