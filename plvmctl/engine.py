"""Batched personalized asking: collate, left-pad, generate (or score options), decode.

Every request is prepared on its own (image opened, `<name>`s resolved, prompt built); a
request that fails there gets its error and the rest still run. Prepared requests are grouped
by whether they carry a photo, sorted by length and cut into batches; each batch builds one
concept table with every concept its questions mention, so any mix of concepts shares a batch.

What a concept's method does at ask time is an `AskHook` the engine is given (each method's
hook lives with the method; plvmctl.methods.make_engine builds an engine with all of them).
After every request is prepared, each hook in turn reads the prepared items (their photos and
concepts) and may put a concept's visual tokens right after the row's image tokens
(`after_image`), say where a concept is in the photo (`located`: ` <name> is on the left.`
after its sentence), replace a photo, and record what it found under its key in the row's
`notes` (returned on the AskResult). The engine itself knows no method.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers import GenerationConfig

from .concept import Concept
from .errors import PlvmError
from .images import load_image
from .prompt import build_prompt, encode_segments, insert_after_image, mentioned_names, split_names
from .recipe import GenerationSection
from .store import ConceptStore
from .table import ConceptTable
from .tokens import decode_with_names


@dataclass
class AskRequest:
    """A question about no photo, one photo, or several photos in one prompt (a list)."""

    question: str
    image: str | os.PathLike | Image.Image | list | None = None
    concepts: Sequence[str] = ()  # more concepts for the prompt than it names (found ones: --auto)


@dataclass
class AskResult:
    request: AskRequest
    answer: str | None = None
    error: str | None = None
    notes: dict[str, dict] = field(default_factory=dict)  # hook key -> {concept: what the hook found}
    prompt_tokens: int | None = None  # the prompt's length in ids (image slots included)
    completion_tokens: int | None = None  # ids generated before the end of the answer

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class OptionScores:
    """Summed log-likelihood of each option as the whole answer, and its token count."""

    request: AskRequest
    logprobs: list[float] | None = None
    num_tokens: list[int] | None = None
    error: str | None = None
    notes: dict[str, dict] = field(default_factory=dict)  # hook key -> {concept: what the hook found}


@dataclass
class Prepared:
    """One request ready to batch: its prompt segments, photos and soft-prompt concepts, and
    what the hooks made of it: the concepts whose visual tokens follow the last image's tokens
    (`after_image`, in that order), where the prompt says a concept is in the photo
    (`located`: name -> "on the left") and their notes (hook key -> {concept: finding})."""

    index: int
    segments: list
    images: list[Image.Image]
    names: list[str]
    request: AskRequest | None = None
    after_image: list[str] = field(default_factory=list)
    located: dict[str, str] = field(default_factory=dict)
    notes: dict[str, dict] = field(default_factory=dict)


class AskHook(Protocol):
    """What a concept's method does at ask time, between preparing the requests and encoding
    them. `prepare` reads the prepared items (`engine.concept(name)` gives a concept) and may
    set their `after_image`, `located` and `images`, and record `notes[key]`; an item it cannot
    handle gets its error in `errors` and is left out of the list it returns."""

    key: str

    def prepare(self, engine: "Engine", items: list[Prepared], errors: dict[int, str]) -> list[Prepared]:
        ...


def photo_key(image: Image.Image) -> str:
    """Equal photos (the same pixels) have the same key: a hook computes their features once."""
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class Engine:
    """Ask questions that mention concepts, in batches, with the model untouched.

    `concepts` is a mapping name → Concept or a ConceptStore (loaded on demand and checked
    against the backbone's fingerprint). `descriptions` gives plain-text personas
    (`<name> is {text}.`); `literal_names=True` leaves unknown `<name>`s as plain text.
    `hooks` run, in order, on every prepared batch of requests (see AskHook). `generation`
    is how it decodes (the recipe's generation section unless given: a server decodes each
    request as its caller asks).
    """

    def __init__(self, runtime, concepts: Mapping[str, Concept] | ConceptStore | None = None,
                 descriptions: Mapping[str, str] | None = None, literal_names: bool = False,
                 hooks: Sequence[AskHook] = (), generation: GenerationSection | None = None):
        self.runtime = runtime
        self.backbone = runtime.backbone
        self.template = runtime.template
        self.generation = generation or runtime.recipe.generation
        self._store = concepts if isinstance(concepts, ConceptStore) else None
        self._concepts: dict[str, Concept] = {} if self._store else dict(concepts or {})
        for concept in self._concepts.values():
            runtime.check_concept(concept)
        self.descriptions = dict(descriptions or {})
        self.literal_names = literal_names
        self.hooks = list(hooks)

    # -- concepts ------------------------------------------------------------------------
    def concept(self, name: str) -> Concept:
        if name not in self._concepts:
            if self._store is None:
                known = ", ".join(f"<{n}>" for n in sorted(self._concepts)) or "none"
                raise PlvmError(f"unknown concept <{name}> (known: {known})")
            self._concepts[name] = self.runtime.check_concept(self._store.load(name))
        return self._concepts[name]

    def _has(self, name: str) -> bool:
        return name in self._concepts or (self._store is not None and name in self._store)

    def _known(self, names: list[str]) -> dict[str, int]:
        """name → k for every mentioned name that is a soft-prompt concept."""
        known = {}
        for name in names:
            if name in self.descriptions or (self.literal_names and not self._has(name)):
                continue
            known[name] = self.concept(name).num_context  # unknown names raise, listing the known
        return known

    # -- preparation ---------------------------------------------------------------------
    def _prepare(self, index: int, request: AskRequest) -> Prepared:
        sources = request.image if isinstance(request.image, (list, tuple)) else \
            ([] if request.image is None else [request.image])
        if len(sources) > 1 and not self.backbone.multi_image:
            raise PlvmError(f"{self.backbone.family} takes one photo per question: ask about each "
                            "photo on its own (without --together)")
        images = [source.convert("RGB") if isinstance(source, Image.Image) else load_image(source)
                  for source in sources]
        names = list(dict.fromkeys(mentioned_names(request.question) + list(request.concepts)))
        concepts = self._known(names)
        segments = self._segments(request, concepts, len(images))
        # Token ids are assigned per batch, once the batch's concept table exists.
        return Prepared(index, segments, images, list(concepts), request=request)

    def _segments(self, request: AskRequest, concepts: Mapping[str, int], images: int,
                  located: Mapping[str, str] | None = None) -> list:
        """The prompt of `request` with its soft-prompt `concepts` (name → k), `located` ones
        said where they are in the photo."""
        return build_prompt(request.question, template=self.template, has_image=images,
                            concepts=concepts, descriptions=self.descriptions,
                            literal_names=self.literal_names, also=request.concepts, located=located)

    def _batches(self, prepared: list[Prepared], batch_size: int):
        """Group by has-image, sort by prompt length, cut into batches."""
        def length(item: Prepared) -> int:
            return sum(len(s) if isinstance(s, str) else 1 for s in item.segments)

        for has_image in (False, True):
            group = [p for p in prepared if bool(p.images) == has_image]
            group.sort(key=length)
            for start in range(0, len(group), batch_size):
                yield group[start:start + batch_size]

    def _encode_item(self, item: Prepared, table: ConceptTable) -> list[int]:
        """The prompt ids of one item, the visual tokens of its `after_image` concepts after the image."""
        ids = self._encode(item.segments, table, images=item.images)
        visual = [token for name in item.after_image for token in table.visual_ids(name)]
        return insert_after_image(ids, self.backbone.image_token_id, visual)

    def _encode(self, segments: list, table: ConceptTable, add_bos: bool = True,
                images: Sequence[Image.Image] = ()) -> list[int]:
        """Ids of one prompt (or answer) whose `<image>`s stand for `images`."""
        counts = self.backbone.image_token_counts(images, [len(images)]) if images else []
        return encode_segments(segments, self.backbone.tokenizer, slot_id=table.slot_id,
                               image_token_id=self.backbone.image_token_id,
                               num_image_tokens=counts, add_bos=add_bos,
                               pieces=self.backbone.prompt_pieces)

    def _table(self, names: Sequence[str]) -> ConceptTable:
        ordered = list(dict.fromkeys(names))
        return ConceptTable([self.concept(n) for n in ordered], self.backbone.vocab_size,
                            device=self.backbone.device, dtype=self.backbone.dtype)

    def _collate(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad to the longest row: (input_ids, attention_mask)."""
        width = max(len(r) for r in rows)
        pad = self.backbone.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
        device = self.backbone.device
        return ids.to(device), mask.to(device)

    def _prepare_all(self, requests: Sequence[AskRequest], errors: dict[int, str]):
        prepared = []
        for index, request in enumerate(requests):
            try:
                prepared.append(self._prepare(index, request))
            except PlvmError as error:
                errors[index] = str(error)
        for hook in self.hooks:
            prepared = hook.prepare(self, prepared, errors)
        for item in prepared:  # the prompt says where the hooks found its concepts
            if item.located:
                item.segments = self._segments(item.request, self._known(item.names), len(item.images),
                                               item.located)
        return prepared

    # -- asking --------------------------------------------------------------------------
    def generation_config(self, max_new_tokens: int | None = None) -> GenerationConfig:
        settings = self.generation
        kwargs = dict(max_new_tokens=max_new_tokens or settings.max_new_tokens,
                      do_sample=settings.do_sample, pad_token_id=self.backbone.pad_token_id,
                      eos_token_id=self.backbone.eos_token_id)
        if settings.do_sample:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        return GenerationConfig(**kwargs)

    def decode(self, ids: list[int], table: ConceptTable) -> str:
        """Generated ids → text, concept words restored as `<name>` with natural spacing."""
        return decode_with_names(self.backbone.tokenizer, ids, table.name_for_id,
                                 vocab_size=table.vocab_size, eos_token_id=self.backbone.eos_token_id)

    def answer_ids(self, text: str, names: Sequence[str], table: ConceptTable) -> list[int]:
        """Ids of `text` as the assistant's answer, right after its prompt: " A" is "▁A", with
        no stray "▁" of a text tokenized on its own; `<name>`s of `names` are concept words."""
        mentioned = [n for n in mentioned_names(text) if n in names]
        return self._encode(split_names(self.template.answer_prefix + text.strip(), mentioned), table,
                            add_bos=False)

    @torch.no_grad()
    def ask(self, requests: Sequence[AskRequest], *, batch_size: int | None = None,
            max_new_tokens: int | None = None, progress: bool = False) -> list[AskResult]:
        """Answer every request; failures are reported per item, the rest still answered."""
        errors: dict[int, str] = {}
        answers: dict[int, str] = {}
        lengths: dict[int, tuple[int, int]] = {}  # index -> (prompt ids, generated ids)
        prepared = self._prepare_all(requests, errors)
        batch_size = batch_size or self.generation.batch_size
        config = self.generation_config(max_new_tokens)
        bar = tqdm(total=len(prepared), desc="asking", unit="q", disable=not progress)
        model = self.backbone.model
        for batch in self._batches(prepared, batch_size):
            try:
                table = self._table([n for item in batch for n in item.names])
                rows = [self._encode_item(item, table) for item in batch]
                input_ids, attention_mask = self._collate(rows)
                inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
                images = [image for item in batch for image in item.images]
                if images:
                    inputs.update(self.backbone.image_inputs(images, [len(item.images) for item in batch]))
                if self.generation.do_sample:
                    torch.manual_seed(self.generation.seed)
                with table.active(model, rows=[item.names for item in batch]):
                    output = model.generate(**inputs, generation_config=config)
                new_tokens = output[:, input_ids.shape[1]:].tolist()
                for item, row, tokens in zip(batch, rows, new_tokens):
                    answers[item.index] = self.decode(tokens, table)
                    lengths[item.index] = (len(row), self._generated(tokens))
            except (PlvmError, RuntimeError, ValueError) as error:
                for item in batch:
                    errors[item.index] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            bar.update(len(batch))
        bar.close()
        notes = {item.index: item.notes for item in prepared}
        return [AskResult(request, answers.get(i), errors.get(i), dict(notes.get(i, {})),
                          *lengths.get(i, (None, None)))
                for i, request in enumerate(requests)]

    def _generated(self, tokens: list[int]) -> int:
        """How many ids a row generated: up to its end-of-answer id (the padding that follows
        a finished row in the batch is not its own)."""
        stop = self.backbone.eos_token_id
        return tokens.index(stop) if stop in tokens else len(tokens)

    # -- scoring ---------------------------------------------------------------------------
    @torch.no_grad()
    def score_options(self, requests: Sequence[AskRequest], options: Sequence[Sequence[str]], *,
                      batch_size: int | None = None, progress: bool = False) -> list[OptionScores]:
        """Log-likelihood of each option text as the assistant's answer to its request."""
        if len(options) != len(requests):
            raise PlvmError("score_options: one list of options per request")
        errors: dict[int, str] = {}
        scores: dict[int, tuple[list[float], list[int]]] = {}
        prepared = self._prepare_all(requests, errors)
        batch_size = batch_size or self.generation.batch_size
        bar = tqdm(total=len(prepared), desc="scoring", unit="q", disable=not progress)
        for batch in self._batches(prepared, batch_size):
            try:
                table = self._table([n for item in batch for n in item.names])
                rows, spans, owners, images, per_row = [], [], [], [], []
                for item in batch:
                    prompt_ids = self._encode_item(item, table)
                    for text in options[item.index]:
                        answer_ids = self.answer_ids(text, item.names, table)
                        rows.append(prompt_ids + answer_ids)
                        spans.append(len(answer_ids))
                        owners.append(item.index)
                        images.extend(item.images)
                        per_row.append(len(item.images))
                owner_names = {item.index: item.names for item in batch}
                logprobs = self._continuation_logprobs(rows, spans, images, table,
                                                       [owner_names[o] for o in owners], per_row)
                for index in dict.fromkeys(owners):
                    picked = [(lp, n) for lp, n, o in zip(logprobs, spans, owners) if o == index]
                    scores[index] = ([lp for lp, _ in picked], [n for _, n in picked])
            except (PlvmError, RuntimeError, ValueError) as error:
                for item in batch:
                    errors[item.index] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            bar.update(len(batch))
        bar.close()
        notes = {item.index: item.notes for item in prepared}
        return [OptionScores(request, *(scores.get(i) or (None, None)), error=errors.get(i),
                             notes=dict(notes.get(i, {})))
                for i, request in enumerate(requests)]

    def _continuation_logprobs(self, rows: list[list[int]], spans: list[int],
                               images: list[Image.Image], table: ConceptTable,
                               row_names: list[list[str]], per_row: list[int]) -> list[float]:
        """Sum of log p(last `span` tokens of each row | everything before), one forward."""
        input_ids, attention_mask = self._collate(rows)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if images:
            inputs.update(self.backbone.image_inputs(images, per_row))
        with table.active(self.backbone.model, rows=row_names):
            logits = self.backbone.model(**inputs).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        targets = input_ids[:, 1:]
        token_lp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        width = input_ids.shape[1]
        return [float(token_lp[i, width - 1 - span:].sum()) for i, span in enumerate(spans)]
