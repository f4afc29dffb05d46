"""Recipes: YAML → typed sections, `--set` overrides, errors that name the key."""

from dataclasses import dataclass

import pytest

from plvmctl.errors import PlvmError
from plvmctl.recipe import load_recipe


def test_shipped_recipes_load():
    for name in ("tiny", "llava15-7b", "train-tiny"):
        recipe = load_recipe(name)
        assert recipe.name == name
    real = load_recipe("llava15-7b")
    assert real.model.source == "llava-hf/llava-1.5-7b-hf" and real.encoder.source == "facebook/dinov2-base"
    assert real.aligner.num_context == 16 and real.model.image_preprocess == "pad"


def test_overrides_are_typed():
    recipe = load_recipe("tiny", ["generation.max_new_tokens=3", "model.dtype=bfloat16", "train.lr=3e-3"])
    assert recipe.generation.max_new_tokens == 3 and recipe.model.dtype == "bfloat16"

    @dataclass
    class Train:
        lr: float = 1e-4
        steps: int = 10

    assert recipe.section("train", Train).lr == pytest.approx(3e-3)


@pytest.mark.parametrize("override, message", [
    ("model.dtype=float8", "model.dtype: 'float8' is not one of"),
    ("generation.batch_size=0", "at least 1"),
    ("model.colour=red", "unknown key 'colour'"),
    ("generation.do_sample=maybe", "expected true or false"),
    ("nokey", "expects key=value"),
    ("store.x=1", "store: expected str"),
    ("generation.max_new_tokens.x=1", "not a section"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(PlvmError, match=message):
        load_recipe("tiny", [override])
