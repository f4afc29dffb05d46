"""LLaVA-OneVision behind the Backbone interface: its own template, anyres slots, same concept table.

A tiny LLaVA-OneVision (SigLIP tower 16 px / patch 4, Qwen2 LM hidden 16, one layer each) is
built from configs and saved as a hub folder with the real Qwen2-family byte-level BPE
tokenizer (`../shared/fixtures/tokenizers/qwen3`): its regular vocabulary plus `<|endoftext|>`,
`<|im_start|>`, `<|im_end|>` (151643-151645), then OneVision's `<image>` 151646 and `<video>`
151647 added as transformers' OneVision conversion adds them (Qwen3's own added tokens from
151646 on are dropped), and llava-hf's OneVision chat template. The output head has 151,680
rows (padded to a multiple of 64), so concept ids start there. It loads through
`load_backbone`, exactly as `llava-hf/llava-onevision-qwen2-7b-ov-hf` would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import SHARED
from helpers import copied_concept
from plvmctl.backbone import save_backbone
from plvmctl.families import load_backbone
from plvmctl.concept import Concept
from plvmctl.engine import AskRequest, Engine
from plvmctl.errors import PlvmError
from plvmctl.families.onevision import ONEVISION_CHAT_TEMPLATE, OneVisionBackbone, ProcessorChatTemplate
from plvmctl.prompt import Slot, build_prompt, encode_segments, mentioned_names, split_names
from plvmctl.recipe import recipe_from_dict
from plvmctl.runtime import Runtime
from plvmctl.table import ConceptTable
from plvmctl.train.batches import encode_batch, first_token_id
from plvmctl.train.data import Sample

QWEN = SHARED / "fixtures" / "tokenizers" / "qwen3"
VOCAB_ROWS, IMAGE_ID, VIDEO_ID = 151680, 151646, 151647
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32], [16, 48], [48, 16]]
SYSTEM = "You are a helpful assistant."


def _onevision_folder(folder: Path) -> Path:
    """A random tiny LLaVA-OneVision saved the way llava-hf ships the real one."""
    from transformers import (AddedToken, AutoTokenizer, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                              Qwen2Config, SiglipVisionConfig)

    folder.mkdir(parents=True)
    tokenizer_json = json.loads((QWEN / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer_json["added_tokens"] = [t for t in tokenizer_json["added_tokens"] if t["id"] < IMAGE_ID]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 32768,
    }), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False),
                          AddedToken("<video>", special=True, normalized=False)], special_tokens=True)
    tokenizer.save_pretrained(folder)
    LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16},
                                    image_grid_pinpoints=PINPOINTS).save_pretrained(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": ONEVISION_CHAT_TEMPLATE}))
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": 16,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9"}))
    text = Qwen2Config(vocab_size=VOCAB_ROWS, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                       eos_token_id=IM_END, pad_token_id=ENDOFTEXT, tie_word_embeddings=False)
    vision = SiglipVisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=2, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_ID,
                                  video_token_index=VIDEO_ID, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=PINPOINTS,
                                  vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlavaOnevisionForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    if not (QWEN / "tokenizer.json").is_file():
        pytest.skip(f"the Qwen2-family tokenizer fixture is not here: {QWEN}")
    return _onevision_folder(tmp_path_factory.mktemp("onevision") / "tiny-ov")


@pytest.fixture(scope="module")
def backbone(folder):
    return load_backbone(str(folder), device="cpu")


def test_image_preprocess_is_refused_because_anyres_ignores_it(folder):
    """OneVision's processor tiles photos itself: `model.image_preprocess` would change
    nothing, so setting it is an error, not a silent no-op."""
    for value in ("pad", "crop"):
        with pytest.raises(PlvmError, match=rf"^model.image_preprocess={value}: llava-onevision ignores it"):
            load_backbone(str(folder), device="cpu", image_preprocess=value)


@pytest.fixture(scope="module")
def runtime(backbone):
    return Runtime(recipe=recipe_from_dict({"generation": {"max_new_tokens": 6}}), backbone=backbone)


def _concept(backbone, name: str, k: int, seed: int) -> Concept:
    generator = torch.Generator().manual_seed(seed)
    hidden = backbone.hidden_size
    return Concept(name, torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator),
                   torch.randn(k, hidden, generator=generator))


def _table(concepts: dict[str, int]) -> ConceptTable:
    return ConceptTable([Concept(n, torch.zeros(16), torch.zeros(16), torch.zeros(k, 16))
                         for n, k in concepts.items()], VOCAB_ROWS)


def _slots(concepts: dict[str, int], name: str) -> list[int]:
    table = _table(concepts)
    return [table.word_id(name)] + [table.slot_id(Slot(name, i)) for i in range(concepts[name])]


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(backbone, question: str, concepts: dict[str, int], images: list[Image.Image]) -> list[int]:
    template = backbone.chat_template()
    segments = build_prompt(question, template=template, has_image=len(images), concepts=concepts)
    counts = backbone.image_token_counts(images, [len(images)])
    return encode_segments(segments, backbone.tokenizer, slot_id=_table(concepts).slot_id,
                           image_token_id=IMAGE_ID, num_image_tokens=counts)


def _rendered(backbone, system: str, question: str, num_images: int) -> str:
    """transformers' own rendering of the processor's chat template (apply_chat_template)."""
    messages = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]
    return backbone.tokenizer.apply_chat_template(messages, chat_template=backbone.chat_template().jinja,
                                                  add_generation_prompt=True, tokenize=False)


def _whole(backbone, text: str, counts: list[int]) -> list[int]:
    """The tokenizer on the whole text at once, the i-th `<image>` expanded to counts[i] slots."""
    out, remaining = [], iter(counts)
    for token in backbone.tokenizer(text, add_special_tokens=False)["input_ids"]:
        out.extend([IMAGE_ID] * next(remaining) if token == IMAGE_ID else [token])
    return out


def _ids(backbone, *pieces: str) -> list[int]:
    ids = backbone.tokenizer.convert_tokens_to_ids(list(pieces))
    assert None not in ids, pieces
    return ids


# -- the family ---------------------------------------------------------------------------------


def test_the_family_comes_from_model_type_and_the_template_from_the_processor(backbone, runtime):
    assert type(backbone) is OneVisionBackbone and backbone.multi_image
    assert backbone.vocab_size == VOCAB_ROWS and backbone.image_token_id == IMAGE_ID
    assert backbone.eos_token_id == IM_END and backbone.pad_token_id == ENDOFTEXT
    assert backbone.tokenizer.bos_token_id is None
    assert isinstance(runtime.template, ProcessorChatTemplate)
    assert runtime.template.jinja == ONEVISION_CHAT_TEMPLATE and runtime.template.answer_prefix == ""


@pytest.mark.parametrize("size", [(16, 16), (40, 20), (20, 40), (100, 30), (7, 50), (64, 64), (33, 17)])
def test_anyres_slot_counts_are_the_models_own_feature_counts(backbone, size):
    photo = _photo(*size)
    [features] = backbone.image_features([photo])
    assert backbone.image_token_counts([photo]) == [features.shape[0]]
    # several photos in one prompt: the base view and a newline each
    assert backbone.image_token_counts([photo, photo], [2]) == [17, 17]


def test_folder_round_trip_keeps_model_and_template(backbone, tmp_path):
    loaded = load_backbone(str(save_backbone(backbone, tmp_path / "copy")), device="cpu")
    assert type(loaded) is OneVisionBackbone and loaded.fingerprint == backbone.fingerprint
    assert loaded.chat_template() == backbone.chat_template()


# -- prompts: the ids apply_chat_template + the tokenizer give --------------------------------------


@pytest.mark.parametrize("question, size", [("Is the man in this photo smiling?", (40, 20)),
                                            ("What color is her hair?", None),
                                            ("Describe the photo.\nBe brief.", (20, 40))])
def test_prompts_without_concepts_are_apply_chat_templates_ids(backbone, question, size):
    images = [_photo(*size)] if size else []
    ids = _prompt(backbone, question, {}, images)
    expected = _whole(backbone, _rendered(backbone, SYSTEM, question, len(images)),
                      backbone.image_token_counts(images))
    assert ids == expected
    assert ids[:3] == [IM_START] + _ids(backbone, "system", "ĠĊ")  # llava-hf's "<|im_start|>system \n"


def test_one_concept_prompt_token_for_token(backbone):
    concepts = {"avril": 16}
    avril, *context = _slots(concepts, "avril")
    photo = _photo(40, 20)
    [slots] = backbone.image_token_counts([photo])
    ids = _prompt(backbone, "Is <avril> in this photo?", concepts, [photo])
    expected = ([IM_START] + _ids(backbone, "system", "ĠĊ", "You", "Ġare", "Ġa", "Ġhelpful", "Ġassistant", ".")
                + [avril] + _ids(backbone, "Ġis") + context + _ids(backbone, ".") + [IM_END]
                + [IM_START] + _ids(backbone, "user", "Ġ") + [IMAGE_ID] * slots
                + _ids(backbone, "Ċ", "Is") + [avril] + _ids(backbone, "Ġin", "Ġthis", "Ġphoto", "?")
                + [IM_END, IM_START] + _ids(backbone, "assistant", "Ċ"))
    assert ids == expected
    # the base view, then the best grid (two 16 px crops side by side: 4 x 8 patches, nothing
    # to unpad at this aspect ratio) with a newline slot after each of its 4 rows
    assert slots == 16 + 4 * 8 + 4


STAND_IN = "7"  # Qwen2 splits digits one by one: a one-token word that merges with nothing


def _natural(backbone, text: str, slot_ids: list[int], counts: list[int]) -> list[int]:
    """The whole text at once, each stand-in (with the space token before it) a slot id."""
    space, stand_in = _ids(backbone, "Ġ", STAND_IN)
    out, slots = [], iter(slot_ids)
    for token in _whole(backbone, text, counts):
        if token == stand_in:
            if out and out[-1] == space:
                out.pop()
            out.append(next(slots))
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("question, size", [
    ("Is <a> in this photo?", (30, 50)),
    ("<a> and <b>: who is taller?", (64, 20)),
    ("Who is standing next to <b>", None),
    ("Is <a>'s shirt (left) the same as <b>'s?", (16, 16)),
    ("Describe <a>.\nThen <b>.", None),
    ("Where is <a>?\nA. left\nB. right\nAnswer with the option's letter from the given choices directly.", (50, 50)),
])
def test_prompts_with_one_or_two_concepts_are_the_whole_text_at_once(backbone, question, size):
    concepts = {"a": 3, "b": 2}
    images = [_photo(*size)] if size else []
    ids = _prompt(backbone, question, concepts, images)
    names = mentioned_names(question)
    preamble = "".join(f" {STAND_IN} is {STAND_IN * concepts[n]}." for n in names)
    slot_ids = [i for name in names for i in _slots(concepts, name)]
    slot_ids += [_slots(concepts, piece.name)[0] for piece in split_names(question, names) if isinstance(piece, Slot)]
    for name in names:
        question = question.replace(f"<{name}>", STAND_IN)
    text = _rendered(backbone, SYSTEM + preamble, question, len(images))
    assert ids == _natural(backbone, text, slot_ids, backbone.image_token_counts(images))


# -- answers: in context, right after "<|im_start|>assistant\n" -----------------------------------


def test_answers_continue_the_prompt_as_one_text(backbone, runtime):
    engine = Engine(runtime, {"avril": _concept(backbone, "avril", 2, 0)})
    table = engine._table(["avril"])
    prompt = _prompt(backbone, "What is this?", {"avril": 2}, [])
    for answer in ("Yes", "No", "A. red hair", "It's red.\nB"):
        assert prompt + engine.answer_ids(answer, ["avril"], table) == _whole(
            backbone, _rendered(backbone, SYSTEM, "What is this?", 0) + answer, [])
    assert engine.answer_ids("Yes, <avril> is here.", ["avril"], table) == (
        _ids(backbone, "Yes", ",") + [table.word_id("avril")] + _ids(backbone, "Ġis", "Ġhere", "."))
    yes = first_token_id(backbone, runtime.template.answer_prefix + "Yes")
    assert yes == _ids(backbone, "Yes")[0] != _ids(backbone, "ĠYes")[0]


def test_the_yes_no_weight_lands_on_the_verdict_word(backbone, runtime, tmp_path):
    photo = tmp_path / "q.png"
    _photo(40, 20).save(photo)
    samples = [Sample("avril", "positive", "Is <avril> in this photo?", "Yes", photo),
               Sample("avril", "negative", "Is <avril> in this photo?", "No", None)]
    batch = encode_batch(samples, backbone, runtime.template, 4, yes_no_weight=20.0)
    weighted = [batch.labels[row][batch.weights[row] == 20.0].tolist() for row in range(2)]
    assert weighted == [_ids(backbone, "Yes"), _ids(backbone, "No")]
    assert batch.labels[0][batch.labels[0] >= 0].tolist() == _ids(backbone, "Yes") + [IM_END]
    assert int((batch.input_ids[0] == IMAGE_ID).sum()) == backbone.image_token_counts([_photo(40, 20)])[0]


@pytest.mark.parametrize("answer", ["<avril>'s hat is red.", "This is <avril>.", "I see (<avril>) on the left.",
                                    "Yes.\n<avril> is smiling.\n\nAnd <b>?"])
def test_names_decode_with_natural_spacing(backbone, runtime, answer):
    concepts = {"avril": _concept(backbone, "avril", 1, 0), "b": _concept(backbone, "b", 1, 1)}
    engine = Engine(runtime, concepts)
    table = engine._table(["avril", "b"])
    ids = engine.answer_ids(answer, ["avril", "b"], table) + [IM_END, 9707]
    assert engine.decode(ids, table) == answer


# -- the concept table works unchanged ------------------------------------------------------------


def test_copied_concept_gives_bit_identical_logits(backbone):
    token = _ids(backbone, "Ġperson")[0]
    k = 3
    concept = copied_concept(backbone, "twin", token, k=k)
    table = ConceptTable([concept], backbone.vocab_size)
    photo = _photo(40, 20)
    virtual = _prompt(backbone, "Is <twin> here?", {"twin": k}, [photo])
    plain = [token if i >= VOCAB_ROWS else i for i in virtual]
    inputs = backbone.image_inputs([photo])
    with torch.no_grad():
        reference = backbone.model(input_ids=torch.tensor([plain]), **inputs).logits
        with table.active(backbone.model):
            personal = backbone.model(input_ids=torch.tensor([virtual]), **inputs).logits
    assert personal.shape[-1] == table.total_ids == VOCAB_ROWS + 1 + k
    assert torch.equal(personal[..., :VOCAB_ROWS], reference)
    assert torch.allclose(personal[..., VOCAB_ROWS], reference[..., token], rtol=0, atol=1e-6)


def _requests(tmp_path) -> list[AskRequest]:
    sizes = [(40, 20), (16, 16), (20, 64), (50, 30)]
    paths = []
    for i, size in enumerate(sizes):
        paths.append(tmp_path / f"p{i}.png")
        _photo(*size, seed=i).save(paths[-1])
    return [AskRequest("Is <avril> in this photo?", paths[0]), AskRequest("Where is <bob>?", paths[1]),
            AskRequest("Are <avril> and <bob> here?", paths[2]), AskRequest("What is <bob> wearing?", None),
            AskRequest("Describe the photo.", paths[3]), AskRequest("Who is <avril>?", None)]


@pytest.fixture(scope="module")
def engine(backbone, runtime):
    concepts = {"avril": _concept(backbone, "avril", 4, 0), "bob": _concept(backbone, "bob", 2, 1)}
    return Engine(runtime, concepts)


def test_batched_answers_equal_one_by_one(engine, tmp_path):
    requests = _requests(tmp_path)
    batched = engine.ask(requests, batch_size=6)
    assert all(result.ok for result in batched), [r.error for r in batched]
    for request, together in zip(requests, batched):
        assert engine.ask([request], batch_size=1)[0].answer == together.answer


def test_batched_option_scores_equal_one_by_one(engine, tmp_path):
    requests = _requests(tmp_path)[1:4]
    options = [["left", "right", "in the middle"], ["Yes <bob>", "No"], ["red", "blue"]]
    batched = engine.score_options(requests, options, batch_size=3)
    for request, option, together in zip(requests, options, batched):
        assert together.error is None
        alone = engine.score_options([request], [option], batch_size=1)[0]
        assert torch.allclose(torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-4)


def test_yollava_features_and_steps_run_on_onevision(backbone, runtime, tmp_path):
    from plvmctl.methods.yollava.trainer import YollavaConfig, yollava_trainer

    photos = []
    for i, size in enumerate([(40, 20), (16, 16)]):
        photos.append(tmp_path / f"y{i}.png")
        _photo(*size, seed=i).save(photos[-1])
    trainer = yollava_trainer(runtime, "ana", YollavaConfig(num_context=2, init_word="person"))
    samples = [Sample("ana", "positive", "Is <ana> in this photo?", "Yes", photos[0]),
               Sample("ana", "negative", "Is <ana> in this photo?", "No", photos[1]),
               Sample("ana", "attribute", "What does <ana> wear?", "A red hat.", None)]
    before = trainer.snapshot()
    cached = float(trainer.loss(samples, cached=True).detach())
    assert cached == pytest.approx(float(trainer.loss(samples, cached=False).detach()), abs=1e-5)
    trainer.step(samples)
    assert not torch.equal(before["context"], trainer.snapshot()["context"])


def test_the_aligner_trains_on_onevision_and_its_concepts_answer(backbone, runtime, tmp_path):
    """`train aligner` end to end on the tiny OneVision: the loss is finite, only the Aligner
    learns, and a concept it encodes is asked about like any other."""
    from test_train_aligner import config_for, write_world

    from plvmctl.train.aligner import train_aligner

    world = write_world(tmp_path / "world")
    before = {key: value.clone() for key, value in backbone.model.state_dict().items()}
    result = train_aligner(runtime, config_for(world, tmp_path / "run", steps=3, checkpoint_every=0))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    after = backbone.model.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)

    recipe = recipe_from_dict({"aligner": {"path": str(result.aligner_path)},
                               "generation": {"max_new_tokens": 6}})
    trained = Runtime(recipe=recipe, backbone=backbone)
    assert trained.aligner.config.lm_dim == backbone.hidden_size
    concept = trained.encode_concept("ana", tmp_path / "world" / "ann" / "ref.png")
    engine = Engine(trained, {"ana": concept})
    [answer] = engine.ask([AskRequest("Is <ana> in this photo?", tmp_path / "world" / "ann" / "q0.png")])
    assert answer.error is None and isinstance(answer.answer, str)


# -- concepts of one family are refused by the other ----------------------------------------------


def test_a_concept_for_one_family_is_refused_by_the_other(runtime):
    """The fingerprint (model_type among its fields) tells the families apart even at equal
    hidden sizes; the refusal is one line that names the model the concept was made for."""
    from plvmctl.families.llava15 import Llava15Backbone
    from plvmctl.tiny import build_tiny_llava

    model, tokenizer, image_processor = build_tiny_llava(seed=0, hidden_size=16, vision_hidden=16, heads=2)
    llava = Llava15Backbone(model, tokenizer, image_processor, name="tiny-llava-16").freeze()
    llava_runtime = Runtime(recipe=recipe_from_dict({}), backbone=llava)
    assert llava.hidden_size == runtime.backbone.hidden_size
    pairs = [(copied_concept(llava, "avril", 5), runtime, "tiny-llava-16"),
             (copied_concept(runtime.backbone, "bob", 100), llava_runtime, runtime.backbone.name)]
    for concept, other, maker in pairs:
        with pytest.raises(PlvmError, match=r"made for model") as refused:
            Engine(other, {concept.name: concept})
        assert "\n" not in str(refused.value) and maker in str(refused.value)


def test_the_tiny_llava_recipes_concepts_are_refused_too(runtime):
    from plvmctl.recipe import load_recipe
    from plvmctl.runtime import load_runtime

    made_for_llava = load_runtime(load_recipe("tiny"), device="cpu").encode_concept("avril", _photo(20, 20))
    with pytest.raises(PlvmError, match=r"made for another model \(tiny-llava-seed0\)$"):
        Engine(runtime, {"avril": made_for_llava})


# -- several photos in one prompt (ask --together) ------------------------------------------------


def test_two_photos_in_one_prompt_are_apply_chat_templates_ids(backbone):
    photos = [_photo(40, 20), _photo(20, 64, seed=1)]
    ids = _prompt(backbone, "Is <a> in both photos?", {"a": 2}, photos)
    a, a1, a2 = _slots({"a": 2}, "a")
    text = _rendered(backbone, SYSTEM + f" {STAND_IN} is {STAND_IN * 2}.", f"Is {STAND_IN} in both photos?", 2)
    assert ids == _natural(backbone, text, [a, a1, a2, a], [17, 17])
    assert ids.count(IMAGE_ID) == 2 * 17  # base view + newline each, whatever the photo's size


def test_together_answers_batch_like_one_by_one_and_llava_refuses(engine, tmp_path):
    requests = _requests(tmp_path)
    together = AskRequest("Is <avril> in both photos?", [requests[0].image, requests[2].image])
    mixed = [together, requests[1], AskRequest("Same person?", [requests[4].image, requests[1].image, requests[0].image])]
    batched = engine.ask(mixed, batch_size=3)
    assert all(result.ok for result in batched), [r.error for r in batched]
    assert [engine.ask([request])[0].answer for request in mixed] == [r.answer for r in batched]


def test_ask_together_on_the_command_line(folder, tmp_path):
    from click.testing import CliRunner

    from plvmctl.cli import main

    recipe = tmp_path / "tiny-ov.yaml"
    recipe.write_text(f"name: tiny-ov\nmodel:\n  source: {folder}\n  dtype: float32\n"
                      "generation:\n  max_new_tokens: 4\n", encoding="utf-8")
    paths = []
    for i, size in enumerate([(40, 20), (16, 16)]):
        paths.append(tmp_path / f"c{i}.png")
        _photo(*size, seed=i).save(paths[-1])

    def run(recipe_name, *args):
        return CliRunner().invoke(main, ["--recipe", str(recipe_name), "--device", "cpu",
                                         "--store", str(tmp_path / "store"), "ask", *map(str, args)])

    result = run(recipe, *paths, "Are these the same person?", "--together", "--json")
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in result.stdout.splitlines()]
    assert row["image"] == [str(p) for p in paths] and row["error"] is None and row["answer"] is not None
    refused = run("tiny", *paths, "Are these the same person?", "--together")
    assert refused.exit_code == 1 and refused.output.count("\n") == 1
    assert "takes one photo per question" in refused.output
    assert run(recipe, paths[0], "Alone?", "--together").exit_code == 1
