"""LLaVA-1.5's real tokenizer gets the ids the whole text would get, with concepts as words.

A tiny LLaVA with LLaVA-1.5's vocabulary (32,064 rows, `<image>` 32000, `<pad>` 32001, 576
image slots) is saved beside a real LLaMA-2 tokenizer and loaded the way every LLaVA backbone
is loaded (`load_backbone`). Two tokenizer folders: `llama2-legacy` keeps the legacy normalizer
(a "▁" before every text it is handed on its own, as llava-hf ships it), `llama2-metaspace`
prepends one only at the start of the text. Both must give the ids the tokenizer gives the
whole prompt in one go, each concept slot an atomic token that owns the space before it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from conftest import SHARED
from plvmctl.families import load_backbone
from plvmctl.concept import Concept
from plvmctl.engine import AskRequest, Engine
from plvmctl.prompt import VICUNA_V1, Slot, build_prompt, encode_segments, mentioned_names, split_names
from plvmctl.recipe import recipe_from_dict
from plvmctl.runtime import Runtime
from plvmctl.table import ConceptTable
from plvmctl.train.batches import encode_batch, first_token_id
from plvmctl.train.data import Sample

FIXTURES = SHARED / "fixtures" / "tokenizers"
FOLDERS = ["llama2-legacy", "llama2-metaspace"]
VOCAB_ROWS, IMAGE_ID, PAD_ID, IMAGE_SLOTS = 32064, 32000, 32001, 576
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")


def _llava_folder(folder: Path, tokenizer_folder: Path) -> Path:
    """A random tiny LLaVA with LLaVA-1.5's vocabulary and image slots, plus the tokenizer."""
    folder.mkdir(parents=True)
    for file in tokenizer_folder.iterdir():
        shutil.copyfile(file, folder / file.name)
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    processor.update(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    text = LlamaConfig(vocab_size=VOCAB_ROWS, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, bos_token_id=1, eos_token_id=2,
                       pad_token_id=PAD_ID, tie_word_embeddings=False)
    vision = CLIPVisionConfig(image_size=48, patch_size=2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=4, projection_dim=32)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         image_seq_length=IMAGE_SLOTS, pad_token_id=PAD_ID, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=FOLDERS)
def backbone(request, tmp_path_factory):
    source = FIXTURES / request.param
    if not (source / "tokenizer.json").is_file():
        pytest.skip(f"the LLaMA-2 tokenizer fixture is not here: {source}")
    folder = _llava_folder(tmp_path_factory.mktemp("llava") / request.param, source)
    loaded = load_backbone(str(folder), device="cpu")
    loaded.folder = request.param
    assert loaded.vocab_size == VOCAB_ROWS and loaded.num_image_tokens == IMAGE_SLOTS
    return loaded


def _concept(name: str, k: int) -> Concept:
    return Concept(name, torch.zeros(32), torch.zeros(32), torch.zeros(k, 32))


def _table(concepts: dict[str, int]) -> ConceptTable:
    """Virtual ids for `concepts` (name → k); the same dict always gives the same ids."""
    return ConceptTable([_concept(name, k) for name, k in concepts.items()], VOCAB_ROWS)


def _slots(concepts: dict[str, int], name: str) -> list[int]:
    """The ids of `<name>` and its k context tokens."""
    table = _table(concepts)
    return [table.word_id(name)] + [table.slot_id(Slot(name, i)) for i in range(concepts[name])]


def _prompt(backbone, question: str, concepts: dict[str, int], has_image: bool) -> list[int]:
    segments = build_prompt(question, template=VICUNA_V1, has_image=has_image, concepts=concepts)
    return encode_segments(segments, backbone.tokenizer, slot_id=_table(concepts).slot_id,
                           image_token_id=IMAGE_ID, num_image_tokens=IMAGE_SLOTS)


def _answer(backbone, text: str, concepts: dict[str, int]) -> list[int]:
    return encode_segments(split_names(" " + text, list(concepts)), backbone.tokenizer,
                           slot_id=_table(concepts).slot_id, image_token_id=IMAGE_ID,
                           num_image_tokens=IMAGE_SLOTS, add_bos=False)


def _pieces(backbone, *pieces) -> list[int]:
    """Ids of SentencePiece pieces written out ("▁is", "?"); ints pass through."""
    ids = []
    for piece in pieces:
        if isinstance(piece, int):
            ids.append(piece)
        else:
            [found] = backbone.tokenizer.convert_tokens_to_ids([piece])
            assert found != backbone.tokenizer.unk_token_id, piece
            ids.append(found)
    return ids


def _whole(backbone, text: str) -> list[int]:
    """The tokenizer on the whole text at once, `<image>` expanded to its slots."""
    ids = backbone.tokenizer(text)["input_ids"]
    out = []
    for token in ids:
        out.extend([IMAGE_ID] * IMAGE_SLOTS if token == IMAGE_ID else [token])
    return out


def _system(backbone) -> list[int]:
    return backbone.tokenizer(SYSTEM)["input_ids"]  # BOS + the system sentence


def _after_image(backbone) -> list[int]:
    """The ids of "\\n" right after `<image>`: "▁" + newline under the legacy normalizer."""
    return backbone.tokenizer("<image>\n", add_special_tokens=False)["input_ids"][1:]


ASSISTANT = ("▁A", "SS", "IST", "ANT", ":")


# -- prompts ----------------------------------------------------------------------------------


def test_the_fixture_loads_as_its_folder_says(backbone):
    lone_yes = backbone.tokenizer(" Yes", add_special_tokens=False)["input_ids"]
    assert lone_yes == ([29871, 3869] if backbone.folder == "llama2-legacy" else [3869])


@pytest.mark.parametrize("question, has_image", [
    ("Is the man in this photo smiling?", True),
    ("What color is her hair?", False),
    ("Describe the photo.\nBe brief.", True),
])
def test_prompts_without_concepts_are_the_tokenizers_own_ids(backbone, question, has_image):
    ids = _prompt(backbone, question, {}, has_image)
    image = "<image>\n" if has_image else ""
    assert ids == _whole(backbone, f"{SYSTEM} USER: {image}{question} ASSISTANT:")


def test_one_concept_prompt_matches_the_paper_token_for_token(backbone):
    concepts = {"avril": 16}
    avril, *context = _slots(concepts, "avril")
    ids = _prompt(backbone, "Is <avril> in this photo?", concepts, has_image=True)
    expected = (_system(backbone) + [avril] + _pieces(backbone, "▁is") + context + _pieces(backbone, ".")
                + _pieces(backbone, "▁US", "ER", ":", "▁") + [IMAGE_ID] * IMAGE_SLOTS + _after_image(backbone)
                + _pieces(backbone, "Is", avril, "▁in", "▁this", "▁photo", "?", *ASSISTANT))
    assert ids == expected


def test_two_concepts_text_only_names_first_and_last(backbone):
    concepts = {"avril": 2, "bob": 1}
    a, a1, a2 = _slots(concepts, "avril")
    b, b1 = _slots(concepts, "bob")
    ids = _prompt(backbone, "<avril> is next to <bob>", concepts, has_image=False)
    expected = (_system(backbone) + _pieces(backbone, a, "▁is", a1, a2, ".", b, "▁is", b1, ".",
                                            "▁US", "ER", ":", a, "▁is", "▁next", "▁to", b, *ASSISTANT))
    assert ids == expected


@pytest.mark.parametrize("question, tail", [
    ("Where is <avril>'s hat?", ("▁Where", "▁is", "A", "'", "s", "▁hat", "?")),
    ("Is it (<avril>)?", ("▁Is", "▁it", "▁(", "A", ")?")),
    ("Is this <avril>.", ("▁Is", "▁this", "A", ".")),
    ("<avril>, <avril> and <avril>!", ("A", ",", "A", "▁and", "A", "!")),
])
def test_possessives_and_punctuation_after_a_name_read_as_in_natural_text(backbone, question, tail):
    avril = _slots({"avril": 1}, "avril")[0]
    ids = _prompt(backbone, question, {"avril": 1}, has_image=False)
    question_ids = _pieces(backbone, *[avril if piece == "A" else piece for piece in tail], *ASSISTANT)
    assert ids[-len(question_ids):] == question_ids
    assert ids[len(ids) - len(question_ids) - 3:len(ids) - len(question_ids)] == _pieces(backbone, "▁US", "ER", ":")


STAND_IN = "7"  # a digit: one piece that no merge rule touches, so it tokenizes like a slot


def _natural(backbone, text_with_stand_ins: str, slot_ids: list[int]) -> list[int]:
    """The whole text tokenized at once, each stand-in (with the "▁" of the space before it)
    replaced by the next slot id: what "a slot is an atomic word" means."""
    ids = _whole(backbone, text_with_stand_ins)
    stand_in = backbone.tokenizer.convert_tokens_to_ids(STAND_IN)
    out, slots = [], iter(slot_ids)
    for token in ids:
        if token == stand_in:
            if out and out[-1] == 29871:
                out.pop()
            out.append(next(slots))
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("question, has_image", [
    ("Is <a> in this photo?", True),
    ("<a> and <b>: who is taller?", True),
    ("Who is standing next to <b>", False),
    ("Is <a>'s shirt (left) the same as <b>'s?", True),
    ("Describe <a>.\nThen <b>.", False),
    ("Where is <a>?\nA. left\nB. right\nAnswer with the option's letter from the given choices directly.", True),
])
def test_every_prompt_is_the_whole_text_tokenized_at_once(backbone, question, has_image):
    concepts = {"a": 3, "b": 2}
    ids = _prompt(backbone, question, concepts, has_image)
    names = mentioned_names(question)
    preamble = "".join(f" {STAND_IN} is {STAND_IN * concepts[n]}." for n in names)
    slot_ids = [i for name in names for i in _slots(concepts, name)]
    slot_ids += [_slots(concepts, piece.name)[0] for piece in split_names(question, names)
                 if isinstance(piece, Slot)]
    for name in names:
        question = question.replace(f"<{name}>", STAND_IN)
    image = "<image>\n" if has_image else ""
    text = f"{SYSTEM}{preamble} USER: {image}{question} ASSISTANT:"
    assert ids == _natural(backbone, text, slot_ids)


# -- answers and options ------------------------------------------------------------------------


def test_yes_no_and_option_letters_are_the_words_not_a_bare_space(backbone):
    assert first_token_id(backbone, " Yes") == 3869
    assert first_token_id(backbone, " No") == 1939
    concepts = {"avril": 2}
    assert _answer(backbone, "A", concepts) == [319]
    assert _answer(backbone, "Yes, <avril> is here.", concepts) == _pieces(
        backbone, "▁Yes", ",", _slots(concepts, "avril")[0], "▁is", "▁here", ".")


def test_answers_continue_the_prompt_as_one_text(backbone):
    concepts = {"avril": 2}
    prompt = _prompt(backbone, "What is this?", concepts, has_image=False)
    for answer in ("Yes", "No", "A. red hair", "It's red.\nB"):
        assert prompt + _answer(backbone, answer, concepts) == _whole(
            backbone, f"{SYSTEM} USER: What is this? ASSISTANT: {answer}")


def test_the_yes_no_weight_lands_on_the_verdict_word(backbone):
    samples = [Sample("avril", "positive", "Is <avril> in this photo?", "Yes", None),
               Sample("avril", "negative", "Is <avril> in this photo?", "No", None),
               Sample("avril", "negative", "Is <avril> in this photo?", "No", None,
                      reasoning="left hair red blue different")]
    batch = encode_batch(samples, backbone, VICUNA_V1, 16, yes_no_weight=20.0)
    weighted = [batch.labels[row][batch.weights[row] == 20.0].tolist() for row in range(3)]
    assert weighted == [[3869], [1939], [1939]]
    answer = batch.labels[2][batch.labels[2] >= 0].tolist()
    assert answer[:2] == _pieces(backbone, "▁left", "▁hair")
    assert answer[-3:] == [29889, 1939, 2]  # "." of the reasoning, "▁No", EOS


def _engine(backbone, concepts: dict[str, int]) -> Engine:
    runtime = Runtime(recipe=recipe_from_dict({}), backbone=backbone)
    return Engine(runtime, {name: _concept(name, k) for name, k in concepts.items()})


def test_option_scores_use_the_letter_ids(backbone):
    engine = _engine(backbone, {"avril": 2})
    table = _table({"avril": 2})
    assert [engine.answer_ids(letter, ["avril"], table) for letter in "ABC"] == [[319], [350], [315]]
    [scores] = engine.score_options([AskRequest("Is <avril> left or right? A or B?")], [["A", "B"]])
    assert scores.error is None and scores.num_tokens == [1, 1]


# -- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    "<avril>'s hat is red.",
    "This is <avril>.",
    "I see (<avril>) on the left.",
    "<a> and <b> are here.",
    "Yes.\n<avril> is smiling.\n\nAnd <b>?",
    "\"<a>\" said <b>: hi",
])
def test_names_come_back_with_natural_spacing(backbone, answer):
    concepts = {"avril": 1, "a": 1, "b": 1}
    table = _table(concepts)
    ids = _answer(backbone, answer, concepts) + [backbone.eos_token_id, 319]
    assert _engine(backbone, concepts).decode(ids, table) == answer


# -- the released Aligner's prompts: the authors' piece-by-piece ids ---------------------------


def _released_prompt(backbone, question: str, concepts: dict[str, int]) -> list[int]:
    segments = build_prompt(question, template=VICUNA_V1, has_image=True, concepts=concepts)
    return encode_segments(segments, backbone.tokenizer, slot_id=_table(concepts).slot_id,
                           image_token_id=IMAGE_ID, num_image_tokens=IMAGE_SLOTS, pieces="per_piece")


@pytest.mark.parametrize("question, tail", [
    # the authors' code: "\nIs" after <image> on its own, then "in this photo? ASSISTANT:" on its own
    ("Is <avril> in this photo?", ("Is", "A", "▁in", "▁this", "▁photo", "?")),
    # "? ASSISTANT:" on its own: a "▁?" where natural text has "?"
    ("Where is <avril>?", ("Where", "▁is", "A", "▁?")),
    ("What is <avril>'s shirt?", ("What", "▁is", "A", "▁'", "s", "▁sh", "irt", "?")),
])
def test_per_piece_prompts_are_the_ids_of_the_authors_code(backbone, question, tail):
    concepts = {"avril": 16}
    avril, *context = _slots(concepts, "avril")
    ids = _released_prompt(backbone, question, concepts)
    expected = (_system(backbone) + [avril] + _pieces(backbone, "▁is") + context + _pieces(backbone, ".")
                + _pieces(backbone, "▁US", "ER", ":", "▁") + [IMAGE_ID] * IMAGE_SLOTS
                + _pieces(backbone, "▁", "<0x0A>", *[avril if p == "A" else p for p in tail], *ASSISTANT))
    assert ids == expected


def test_per_piece_changes_nothing_for_a_prompt_without_concepts_on_the_legacy_tokenizer(backbone):
    if backbone.folder != "llama2-legacy":
        pytest.skip("under Metaspace the natural text after <image> has no '▁'; per_piece adds it")
    question = "Is the man in this photo smiling?"
    assert _released_prompt(backbone, question, {}) == _prompt(backbone, question, {}, has_image=True)


def test_the_llava15_recipe_asks_for_the_authors_ids():
    from plvmctl.recipe import load_recipe

    assert load_recipe("llava15-7b").model.prompt_pieces == "per_piece"
    assert load_recipe("pocket").model.prompt_pieces == "natural"
