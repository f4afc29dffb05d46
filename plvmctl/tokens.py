"""Text and token ids in context: where plvmctl meets a tokenizer's spacing rules.

SentencePiece tokenizers (LLaMA-2, so LLaVA-1.5) keep a word's leading space inside its piece
("▁Yes" is " Yes"), and, depending on how they were loaded, put a "▁" in front of every text
they are handed on its own (the legacy normalizer that llava-hf ships) or only in front of the
first one (Metaspace, `prepend_scheme: first`). So a piece of a prompt tokenized alone is not
tokenized as it is inside the prompt: on its own " Yes" is [▁, ▁Yes] under the legacy
normalizer, "?" is "▁?"; in a sentence they are "▁Yes" and "?".

`text_ids` tokenizes a piece of text as it reads where it stands. The piece is tokenized
behind an anchor, a short text no token can span, and the anchor's ids are cut off again:

- `after=None`: the start of the text (right after BOS): the piece alone;
- `after=RUNNING_TEXT`: inside running text (after a concept word, or an answer after its
  prompt). The anchor is a newline: byte-fallback and word-level vocabularies merge it with
  nothing;
- `after="<image>"` (the image token's text): right behind the image, as the whole prompt
  would be cut there.

`decode_text` is the reverse for a run of ids that follows other text: it keeps the space the
first token carries (" in" after a name, "'s" without one). Word-level tokenizers (the tiny
and pocket models) give exactly the ids they gave piece by piece: they drop the newline.
"""

from __future__ import annotations

RUNNING_TEXT = "\n"
_SPACE_MARKERS = ("▁", "Ġ")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(tokenizer, text: str, after: str | None = None) -> list[int]:
    """Ids of `text` as the tokenizer gives them inside a longer text, behind `after`."""
    if after is None or not text:
        return _ids(tokenizer, text)
    anchor = _ids(tokenizer, after)
    together = _ids(tokenizer, after + text)
    if together[:len(anchor)] == anchor:
        return together[len(anchor):]
    return _ids(tokenizer, text)  # the anchor merged with the text: no context to borrow


def decode_text(tokenizer, ids: list[int], after_text: bool = False) -> str:
    """Ids → text. With `after_text` the run continues other text: its first token's leading
    space is kept (decoders drop it at the start of a text)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if not after_text or not ids:
        return text
    anchor = _ids(tokenizer, RUNNING_TEXT)
    if anchor:
        prefix = tokenizer.decode(anchor, skip_special_tokens=True)
        together = tokenizer.decode(anchor + list(ids), skip_special_tokens=True)
        if prefix and together.startswith(prefix):
            return together[len(prefix):]
    # no anchor to decode behind (word-level): a word or a marked piece starts with a space
    first = tokenizer.convert_ids_to_tokens(ids[0]) or ""
    bare = text.lstrip(" ")
    spaced = text.startswith(" ") or first.startswith(_SPACE_MARKERS) or bare[:1].isalnum()
    return (" " if spaced and bare else "") + bare


# A name is written right after these (and at the start); after anything else it gets a space.
_NO_SPACE_BEFORE_NAME = ("(", "[", "{", '"', "“", "/")


def join_name(text: str, name: str) -> str:
    """`text` followed by `<name>`, with the space natural text would have between them."""
    glue = "" if not text or text[-1].isspace() or text.endswith(_NO_SPACE_BEFORE_NAME) else " "
    return f"{text}{glue}<{name}>"


def decode_with_names(tokenizer, ids: list[int], name_for_id, *, vocab_size: int,
                      eos_token_id: int | None) -> str:
    """Generated ids → answer text, concept words (`name_for_id(id)` not None) as `<name>`.

    Stops at EOS; ids at or above `vocab_size` that are not concept words are dropped.
    """
    text = ""
    run: list[int] = []

    def flush() -> str:
        piece = decode_text(tokenizer, run, after_text=bool(text)) if run else ""
        run.clear()
        return piece

    for token in ids:
        if token == eos_token_id:
            break
        name = name_for_id(token)
        if name is not None:
            text = join_name(text + flush(), name)
        elif token < vocab_size:
            run.append(token)
    text += flush()
    return text.strip()
