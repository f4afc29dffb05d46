"""Batched asking: same answers as one by one, per-item failures, concepts mixed freely."""

import pytest
import torch

from helpers import copied_concept
from plvmctl.engine import AskRequest, Engine
from plvmctl.table import ConceptTable


@pytest.fixture(scope="module")
def concepts(runtime):
    backbone = runtime.backbone
    return {name: copied_concept(backbone, name, token, k=2, noise=0.5, seed=token)
            for name, token in [("avril", 25), ("bob", 40), ("cleo", 60)]}


def _requests(photos):
    return [
        AskRequest("Is <avril> in this photo?", photos["plain0.png"]),
        AskRequest("where is <bob>?", photos["plain1.png"]),
        AskRequest("is <avril> next to <cleo>?", photos["photo.jpg"]),
        AskRequest("what color is the hair of <bob>?", None),
        AskRequest("describe the photo", photos["rgba.png"]),
        AskRequest("<cleo> and <bob> and <avril>?", None),
        AskRequest("Is <cleo> smiling?", photos["exif_rotated.jpg"]),
    ]


def test_batched_greedy_equals_one_by_one(runtime, concepts, photos):
    engine = Engine(runtime, concepts)
    requests = _requests(photos)
    batched = engine.ask(requests, batch_size=4, max_new_tokens=6)
    single = [engine.ask([r], batch_size=1, max_new_tokens=6)[0] for r in requests]
    assert all(r.ok for r in batched), [r.error for r in batched]
    assert [r.answer for r in batched] == [r.answer for r in single]
    assert len({r.answer for r in batched}) > 1  # the answers are not all the same string


def test_failures_are_per_item(runtime, concepts, photos):
    engine = Engine(runtime, concepts)
    requests = [AskRequest("Is <avril> here?", photos["plain0.png"]),
                AskRequest("Is <zoe> here?", photos["plain0.png"]),
                AskRequest("Is <avril> here?", photos["corrupt.jpg"]),
                AskRequest("Is <avril> here?", photos["missing.png"]),
                AskRequest("Is <bob> here?", photos["plain1.png"])]
    results = engine.ask(requests, batch_size=8, max_new_tokens=3)
    assert [r.ok for r in results] == [True, False, False, False, True]
    assert "unknown concept <zoe>" in results[1].error and "<avril>" in results[1].error
    assert "corrupt" in results[2].error and "not found" in results[3].error


def test_concept_words_come_back_as_names(runtime, concepts):
    engine = Engine(runtime, concepts)
    table = ConceptTable([concepts["avril"], concepts["bob"]], runtime.backbone.vocab_size)
    tokenizer = runtime.backbone.tokenizer
    is_, with_ = tokenizer.convert_tokens_to_ids(["is", "with"])
    ids = [table.word_id("avril"), is_, with_, table.word_id("bob"), tokenizer.eos_token_id, is_]
    assert engine.decode(ids, table) == "<avril> is with <bob>"


def test_sampling_is_seeded(runtime, concepts, photos, monkeypatch):
    """With sampling on, the seed decides the answer: the same seed gives the same answer
    every time, other seeds give others (greedy would give one answer for every seed)."""
    monkeypatch.setattr(runtime.recipe.generation, "do_sample", True)
    monkeypatch.setattr(runtime.recipe.generation, "temperature", 1.5)
    request = [AskRequest("Is <avril> here?", photos["plain0.png"])]

    def answer(seed: int) -> str:
        monkeypatch.setattr(runtime.recipe.generation, "seed", seed)
        return Engine(runtime, concepts).ask(request, max_new_tokens=8)[0].answer

    assert answer(3) == answer(3)
    assert len({answer(seed) for seed in range(4)}) > 1


def test_option_scores_agree_with_greedy_generation(runtime, concepts, photos):
    """The option the model would generate first has the highest one-token likelihood."""
    engine = Engine(runtime, concepts)
    tokenizer = runtime.backbone.tokenizer
    words = ["yes", "no", "red", "left", "photo"]
    request = AskRequest("Is <avril> in this photo?", photos["plain0.png"])
    scores = engine.score_options([request], [words])[0]
    assert scores.error is None and scores.num_tokens == [1] * len(words)
    assert all(lp < 0 for lp in scores.logprobs)
    # compare with the model's own next-token distribution over those words
    table = ConceptTable([concepts["avril"]], runtime.backbone.vocab_size)
    prepared = engine._prepare(0, request)
    ids = torch.tensor([engine._encode(prepared.segments, table, images=prepared.images)])
    with torch.no_grad(), table.active(runtime.backbone.model):
        logits = runtime.backbone.model(input_ids=ids, pixel_values=runtime.backbone.pixel_values(prepared.images)).logits
    expected = torch.log_softmax(logits[0, -1].float(), -1)[tokenizer.convert_tokens_to_ids(words)]
    assert torch.allclose(torch.tensor(scores.logprobs), expected, atol=1e-4)


def test_batched_scores_equal_single_scores(runtime, concepts, photos):
    engine = Engine(runtime, concepts)
    requests = _requests(photos)[:4]
    options = [["yes", "no"], ["left", "right", "in the middle"], ["yes <cleo>", "no"], ["red", "blue"]]
    batched = engine.score_options(requests, options, batch_size=4)
    for request, option, together in zip(requests, options, batched):
        alone = engine.score_options([request], [option], batch_size=1)[0]
        assert torch.allclose(torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-4)


def test_engine_refuses_a_concept_for_another_model(runtime, concepts):
    foreign = copied_concept(runtime.backbone, "alien", 30)
    foreign.meta.base_model = "0123456789abcdef"
    with pytest.raises(Exception, match="made for model"):
        Engine(runtime, {"alien": foreign})
