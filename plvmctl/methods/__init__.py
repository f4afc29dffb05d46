"""The methods `plvmctl eval` compares, as adapters from a test set's references to an engine.

Each method is a factory registered in `METHODS` under its command-line name. A factory takes
a `MethodContext` (the runtime, the concept names with their reference photos, a cache folder)
and returns a `PreparedMethod`: an engine that answers questions mentioning `<name>`, plus
what adding one concept cost (seconds and prompt tokens). Adding a method is one line:

    METHODS["yollava"] = prepare_yollava

One module per method: plvm.py, plvm_auto.py, text.py (llava-text, llava-none), yollava.py, myvlm.py,
mcllava.py; what
they share is in base.py.
"""

from __future__ import annotations

from typing import Mapping

from ..concept import Concept
from ..engine import Engine
from ..errors import PlvmError
from ..store import ConceptStore
from .base import MethodContext, MethodFactory, NegativePool, PreparedMethod, Reference, negative_pool
from .mcllava import MCLLAVA_CACHE, LocatedHook, location_settings, prepare_mcllava
from .myvlm import MYVLM_CACHE, SeenHook, myvlm_settings, prepare_myvlm
from .plvm import prepare_plvm
from .plvm_auto import prepare_plvm_auto
from .text import DESCRIPTIONS_CACHE, count_tokens, prepare_llava_none, prepare_llava_text
from .yollava import YOLLAVA_CACHE, prepare_yollava, yollava_settings

# Every name `--method` may ever take; a name here but not (yet) in METHODS is "not available".
KNOWN_METHODS = ("plvm", "plvm-auto", "yollava", "myvlm", "mcllava", "llava-text", "llava-none")

METHODS: dict[str, MethodFactory] = {
    "plvm": prepare_plvm,
    "llava-text": prepare_llava_text,
    "llava-none": prepare_llava_none,
}
METHODS["yollava"] = prepare_yollava
METHODS["myvlm"] = prepare_myvlm
METHODS["plvm-auto"] = prepare_plvm_auto
METHODS["mcllava"] = prepare_mcllava

# The methods that train on photos of other people, with how each reads its settings (which
# name its index / negatives_dir): `eval` gives them a `negative_pool` before anything runs.
TRAINED_ON_NEGATIVES = {"yollava": yollava_settings, "myvlm": myvlm_settings, "mcllava": location_settings}
# What each method keeps in an evaluation's cache folder (set aside with its answers when what
# decides them changed).
METHOD_CACHES = {"llava-text": DESCRIPTIONS_CACHE, "yollava": YOLLAVA_CACHE, "myvlm": MYVLM_CACHE,
                 "mcllava": MCLLAVA_CACHE}


# The ask-time hooks of the methods that have one, in the order the engine runs them: MyVLM's
# concept heads first, then MC-LLaVA's visual prompt.
ASK_HOOKS = (("myvlm", SeenHook), ("mcllava", LocatedHook))


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


__all__ = [
    "ASK_HOOKS", "DESCRIPTIONS_CACHE", "KNOWN_METHODS",
    "METHOD_CACHES", "MCLLAVA_CACHE", "METHODS", "MYVLM_CACHE", "MethodContext", "MethodFactory", "NegativePool",
    "PreparedMethod", "Reference", "TRAINED_ON_NEGATIVES", "YOLLAVA_CACHE", "negative_pool",
    "count_tokens", "get_method", "make_engine", "prepare_llava_none", "prepare_llava_text",
    "prepare_mcllava", "prepare_myvlm", "prepare_plvm", "prepare_plvm_auto", "prepare_yollava",
]
