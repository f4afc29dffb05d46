"""Chat templates and `<name>` parsing: a question becomes a list of segments.

A segment is plain text or a `Slot`: the place of a concept's word (`<name>`) or of one of its
k context tokens. The concept table (table.py) gives each slot a virtual token id; text is
tokenized as it reads in the whole prompt (tokens.py), `<image>` expands to the model's image
slots.

With LLaVA-1.5's Vicuna-v1 template and two concepts the prompt reads

    A chat between a curious user and an artificial intelligence assistant. The assistant
    gives helpful, detailed, and polite answers to the user's questions. <a> is <a1>…<ak>.
    <b> is <b1>…<bk>. USER: <image>\\n{question} ASSISTANT:
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, Union

from .errors import PlvmError
from .tokens import RUNNING_TEXT, text_ids

NAME_RE = re.compile(r"<([A-Za-z0-9_-]+)>")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Slot:
    """A concept token: index -1 is the word `<name>`, 0..k-1 its context tokens."""

    name: str
    index: int = -1


Segment = Union[str, Slot]


@dataclass(frozen=True)
class ChatTemplate:
    """A Vicuna-style template. Other families subclass it and override `render`
    (plvmctl/families/); `answer_prefix` is what stands between the prompt and the answer's
    first word (" Yes" after "ASSISTANT:")."""

    name: str
    system: str
    user: str
    assistant: str
    answer_prefix: str = " "

    def render(self, question: list[Segment], preamble: list[Segment], has_image: bool | int) -> list[Segment]:
        """System text, concept sentences, then `USER: [<image>\\n]question ASSISTANT:`.

        `has_image` may be a count: that many `<image>` placeholders."""
        segments: list[Segment] = [self.system]
        segments += preamble
        segments.append(f" {self.user}: " + f"{IMAGE_PLACEHOLDER}\n" * int(has_image))
        segments += question
        segments.append(f" {self.assistant}:")
        return merge_text(segments)


VICUNA_V1 = ChatTemplate(
    name="vicuna_v1",
    system=(
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions."
    ),
    user="USER",
    assistant="ASSISTANT",
)
# The toy world's pocket model is trained on a short system line (its vocabulary is tiny).
POCKET = ChatTemplate(name="pocket", system="a chat.", user="user", assistant="assistant")
TEMPLATES = {template.name: template for template in (VICUNA_V1, POCKET)}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise PlvmError(f"unknown chat template {name!r} (known: {', '.join(TEMPLATES)})") from None


def mentioned_names(text: str) -> list[str]:
    """The `<name>`s in `text`, in order of first appearance, `<image>` excluded."""
    names: list[str] = []
    for match in NAME_RE.finditer(text):
        name = match.group(1)
        if name != "image" and name not in names:
            names.append(name)
    return names


def split_names(text: str, names: Iterable[str]) -> list[Segment]:
    """Cut `text` at every `<name>` of `names`; other angle-bracket words stay text."""
    wanted = set(names)
    segments: list[Segment] = []
    position = 0
    for match in NAME_RE.finditer(text):
        if match.group(1) not in wanted:
            continue
        if match.start() > position:
            segments.append(text[position:match.start()])
        segments.append(Slot(match.group(1)))
        position = match.end()
    if position < len(text):
        segments.append(text[position:])
    return segments


def merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, str) and merged and isinstance(merged[-1], str):
            merged[-1] = merged[-1] + segment
        elif not (isinstance(segment, str) and segment == ""):
            merged.append(segment)
    return merged


def concept_sentence(name: str, num_context: int) -> list[Segment]:
    """` <name> is <t1>…<tk>.`"""
    return [" ", Slot(name), " is ", *[Slot(name, i) for i in range(num_context)], "."]


def build_prompt(question: str, *, template: ChatTemplate, has_image: bool | int,
                 concepts: Mapping[str, int] | None = None,
                 descriptions: Mapping[str, str] | None = None,
                 literal_names: bool = False, also: Sequence[str] = (),
                 located: Mapping[str, str] | None = None) -> list[Segment]:
    """Segments for one question.

    `concepts` maps each known soft-prompt concept to its k; `descriptions` maps names to a
    plain-text description (the "LLaVA + text prompt" baseline). `has_image` may be a count
    of photos (several in one prompt). Every `<name>` in the
    question must be one of them unless `literal_names` (then unknown ones stay plain text,
    the "no personal information" baseline). Only concepts the question mentions get a
    sentence, in order of first mention; a concept with no context tokens (k = 0)
    gets none: it is only its word where the question names it. `also` names further concepts
    that get their sentence after those (the ones found in the photo by retrieval, `ask --auto`).
    `located` maps a concept to where it is in the photo ("on the left", found by its method's
    ask-time hook): ` <name> is on the left.` follows that concept's sentence.
    """
    located = located or {}
    concepts = concepts or {}
    descriptions = descriptions or {}
    names = mentioned_names(question)
    names += [name for name in dict.fromkeys(also) if name not in names]
    unknown = [n for n in names if n not in concepts and n not in descriptions]
    if unknown and not literal_names:
        known = sorted(set(concepts) | set(descriptions))
        listing = ", ".join(f"<{n}>" for n in known) if known else "none"
        raise PlvmError(f"unknown concept <{unknown[0]}> (known: {listing})")
    preamble: list[Segment] = []
    soft = [n for n in names if n in concepts]
    for name in names:
        if name in concepts:
            if concepts[name] > 0:
                preamble += concept_sentence(name, concepts[name])
            if name in located:
                preamble += [" ", Slot(name), f" is {located[name]}."]
        elif name in descriptions:
            preamble.append(f" <{name}> is {descriptions[name].strip().rstrip('.')}.")
    return template.render(split_names(question, soft), preamble, has_image)


def insert_after_image(ids: list[int], image_token_id: int, extra: list[int]) -> list[int]:
    """`ids` with `extra` right after the last image token: a concept recognised in the photo
    adds its visual tokens to the photo's, so the LM reads them between the image and the text."""
    if not extra:
        return list(ids)
    positions = [i for i, token in enumerate(ids) if token == image_token_id]
    if not positions:
        raise PlvmError("visual concept tokens need a photo in the prompt")
    end = positions[-1] + 1
    return list(ids[:end]) + list(extra) + list(ids[end:])


PROMPT_PIECES = ("natural", "per_piece")


def encode_segments(segments: list[Segment], tokenizer, *, slot_id: Callable[[Slot], int],
                    image_token_id: int, num_image_tokens: int | Sequence[int], add_bos: bool = True,
                    pieces: str = "natural") -> list[int]:
    """Token ids for `segments`, the one place a prompt or an answer becomes ids.

    The ids are those the tokenizer gives the whole text in one go with every slot an atomic
    token: each text piece is tokenized as it reads where it stands (tokens.py), the space
    before a slot belongs to the slot (as a word's space belongs to the word), slots get
    `slot_id`, each `<image>` becomes `num_image_tokens` copies of `image_token_id` (or, given a
    list, the i-th `<image>` that many: families whose slot count depends on the photo).
    `add_bos=False` means the segments continue a text already encoded (an answer after its
    prompt): their first piece is tokenized as running text, never as the start of one.

    `pieces="per_piece"` gives the ids of the published Aligner code instead (the `released` Aligner
    was trained on them): the text right after `<image>` and the text right after a concept
    word are each tokenized on their own (after the word, without its leading spaces), so a
    SentencePiece tokenizer puts a "▁" in front of them: "<sks>?" is `<sks> ▁?`, not `<sks> ?`.
    Everything else is as in natural text.
    """
    if pieces not in PROMPT_PIECES:
        raise PlvmError(f"prompt pieces must be one of {', '.join(PROMPT_PIECES)}, got {pieces!r}")
    per_piece = pieces == "per_piece"
    segments = merge_text(list(segments))
    ids: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        ids.append(tokenizer.bos_token_id)
    image_text = tokenizer.convert_ids_to_tokens(image_token_id)
    image_counts = None if isinstance(num_image_tokens, int) else iter(num_image_tokens)
    after: str | None = None if add_bos else RUNNING_TEXT  # what the next text piece follows
    alone = False  # per_piece: the next text piece is tokenized on its own
    for position, segment in enumerate(segments):
        if isinstance(segment, Slot):
            ids.append(slot_id(segment))
            after = RUNNING_TEXT
            alone = per_piece and segment.index == -1
            continue
        before_slot = position + 1 < len(segments) and isinstance(segments[position + 1], Slot)
        texts = segment.split(IMAGE_PLACEHOLDER)
        for number, piece in enumerate(texts):
            if number > 0:
                count = num_image_tokens if image_counts is None else next(image_counts, None)
                if count is None:
                    raise PlvmError("the prompt has more <image> placeholders than photos")
                ids.extend([image_token_id] * count)
                after = image_text or None
                alone = per_piece
            if before_slot and number == len(texts) - 1 and piece.endswith(" "):
                piece = piece[:-1]  # the slot's own space, as in " <name>"
            if alone:
                piece = piece.lstrip(" ")
                ids.extend(text_ids(tokenizer, piece))
            elif piece:
                ids.extend(text_ids(tokenizer, piece, after))
            if piece:
                after = RUNNING_TEXT
            alone = False
    return ids
