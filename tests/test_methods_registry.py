"""The methods registry: every record is whole, and the CLI, the evaluation and the recipe see it.

Adding a method is one folder (plvmctl/methods/NAME/ with adapter.py, and as it has them
trainer.py, cli.py, hook.py; its __init__.py holds its `Method` records) plus its name in
`FOLDERS` in plvmctl/methods/__init__.py: these tests then check the record's adapter, its
`plvmctl train` command (or that it has none by design), its place in `eval --method`, its recipe section and its documentation page.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.errors import PlvmError
from plvmctl.fingerprint import METHOD_SECTIONS
from plvmctl.methods import (ASK_HOOKS, FOLDERS, KNOWN_METHODS, METHODS, RECIPE_SECTIONS, REGISTRY,
                             TRAINED_ON_NEGATIVES, check_recipe_sections, get_method)
from plvmctl.recipe import CORE_SECTIONS, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
# The methods with no `plvmctl train NAME`, by design: PLVM's concepts come from the Aligner
# (`plvmctl train aligner`), the text baselines train nothing.
NO_TRAINER = {"plvm", "plvm-auto", "llava-text", "llava-none"}
IDS = [method.name for method in REGISTRY]


def test_names_are_unique_and_are_evals_method_list():
    assert len(set(IDS)) == len(IDS)
    assert KNOWN_METHODS == tuple(IDS)
    assert list(METHODS) == IDS


@pytest.mark.parametrize("method", REGISTRY, ids=IDS)
def test_every_method_has_an_eval_adapter_in_its_own_folder(method):
    assert callable(method.prepare)
    assert get_method(method.name) is method.prepare
    folder = method.prepare.__module__.split(".")
    assert folder[:2] == ["plvmctl", "methods"] and folder[-1] == "adapter", method.prepare.__module__
    assert (ROOT / "plvmctl" / "methods" / folder[2]).is_dir()


def test_every_method_folder_is_registered_and_holds_its_own_records():
    folders = {path.name for path in (ROOT / "plvmctl" / "methods").iterdir()
               if path.is_dir() and (path / "__init__.py").is_file()}
    assert folders == {folder.__name__.split(".")[-1] for folder in FOLDERS}
    for folder in FOLDERS:
        assert folder.RECORDS, folder.__name__
        for record in folder.RECORDS:
            assert record.prepare.__module__ == f"{folder.__name__}.adapter"


@pytest.mark.parametrize("method", REGISTRY, ids=IDS)
def test_every_method_has_a_train_command_or_none_by_design(method):
    train = main.commands["train"]
    if method.name in NO_TRAINER:
        assert method.train_command is None
        assert method.name not in train.commands
    else:
        assert isinstance(method.train_command, click.Command)
        assert method.train_command.name == method.name
        assert train.commands[method.name] is method.train_command
        assert method.train_command.callback.__module__ == f"plvmctl.methods.{method.name}.cli"


@pytest.mark.parametrize("method", REGISTRY, ids=IDS)
def test_every_method_is_in_evals_method_option(method):
    [option] = [param for param in main.commands["eval"].params if param.name == "methods"]
    listed = option.help.split("Method to evaluate: ")[1].split(". ")[0].split(" | ")
    assert method.name in listed


@pytest.mark.parametrize("method", REGISTRY, ids=IDS)
def test_every_method_section_is_a_known_recipe_section(method):
    if method.section is None:
        assert not method.trains_on_negatives  # a method trained on negatives reads them from its section
        return
    assert method.section.name in RECIPE_SECTIONS and method.section.name not in CORE_SECTIONS
    settings = method.section.settings()
    assert dataclasses.is_dataclass(settings)
    settings.validate()
    assert METHOD_SECTIONS.get(method.name) == method.section.name  # answers depend on the section
    if method.trains_on_negatives:
        read = TRAINED_ON_NEGATIVES[method.name](recipe_from_dict({method.section.name: {"negatives_dir": "negs"}}))
        assert isinstance(read, method.section.settings) and read.negatives_dir == "negs"


@pytest.mark.parametrize("method", REGISTRY, ids=IDS)
def test_every_method_has_a_documentation_page(method):
    assert (ROOT / method.page).is_file(), f"{method.name}: {method.page} is missing"


def test_hooks_run_myvlms_concept_heads_before_mcllavas_visual_prompt():
    assert [name for name, _ in ASK_HOOKS] == ["myvlm", "mcllava"]


def test_unknown_and_unavailable_methods_are_refused_in_one_line():
    with pytest.raises(PlvmError, match=r"^unknown method 'gpt' \(known: llava-none, llava-text, mcllava, "
                                        r"myvlm, plvm, plvm-auto, yollava\)$"):
        get_method("gpt")


def test_shipped_recipes_have_only_known_sections():
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        check_recipe_sections(load_recipe(str(path)))


def test_a_misspelt_section_is_refused_naming_the_known_ones(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model:\n  source: tiny\nyolava:\n  epochs: 2\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["--recipe", str(recipe), "concepts"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: recipe ") and "unknown section 'yolava'" in line
    known = line.split("(known: ")[1].rstrip(")").split(", ")
    assert known == sorted(RECIPE_SECTIONS)
    assert {"yollava", "myvlm", "mcllava", "train", "eval", "retrieval"} <= set(known)


def test_an_evaluation_run_as_a_library_refuses_a_misspelt_section_too(tmp_path):
    from test_evaluate import FakeApi, FakeRuntime, make_testset

    from plvmctl.evaluate import run_evaluation
    from plvmctl.recipe import recipe_from_dict

    runtime = FakeRuntime()
    runtime.recipe = recipe_from_dict({"yolava": {"epochs": 2}}, name="typo")
    with pytest.raises(PlvmError, match="unknown section 'yolava'"):
        run_evaluation(runtime, make_testset(tmp_path / "set"), ["plvm"], tmp_path / "out", progress=False,
                       engine_api=FakeApi())
    assert not (tmp_path / "out").exists()  # refused before anything was written
