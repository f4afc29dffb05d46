"""The methods plvmctl makes concepts with and `plvmctl eval` compares: one folder each, one registry.

`REGISTRY` holds one `Method` record per command-line name, as `families.FAMILIES` holds the
backbones. A record says everything the rest of plvmctl needs to know about a method:

- `prepare`: its eval adapter, a factory that takes a `MethodContext` (the runtime, the concept
  names with their reference photos, a cache folder) and returns a `PreparedMethod`: an engine
  that answers questions mentioning `<name>`, plus what adding one concept cost;
- `train_command`: its `plvmctl train NAME` command, or None by design (PLVM's concepts come
  from the Aligner, trained by `plvmctl train aligner`; the text baselines train nothing);
- `section`: its recipe section and the settings dataclass read from it, or None;
- `cache`: what it keeps in an evaluation's cache folder, or None;
- `hook`: the ask-time hook the engine runs for its concepts, or None;
- `negatives`: for a method trained on photos of other people, how it reads its settings
  from the recipe (`eval` gives it a `negative_pool` from them before anything runs);
- `page`: its documentation page.

Each method's folder holds adapter.py (the eval adapter), and as it has them trainer.py, cli.py
and hook.py; what the adapters share is in base.py, what the trainers share in
plvmctl/train/per_concept.py and plvmctl/train/soft_prompt.py. Adding a method is one folder
plus one record here; tests/test_methods_registry.py checks every record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import click

from ..concept import Concept
from ..engine import Engine
from ..errors import PlvmError
from ..recipe import CORE_SECTIONS
from ..store import ConceptStore
from .base import MethodContext, MethodFactory, NegativePool, PreparedMethod, Reference, negative_pool
from .mcllava.adapter import MCLLAVA_CACHE, prepare_mcllava
from .mcllava.cli import mcllava as train_mcllava_command
from .mcllava.hook import LocatedHook, location_settings
from .mcllava.trainer import McllavaConfig
from .myvlm.adapter import MYVLM_CACHE, myvlm_settings, prepare_myvlm
from .myvlm.cli import myvlm as train_myvlm_command
from .myvlm.hook import SeenHook
from .myvlm.trainer import MyvlmConfig
from .plvm.adapter import prepare_plvm
from .plvm_auto.adapter import prepare_plvm_auto
from .text.adapter import DESCRIPTIONS_CACHE, count_tokens, prepare_llava_none, prepare_llava_text
from .yollava.adapter import YOLLAVA_CACHE, prepare_yollava, yollava_settings
from .yollava.cli import yollava as train_yollava_command
from .yollava.trainer import YollavaConfig


@dataclass(frozen=True)
class Section:
    """A method's recipe section: its name and the settings dataclass it is read into."""

    name: str
    settings: type


@dataclass(frozen=True)
class Method:
    """One method, as the command line, the evaluation, the engine and the recipe see it."""

    name: str  # `--method NAME`, `plvmctl train NAME`
    prepare: MethodFactory | None  # the eval adapter; None: not available in this build
    page: str  # its documentation page, relative to the project root
    train_command: click.Command | None = None  # None by design: nothing to train per concept
    section: Section | None = None
    cache: str | None = None  # file or folder name in an evaluation's cache/
    hook: type | None = None  # ask-time hook class (`Engine(hooks=...)`)
    negatives: Callable[[Any], Any] | None = None  # recipe -> settings naming index / negatives_dir


# In the order `eval --method` lists them; the hooks run in this order too (MyVLM's concept
# heads first, then MC-LLaVA's visual prompt).
REGISTRY = (
    Method("plvm", prepare_plvm, "docs/how-it-works.md"),
    Method("plvm-auto", prepare_plvm_auto, "docs/who-is-here.md"),
    Method("yollava", prepare_yollava, "docs/methods/yollava.md", train_command=train_yollava_command,
           section=Section("yollava", YollavaConfig), cache=YOLLAVA_CACHE, negatives=yollava_settings),
    Method("myvlm", prepare_myvlm, "docs/methods/myvlm.md", train_command=train_myvlm_command,
           section=Section("myvlm", MyvlmConfig), cache=MYVLM_CACHE, hook=SeenHook, negatives=myvlm_settings),
    Method("mcllava", prepare_mcllava, "docs/methods/mcllava.md", train_command=train_mcllava_command,
           section=Section("mcllava", McllavaConfig), cache=MCLLAVA_CACHE, hook=LocatedHook,
           negatives=location_settings),
    Method("llava-text", prepare_llava_text, "docs/methods/text-prompt.md", cache=DESCRIPTIONS_CACHE),
    Method("llava-none", prepare_llava_none, "docs/methods/text-prompt.md"),
)

# Every name `--method` may ever take; a name here but not in METHODS is "not available".
KNOWN_METHODS = tuple(method.name for method in REGISTRY)
METHODS: dict[str, MethodFactory] = {method.name: method.prepare for method in REGISTRY
                                     if method.prepare is not None}
# The methods that train on photos of other people, with how each reads its settings (which
# name its index / negatives_dir): `eval` gives them a `negative_pool` before anything runs.
TRAINED_ON_NEGATIVES = {method.name: method.negatives for method in REGISTRY if method.negatives is not None}
# What each method keeps in an evaluation's cache folder (set aside with its answers when what
# decides them changed).
METHOD_CACHES = {method.name: method.cache for method in REGISTRY if method.cache is not None}
# The ask-time hooks of the methods that have one, in the order the engine runs them.
ASK_HOOKS = tuple((method.name, method.hook) for method in REGISTRY if method.hook is not None)
# Every section a recipe may have: the core's and the methods'.
RECIPE_SECTIONS = CORE_SECTIONS + tuple(method.section.name for method in REGISTRY if method.section is not None)


def make_engine(runtime, concepts: Mapping[str, Concept] | ConceptStore | None = None,
                descriptions: Mapping[str, str] | None = None, literal_names: bool = False, *,
                locate: bool = True) -> Engine:
    """An Engine that runs every method's ask-time hook, so a concept behaves as its method
    made it. `locate=False` leaves out MC-LLaVA's visual prompt (`plvmctl ask --no-location`)."""
    hooks = [hook() for method, hook in ASK_HOOKS if locate or method != "mcllava"]
    return Engine(runtime, concepts, descriptions=descriptions, literal_names=literal_names, hooks=hooks)


def get_method(name: str) -> MethodFactory:
    """The factory registered under `name`; PlvmError for unknown or not-yet-available names."""
    if name in METHODS:
        return METHODS[name]
    if name in KNOWN_METHODS:
        available = ", ".join(METHODS)
        raise PlvmError(f"method {name!r} is not available in this build (available: {available})")
    known = ", ".join(sorted(set(KNOWN_METHODS) | set(METHODS)))
    raise PlvmError(f"unknown method {name!r} (known: {known})")


def check_recipe_sections(recipe) -> None:
    """PlvmError, in one line naming the known sections, for a recipe section nothing reads:
    a typo such as `yolava:` would otherwise be ignored, and the method run on its defaults."""
    unknown = [name for name in recipe.sections if name not in RECIPE_SECTIONS]
    if unknown:
        where = recipe.path or recipe.name
        raise PlvmError(f"recipe {where}: unknown section {unknown[0]!r} "
                        f"(known: {', '.join(sorted(RECIPE_SECTIONS))})")


__all__ = [
    "ASK_HOOKS", "DESCRIPTIONS_CACHE", "KNOWN_METHODS", "METHOD_CACHES", "MCLLAVA_CACHE", "METHODS",
    "MYVLM_CACHE", "Method", "MethodContext", "MethodFactory", "NegativePool", "PreparedMethod",
    "RECIPE_SECTIONS", "REGISTRY", "Reference", "Section", "TRAINED_ON_NEGATIVES", "YOLLAVA_CACHE",
    "check_recipe_sections", "count_tokens", "get_method", "make_engine", "negative_pool",
    "prepare_llava_none", "prepare_llava_text", "prepare_mcllava", "prepare_myvlm", "prepare_plvm",
    "prepare_plvm_auto", "prepare_yollava",
]
