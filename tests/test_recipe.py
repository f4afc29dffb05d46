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


def test_the_onevision_recipe_names_its_model_encoder_and_aligner_folder():
    recipe = load_recipe("llava-ov-7b")
    assert recipe.model.source == "llava-hf/llava-onevision-qwen2-7b-ov-hf"
    assert recipe.model.template == "auto"  # the processor's own chat template
    assert recipe.encoder.source == "facebook/dinov2-base"
    assert recipe.aligner.path == "aligners/plvm-llava-ov-7b" and recipe.aligner.layout == "paper"
    assert recipe.aligner.num_context == 16 and recipe.model.prompt_pieces == "natural"


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
    ("model.prompt_pieces=words", "model.prompt_pieces: 'words' is not one of"),
    ("model.reasoning=chain", "model.reasoning: 'chain' is not one of none, comparison"),
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


def test_the_default_recipe_is_the_trained_offline_pocket_model():
    from plvmctl.recipe import DEFAULT_RECIPE, known_recipes

    assert DEFAULT_RECIPE == "pocket" and load_recipe().name == "pocket"
    assert {"pocket", "tiny", "llava15-7b", "train-tiny"} <= set(known_recipes())


def test_an_installed_copy_of_the_recipes_resolves_from_any_folder(tmp_path, monkeypatch):
    """As from a wheel: no checkout recipes/, the copy inside the package, another cwd."""
    import shutil

    import plvmctl.recipe as recipe_module
    from plvmctl.runtime import resolve_recipe_path

    installed = tmp_path / "site" / "plvmctl" / "recipes"
    installed.mkdir(parents=True)
    shutil.copyfile(recipe_module.known_recipes()["pocket"], installed / "pocket.yaml")
    monkeypatch.setattr(recipe_module, "RECIPES_DIRS", (installed,))
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("pocket")
    assert recipe.path == installed / "pocket.yaml"
    backbone = resolve_recipe_path(recipe, recipe.model.source)
    assert backbone == str(recipe_module.PACKAGE_DIR / "assets" / "pocket" / "backbone")
    with pytest.raises(PlvmError, match=r"unknown recipe 'tiny' \(known: pocket\)"):
        load_recipe("tiny")


def test_auto_dtype_is_fp16_on_a_gpu_only_for_the_released_aligner():
    import torch

    from plvmctl.backbone import resolve_dtype
    from plvmctl.runtime import recipe_dtype

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    released = load_recipe("llava15-7b")
    assert released.aligner.layout == "released"
    assert resolve_dtype(recipe_dtype(released, gpu), gpu) == torch.float16
    assert resolve_dtype(recipe_dtype(released, cpu), cpu) == torch.float32
    assert resolve_dtype(recipe_dtype(load_recipe("tiny"), gpu), gpu) == torch.bfloat16
    chosen = load_recipe("llava15-7b", ["model.dtype=bfloat16"])
    assert resolve_dtype(recipe_dtype(chosen, gpu), gpu) == torch.bfloat16


@pytest.mark.parametrize("recipe, override, message", [
    ("tiny", "generation.temperature=0.5", "generation.temperature=0.5 is unused with sampling off"),
    ("tiny", "generation.top_p=0.9", "generation.top_p=0.9 is unused with sampling off"),
    ("tiny", "generation.top_k=5", "generation.top_k=5 is unused with sampling off"),
    ("tiny", "generation.seed=3", "generation.seed=3 is unused with sampling off"),
    ("tiny", "model.quantization=8bit", "model.quantization=8bit is for real models"),
    ("tiny", "model.revision=main", "model.revision is for hub models"),
    ("pocket", "model.seed=2", "model.seed=2 seeds the random tiny parts only"),
])
def test_a_setting_nothing_reads_is_refused(recipe, override, message):
    with pytest.raises(PlvmError, match=message):
        load_recipe(recipe, [override])


def test_the_same_settings_are_taken_where_they_are_read():
    sampled = load_recipe("tiny", ["generation.do_sample=true", "generation.temperature=0.5", "generation.seed=3"])
    assert sampled.generation.temperature == 0.5 and sampled.generation.seed == 3
    assert load_recipe("tiny", ["model.seed=2"]).model.seed == 2  # the random tiny model
    assert load_recipe("pocket", ["aligner.path=null", "model.seed=2"]).model.seed == 2  # a random Aligner
    assert load_recipe("tiny").model.image_preprocess is None  # the family's own (pad for LLaVA-1.5)
