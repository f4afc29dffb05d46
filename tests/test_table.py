"""The concept table: virtual ids above the vocabulary, the model never touched."""

import torch

from helpers import copied_concept
from plvmctl.images import load_image
from plvmctl.prompt import Slot
from plvmctl.table import ConceptTable

TOKEN = 30  # an ordinary word of the tiny vocabulary


def _image_prompt(backbone, middle: list[int]) -> torch.Tensor:
    n = backbone.num_image_tokens
    ids = [1, 21, 20] + [backbone.image_token_id] * n + [41] + middle + [6, 7]
    return torch.tensor([ids])


def test_copied_concept_gives_bit_identical_logits(runtime, photos):
    """A concept copied from token t is, to the model, exactly token t."""
    backbone = runtime.backbone
    k = 3
    concept = copied_concept(backbone, "twin", TOKEN, k=k)
    table = ConceptTable([concept], backbone.vocab_size)
    virtual = [table.slot_id(Slot("twin", index)) for index in range(-1, k)]
    plain_ids = _image_prompt(backbone, [TOKEN] * (1 + k))
    virtual_ids = _image_prompt(backbone, virtual)
    pixels = backbone.pixel_values([load_image(photos["plain0.png"])])
    with torch.no_grad():
        plain = backbone.model(input_ids=plain_ids, pixel_values=pixels).logits
        with table.active(backbone.model):
            personal = backbone.model(input_ids=virtual_ids, pixel_values=pixels).logits
    vocab = backbone.vocab_size
    assert personal.shape[-1] == table.total_ids == vocab + 1 + k
    assert torch.equal(personal[..., :vocab], plain)
    # the concept's own column is the copied token's logit (same dot product, computed by a
    # different matmul, so equal up to float rounding); context columns are never chosen
    assert torch.allclose(personal[..., vocab], plain[..., TOKEN], rtol=0, atol=1e-6)
    assert (personal[..., vocab + 1:] == torch.finfo(personal.dtype).min).all()


def test_table_leaves_no_trace(runtime):
    backbone = runtime.backbone
    model = backbone.model
    before = {name: p.clone() for name, p in model.state_dict().items()}
    concept = copied_concept(backbone, "ghost", TOKEN)
    table = ConceptTable([concept], backbone.vocab_size)
    ids = torch.tensor([[1, 21, table.word_id("ghost"), 7]])
    with torch.no_grad(), table.active(model):
        model(input_ids=ids)
    assert not model.get_input_embeddings()._forward_hooks
    assert not model.get_input_embeddings()._forward_pre_hooks
    assert not model.get_output_embeddings()._forward_hooks
    assert model.get_input_embeddings().weight.shape[0] == backbone.vocab_size
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_hooks_removed_even_when_the_call_fails(runtime):
    model = runtime.backbone.model
    table = ConceptTable([copied_concept(runtime.backbone, "oops", TOKEN)], runtime.backbone.vocab_size)
    try:
        with table.active(model):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not model.get_output_embeddings()._forward_hooks


def test_generate_can_say_the_concept_and_continue(runtime):
    """With KV cache on, a generated concept id is fed back through the wrapped embedding."""
    backbone = runtime.backbone
    model = backbone.model
    plain = torch.tensor([[1, 21, 41, 6]])
    with torch.no_grad():
        reference = model.generate(input_ids=plain, max_new_tokens=6, do_sample=False,
                                   pad_token_id=backbone.pad_token_id)[0, 4:].tolist()
    said = reference[0]
    # a concept copied from the first generated token, with its head row boosted, is said instead
    concept = copied_concept(backbone, "speaker", said)
    concept.head = concept.head * 1.0001 + 1e-3 * concept.head.sign()
    table = ConceptTable([concept], backbone.vocab_size)
    with torch.no_grad(), table.active(model):
        out = model.generate(input_ids=plain, max_new_tokens=6, do_sample=False,
                             pad_token_id=backbone.pad_token_id, use_cache=True)[0, 4:].tolist()
    word = table.word_id("speaker")
    assert out[0] == word
    # fed back as input, the concept id embeds as the copied token: same continuation
    assert [said if token == word else token for token in out] == reference


def test_many_concepts_get_distinct_ids(runtime):
    backbone = runtime.backbone
    concepts = [copied_concept(backbone, f"c{i}", 20 + i, k=i + 1) for i in range(4)]
    table = ConceptTable(concepts, backbone.vocab_size)
    ids = [table.word_id(c.name) for c in concepts]
    ids += [table.slot_id(Slot(c.name, j)) for c in concepts for j in range(c.num_context)]
    assert len(set(ids)) == len(ids) == 4 + (1 + 2 + 3 + 4)
    assert min(ids) == backbone.vocab_size and max(ids) == table.total_ids - 1
    assert [table.name_for_id(i) for i in ids[:4]] == ["c0", "c1", "c2", "c3"]
    assert table.name_for_id(ids[-1]) is None and table.name_for_id(5) is None
