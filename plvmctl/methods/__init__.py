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
- `trains_on_negatives`: trained on photos of other people (`eval` gives it a
  `negative_pool`, from the index or negatives_dir its section names, before anything runs);
- `page`: its documentation page.

Each method's folder holds adapter.py (the eval adapter), and as it has them trainer.py, cli.py
and hook.py; its __init__.py holds its `RECORDS`. What the adapters share is in base.py (with
`Method` itself), what the trainers share in plvmctl/train/per_concept.py and
plvmctl/train/soft_prompt.py. Adding a method is one folder plus its name in `FOLDERS` below;
tests/test_methods_registry.py checks every record.
"""

from __future__ import annotations

from typing import Mapping

from ..concept import Concept
from ..engine import Engine
from ..errors import PlvmError
from ..recipe import CORE_SECTIONS
from ..store import ConceptStore
from . import mcllava, myvlm, plvm, plvm_auto, text, yollava
from .base import (Method, MethodContext, MethodFactory, NegativePool, PreparedMethod, Reference, Section,
                   negative_pool)
from .text.adapter import count_tokens

# The method folders, in the order `eval --method` lists their records; the ask-time hooks run
# in this order too (MyVLM's concept heads first, then MC-LLaVA's visual prompt).
FOLDERS = (plvm, plvm_auto, yollava, myvlm, mcllava, text)
REGISTRY: tuple[Method, ...] = tuple(record for folder in FOLDERS for record in folder.RECORDS)

# Every name `--method` may ever take; a name here but not in METHODS is "not available".
KNOWN_METHODS = tuple(method.name for method in REGISTRY)
METHODS: dict[str, MethodFactory] = {method.name: method.prepare for method in REGISTRY
                                     if method.prepare is not None}
# The methods that train on photos of other people, with how each reads its settings (which
# name its index / negatives_dir): `eval` gives them a `negative_pool` before anything runs.
TRAINED_ON_NEGATIVES = {method.name: method.section.read for method in REGISTRY if method.trains_on_negatives}
# What each method keeps in an evaluation's cache folder (set aside with its answers when what
# decides them changed).
METHOD_CACHES = {method.name: method.cache for method in REGISTRY if method.cache is not None}
# The ask-time hooks of the methods that have one, in the order the engine runs them.
ASK_HOOKS = tuple((method.name, method.hook) for method in REGISTRY if method.hook is not None)
# Every section a recipe may have: the core's and the methods'.
RECIPE_SECTIONS = CORE_SECTIONS + tuple(method.section.name for method in REGISTRY if method.section is not None)


def make_engine(runtime, concepts: Mapping[str, Concept] | ConceptStore | None = None,
                descriptions: Mapping[str, str] | None = None, literal_names: bool = False, *,
                locate: bool = True, generation=None) -> Engine:
    """An Engine that runs every method's ask-time hook, so a concept behaves as its method
    made it. `locate=False` leaves out MC-LLaVA's visual prompt (`plvmctl ask --no-location`);
    `generation` decodes otherwise than the recipe says (Engine)."""
    hooks = [hook() for method, hook in ASK_HOOKS if locate or method != "mcllava"]
    return Engine(runtime, concepts, descriptions=descriptions, literal_names=literal_names, hooks=hooks,
                  generation=generation)


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
    "ASK_HOOKS", "FOLDERS", "KNOWN_METHODS", "METHOD_CACHES", "METHODS", "Method", "MethodContext",
    "MethodFactory", "NegativePool", "PreparedMethod", "RECIPE_SECTIONS", "REGISTRY", "Reference", "Section",
    "TRAINED_ON_NEGATIVES", "check_recipe_sections", "count_tokens", "get_method", "make_engine",
    "negative_pool",
]
