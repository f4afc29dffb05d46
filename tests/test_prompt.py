"""Prompts: the Vicuna-v1 template with one `<name> is <ctx…>.` sentence per concept."""

from pathlib import Path

import pytest

from plvmctl.errors import PlvmError
from plvmctl.prompt import (POCKET, VICUNA_V1, Slot, build_prompt, encode_segments, mentioned_names,
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


# -- word-level tokenizers (tiny, pocket) keep exactly the ids they had piece by piece -----------

POCKET_BACKBONE = Path(__file__).resolve().parents[1] / "plvmctl" / "assets" / "pocket" / "backbone"


def _piece_by_piece(segments, tokenizer, *, slot_id, image_token_id, num_image_tokens, add_bos=True):
    """How segments became ids before ids were read in context: every text piece on its own.
    The pocket model was trained on these ids; word-level tokenizers must still get them."""
    ids = [tokenizer.bos_token_id] if add_bos else []
    for segment in segments:
        if isinstance(segment, Slot):
            ids.append(slot_id(segment))
            continue
        for number, piece in enumerate(segment.split("<image>")):
            if number > 0:
                ids.extend([image_token_id] * num_image_tokens)
            if piece:
                ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def _word_level_tokenizers():
    from transformers import AutoProcessor

    from plvmctl.tiny import TINY_WORDS

    yield "tiny", build_word_tokenizer(TINY_WORDS), VICUNA_V1
    if (POCKET_BACKBONE / "tokenizer.json").is_file():
        yield "pocket", AutoProcessor.from_pretrained(POCKET_BACKBONE).tokenizer, POCKET


WORD_LEVEL_QUESTIONS = [
    ("is <avril> in this photo?", True),
    ("<avril> and <bob>: who is on the left?", True),
    ("what color is the hair of <bob>", False),
    ("is <avril>'s shirt (left) red? answer yes or no.", True),
    ("describe the face of <avril>.\nbe brief", False),
]
WORD_LEVEL_ANSWERS = ["yes", "no", "left hair red blue different mismatch.", "<avril>'s hat is red.",
                      "a", "(<bob>)", "<avril> and <bob>"]


@pytest.mark.parametrize("question, has_image", WORD_LEVEL_QUESTIONS)
def test_word_level_prompts_answers_and_options_keep_their_ids(question, has_image):
    slot_id = {"avril": 900, "bob": 950}

    def slot(s):
        return slot_id[s.name] + 1 + s.index

    for label, tokenizer, template in _word_level_tokenizers():
        segments = build_prompt(question, template=template, has_image=has_image,
                                concepts={"avril": 16, "bob": 16})
        kwargs = dict(slot_id=slot, image_token_id=IMAGE_ID, num_image_tokens=3)
        assert encode_segments(segments, tokenizer, **kwargs) == \
            _piece_by_piece(segments, tokenizer, **kwargs), label
        assert encode_segments(segments, tokenizer, pieces="per_piece", **kwargs) == \
            _piece_by_piece(segments, tokenizer, **kwargs), label
        for answer in WORD_LEVEL_ANSWERS:
            answer_segments = split_names(" " + answer, ["avril", "bob"])
            assert encode_segments(answer_segments, tokenizer, add_bos=False, **kwargs) == \
                _piece_by_piece(answer_segments, tokenizer, add_bos=False, **kwargs), (label, answer)


def test_both_word_level_tokenizers_are_checked():
    assert [label for label, _, _ in _word_level_tokenizers()] == ["tiny", "pocket"]


def test_an_unknown_way_of_cutting_pieces_is_refused():
    tokenizer = build_word_tokenizer(["is"])
    with pytest.raises(PlvmError, match="per_piece"):
        encode_segments(["is"], tokenizer, slot_id=lambda slot: 0, image_token_id=IMAGE_ID,
                        num_image_tokens=1, pieces="sentencepiece")
