"""Prompts: the Vicuna-v1 template with one `<name> is <ctx…>.` sentence per concept."""

import pytest

from plvmctl.errors import PlvmError
from plvmctl.prompt import (VICUNA_V1, Slot, build_prompt, encode_segments, mentioned_names,
                            split_names)
from plvmctl.tiny import IMAGE_ID, build_word_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def _render(segments) -> str:
    """Write slots the way the paper writes them: <sks> and <sks_1>…"""
    return "".join(s if isinstance(s, str) else (f"<{s.name}>" if s.index < 0 else f"<{s.name}_{s.index + 1}>")
                   for s in segments)


def test_single_concept_prompt_matches_the_paper():
    segments = build_prompt("Is <sks> in this photo?", template=VICUNA_V1, has_image=True, concepts={"sks": 3})
    assert _render(segments) == (
        f"{SYSTEM} <sks> is <sks_1><sks_2><sks_3>. USER: <image>\nIs <sks> in this photo? ASSISTANT:"
    )


def test_one_sentence_per_mentioned_concept_in_order_of_mention():
    segments = build_prompt("Is <b> next to <a>? And <b>?", template=VICUNA_V1, has_image=False,
                            concepts={"a": 1, "b": 2, "c": 1})
    assert _render(segments) == (
        f"{SYSTEM} <b> is <b_1><b_2>. <a> is <a_1>. USER: Is <b> next to <a>? And <b>? ASSISTANT:"
    )


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(PlvmError, match=r"unknown concept <zoe> \(known: <avril>, <bob>\)"):
        build_prompt("Where is <zoe>?", template=VICUNA_V1, has_image=True, concepts={"avril": 1, "bob": 1})


def test_literal_names_and_descriptions():
    none = build_prompt("Is <zoe> here?", template=VICUNA_V1, has_image=False, literal_names=True)
    assert _render(none) == f"{SYSTEM} USER: Is <zoe> here? ASSISTANT:"
    text = build_prompt("Is <zoe> here?", template=VICUNA_V1, has_image=False,
                        descriptions={"zoe": "a woman with red hair."})
    assert _render(text) == f"{SYSTEM} <zoe> is a woman with red hair. USER: Is <zoe> here? ASSISTANT:"


def test_name_parsing_ignores_the_image_placeholder():
    assert mentioned_names("<image>\n<b> and <a> and <b>") == ["b", "a"]
    assert split_names("<a> met <x>.", ["a"]) == [Slot("a"), " met <x>."]


def test_encoding_expands_image_and_places_slots():
    tokenizer = build_word_tokenizer(["is", "red", "photo"])
    ids = encode_segments(["photo <image>\n", Slot("a"), " is red"], tokenizer,
                          slot_id=lambda slot: 1000, image_token_id=IMAGE_ID, num_image_tokens=3)
    photo, is_, red = tokenizer.convert_tokens_to_ids(["photo", "is", "red"])
    # the word-level tokenizer treats the newline as whitespace
    assert ids == [tokenizer.bos_token_id, photo, IMAGE_ID, IMAGE_ID, IMAGE_ID, 1000, is_, red]
