"""The concept table: virtual ids above the vocabulary, the model never touched."""

import torch

from helpers import copied_concept
from plvmctl.images import load_image
from plvmctl.name_tags import TAGS_KEY
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


def _with_name_tags(model, stop_ids):
    """`model` (its config) as a base trained with name tags reads it; undo with the returned call."""
    setattr(model.config, TAGS_KEY, {"stop_ids": list(stop_ids)})
    return lambda: delattr(model.config, TAGS_KEY)


def test_name_tags_add_the_word_to_the_tokens_after_it_up_to_the_stop(runtime):
    """On a model trained with name tags, every token after a concept word up to the next stop
    id embeds with the word's vector added; the word, the stop and what follows are untouched."""
    backbone = runtime.backbone
    model = backbone.model
    concept = copied_concept(backbone, "tagged", TOKEN, k=2, noise=0.5)
    table = ConceptTable([concept], backbone.vocab_size)
    word, stop = table.word_id("tagged"), 7
    ids = torch.tensor([[1, 21, word, 40, table.slot_id(Slot("tagged", 0)), table.slot_id(Slot("tagged", 1)),
                         stop, 41, 6]])
    seen = []

    def embeds():  # what the table's hooks hand the model (a hook registered after theirs)
        with torch.no_grad(), table.active(model):
            hook = model.get_input_embeddings().register_forward_hook(lambda m, a, output: seen.append(output))
            try:
                model(input_ids=ids)
            finally:
                hook.remove()

    embeds()
    undo = _with_name_tags(model, [stop])
    try:
        embeds()
    finally:
        undo()
    plain, tagged = seen
    added = (tagged - plain)[0]
    assert torch.allclose(added[3:6], concept.word.expand(3, -1), atol=1e-6)  # "40", both context tokens
    assert torch.equal(added[:3], torch.zeros_like(added[:3]))  # before and at the word
    assert torch.equal(added[6:], torch.zeros_like(added[6:]))  # the stop and after it


def test_name_tags_carry_into_generation_one_token_at_a_time(runtime):
    """Generating with the KV cache (one token a call) tags each new token as a forward over
    the whole sequence does: greedy answers with and without the cache are the same."""
    backbone = runtime.backbone
    model = backbone.model
    concept = copied_concept(backbone, "asked", TOKEN, noise=2.0, seed=3)
    table = ConceptTable([concept], backbone.vocab_size)
    prompt = torch.tensor([[1, 21, 41, table.word_id("asked"), 20]])
    undo = _with_name_tags(model, [backbone.eos_token_id])
    try:
        with torch.no_grad(), table.active(model):
            cached = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                    pad_token_id=backbone.pad_token_id, use_cache=True)[0].tolist()
            ids = prompt[0].tolist()
            for _ in range(6):  # greedy by full forwards: every token's tag from scratch
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1, :table.total_ids].argmax()))
        with torch.no_grad(), table.active(model):
            untagged = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                                      pad_token_id=backbone.pad_token_id, use_cache=True)[0].tolist()
    finally:
        undo()
    assert cached == ids
    with torch.no_grad(), table.active(model):
        plain = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                               pad_token_id=backbone.pad_token_id, use_cache=True)[0].tolist()
    assert untagged == cached != plain  # the tags change what is said (noise 2.0 makes them large)
