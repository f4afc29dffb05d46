"""Recipes: YAML files that say what differs from the defaults in code.

A recipe is read top to bottom into typed dataclasses; unknown keys and wrong types are
errors that name the key. `--set section.key=value` overrides any value (the value is parsed
as YAML, so `--set generation.max_new_tokens=32` gives an int).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .answers import REASONING_STYLES
from .errors import PlvmError

PACKAGE_DIR = Path(__file__).resolve().parent
# Named recipes: the top-level recipes/ folder of a source checkout (the source of truth), then
# the copy an installed package ships as plvmctl/recipes (pyproject.toml's package-dir).
_CHECKOUT = PACKAGE_DIR.parent
RECIPES_DIRS = ((_CHECKOUT / "recipes",) if (_CHECKOUT / "pyproject.toml").is_file() else ()) \
    + (PACKAGE_DIR / "recipes",)
# What `plvmctl` runs without --recipe: the pocket model, trained and offline. `tiny` (random
# weights) is for tests and for trying the machinery.
DEFAULT_RECIPE = "pocket"


@dataclass
class ModelSection:
    """The LLaVA-family backbone."""

    source: str = "tiny"  # "tiny" (random, built from configs), a hub id, or a local folder
    revision: str | None = None
    # auto (bf16 on GPU, fp16 there with the released Aligner, fp32 on CPU) | float32 | bfloat16 | float16
    dtype: str = "auto"
    quantization: str = "none"  # none | 8bit | 4bit (needs bitsandbytes and a GPU)
    # pad (LLaVA-1.5's pad-to-square, mean colour) | crop; unset: the family's own (pad for
    # LLaVA-1.5). LLaVA-OneVision tiles photos by anyres and refuses it.
    image_preprocess: str | None = None
    template: str = "auto"  # auto (the model family's own) | vicuna_v1 | pocket
    # How prompt text becomes ids: natural (the whole text at once, concept slots as words) |
    # per_piece (PLVM's released code: the text after a concept word or after <image> is
    # tokenized on its own; the released Aligner was trained on those ids)
    prompt_pieces: str = "natural"
    seed: int = 0  # for the random tiny parts only (refused when the recipe has none)
    # How the model answers: none (it says its answer) | comparison (it compares everyone in
    # the photo with the concept first, as the pocket model; `ask` and `chat` then print the
    # conclusion, and the whole answer with -v or --json)
    reasoning: str = "none"


@dataclass
class EncoderSection:
    """The frozen reference encoder (DINOv2 by default)."""

    source: str = "tiny"  # "tiny", a hub id (facebook/dinov2-base) or a local folder


@dataclass
class AlignerSection:
    """Where the Aligner comes from: a folder (config.json + model.safetensors) or, with the
    tiny recipe, a random one built from `layout` and `num_context`."""

    path: str | None = None
    layout: str = "paper"  # paper | released
    num_context: int = 16
    # at most this many reference photos make one concept (`encode a.jpg b.jpg ...`,
    # `concepts add-photo`; plvmctl/references.py)
    max_references: int = 8


@dataclass
class GenerationSection:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    seed: int = 0


@dataclass
class Recipe:
    name: str = "tiny"
    store: str = "concepts"
    model: ModelSection = field(default_factory=ModelSection)
    encoder: EncoderSection = field(default_factory=EncoderSection)
    aligner: AlignerSection = field(default_factory=AlignerSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    # Sections owned by other commands (train, eval, toy, yollava ...) stay plain dicts here
    # and are parsed into their own dataclasses by the module that uses them.
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    path: Path | None = None

    def section(self, name: str, cls: type):
        """Parse an extra section (e.g. `train`) into dataclass `cls`, defaults filled in."""
        return build_dataclass(cls, self.sections.get(name, {}), name)


_TYPED_SECTIONS = {"model", "encoder", "aligner", "generation"}
# The sections the core reads (`train`: the Aligner trainer, `eval`: the evaluation,
# `retrieval`: who is in a photo, `serve`: the HTTP server); each method adds its own
# (plvmctl.methods.RECIPE_SECTIONS).
CORE_SECTIONS = ("store", "model", "encoder", "aligner", "generation", "train", "eval", "retrieval", "serve")


def _check_value(expected, value, where: str):
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(expected)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(option, value, where)
            except PlvmError as error:
                errors.append(str(error))
        raise PlvmError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PlvmError(f"{where}: expected a list, got {value!r}")
        (item_type, *_) = typing.get_args(expected) or (Any,)
        return [_check_value(item_type, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict or expected is dict:
        if not isinstance(value, dict):
            raise PlvmError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if expected is Any:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise PlvmError(f"{where}: expected a number, got {value!r}") from None
    if expected is bool and not isinstance(value, bool):
        raise PlvmError(f"{where}: expected true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PlvmError(f"{where}: expected an integer, got {value!r}")
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(expected, type) and not isinstance(value, expected):
        raise PlvmError(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def build_dataclass(cls: type, data: dict[str, Any] | None, where: str):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    data = data or {}
    if not isinstance(data, dict):
        raise PlvmError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PlvmError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})"
        )
    values = {key: _check_value(hints[key], value, f"{where}.{key}") for key, value in data.items()}
    return cls(**values)


def known_recipes() -> dict[str, Path]:
    """Every named recipe → its file, the checkout's recipes/ before the installed copy."""
    found: dict[str, Path] = {}
    for folder in RECIPES_DIRS:
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def resolve_recipe_path(name_or_path: str) -> Path:
    """`NAME` → recipes/NAME.yaml; anything with a slash or .yaml suffix is a path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or "/" in name_or_path or candidate.exists():
        if not candidate.is_file():
            raise PlvmError(f"recipe file not found: {candidate}")
        return candidate
    known = known_recipes()
    if name_or_path not in known:
        raise PlvmError(f"unknown recipe {name_or_path!r} (known: {', '.join(known) or 'none'})")
    return known[name_or_path]


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise PlvmError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise PlvmError(f"--set: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise PlvmError(f"--set {text}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def load_recipe(name_or_path: str = DEFAULT_RECIPE, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe by name or path, apply `--set` overrides, validate everything."""
    path = resolve_recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PlvmError(f"malformed recipe {path}{where}: {getattr(error, 'problem', error)}") from error
    if not isinstance(data, dict):
        raise PlvmError(f"malformed recipe {path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return recipe_from_dict(data, name=data.get("name") or path.stem, path=path)


def recipe_from_dict(data: dict[str, Any], name: str = "custom", path: Path | None = None) -> Recipe:
    data = dict(data)
    data.pop("name", None)
    typed = {
        "model": ModelSection,
        "encoder": EncoderSection,
        "aligner": AlignerSection,
        "generation": GenerationSection,
    }
    kwargs: dict[str, Any] = {"name": str(name), "path": path}
    if "store" in data:
        kwargs["store"] = _check_value(str, data.pop("store"), "store")
    for key, cls in typed.items():
        kwargs[key] = build_dataclass(cls, data.pop(key, None), key)
    sections = {}
    for key, value in data.items():
        if not isinstance(value, dict):
            raise PlvmError(f"recipe key {key!r}: expected a section (mapping), got {value!r}")
        sections[key] = value
    kwargs["sections"] = sections
    recipe = Recipe(**kwargs)
    _validate(recipe)
    return recipe


def _validate(recipe: Recipe) -> None:
    def choice(where: str, value: str, allowed: tuple[str, ...]):
        if value not in allowed:
            raise PlvmError(f"{where}: {value!r} is not one of {', '.join(allowed)}")

    choice("model.dtype", recipe.model.dtype, ("auto", "float32", "bfloat16", "float16"))
    choice("model.quantization", recipe.model.quantization, ("none", "8bit", "4bit"))
    if recipe.model.image_preprocess is not None:
        choice("model.image_preprocess", recipe.model.image_preprocess, ("pad", "crop"))
    choice("model.prompt_pieces", recipe.model.prompt_pieces, ("natural", "per_piece"))
    choice("model.reasoning", recipe.model.reasoning, REASONING_STYLES)
    choice("aligner.layout", recipe.aligner.layout, ("paper", "released"))
    if recipe.aligner.num_context < 1:
        raise PlvmError("aligner.num_context: must be at least 1")
    if recipe.aligner.max_references < 1:
        raise PlvmError("aligner.max_references: must be at least 1")
    if recipe.generation.max_new_tokens < 1:
        raise PlvmError("generation.max_new_tokens: must be at least 1")
    if recipe.generation.batch_size < 1:
        raise PlvmError("generation.batch_size: must be at least 1")
    refuse_unused_settings(recipe)


def refuse_unused_settings(recipe: Recipe) -> None:
    """A setting nothing would read is an error, not a silent no-op: the sampling knobs with
    sampling off, the random presets' seed with no random part, a hub model's revision or
    quantization on the tiny preset. The family-specific ones (image_preprocess on
    LLaVA-OneVision) are refused where the family is known, in backbone.load_backbone."""
    generation, defaults = recipe.generation, GenerationSection()
    if not generation.do_sample:
        for key in ("temperature", "top_p", "top_k", "seed"):
            if getattr(generation, key) != getattr(defaults, key):
                raise PlvmError(f"generation.{key}={getattr(generation, key)} is unused with sampling off: "
                                "set generation.do_sample=true as well (`ask --sample`)")
    model = recipe.model
    if model.source == "tiny":
        if model.revision is not None:
            raise PlvmError("model.revision is for hub models; model.source=tiny is built from configs")
        if model.quantization != "none":
            raise PlvmError(f"model.quantization={model.quantization} is for real models; "
                            "model.source=tiny is built in float from configs")
    random_parts = model.source == "tiny" or recipe.encoder.source == "tiny" or recipe.aligner.path is None
    if model.seed != 0 and not random_parts:
        raise PlvmError(f"model.seed={model.seed} seeds the random tiny parts only; this recipe's model, "
                        "encoder and Aligner are all loaded from weights")
