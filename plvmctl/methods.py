"""The methods `plvmctl eval` compares, as adapters from a test set's references to an engine.

Each method is a factory registered in `METHODS` under its command-line name. A factory takes
a `MethodContext` (the runtime, the concept names with their reference photos, a cache folder)
and returns a `PreparedMethod`: an engine that answers questions mentioning `<name>`, plus
what adding one concept cost (seconds and prompt tokens). Adding a method is one line:

    METHODS["yollava"] = prepare_yollava
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from .errors import PlvmError
from .fileio import write_json_atomic

# Every name `--method` may ever take; a name here but not (yet) in METHODS is "not available".
KNOWN_METHODS = ("plvm", "yollava", "llava-text", "llava-none")

DESCRIPTION_PROMPT = "Describe the person in this photo in one short sentence."
DESCRIPTION_MAX_NEW_TOKENS = 16  # the paper's "LLaVA + 16-token text prompt" baseline
DESCRIPTIONS_CACHE = "llava-text-descriptions.json"

# Openings a description often starts with that would read badly after "<name> is ...".
_DESCRIPTION_OPENINGS = (
    "the person in this photo is ",
    "the person in the photo is ",
    "the person in the image is ",
    "the person is ",
    "this person is ",
    "this is ",
    "it is ",
    "he is ",
    "she is ",
)


@dataclass(frozen=True)
class Reference:
    """One concept to add: its name (used as `<name>`) and its reference photo."""

    name: str
    path: Path


@dataclass
class MethodContext:
    """What a method factory gets.

    `engine_api` is anything with `Engine` and `AskRequest` attributes: the module
    `plvmctl.engine` in real runs, a fake in tests.
    """

    runtime: Any
    references: list[Reference]
    cache_dir: Path
    engine_api: Any
    batch_size: int | None = None
    progress: bool = False


@dataclass
class PreparedMethod:
    """A method ready to answer: the engine and what one concept cost to add.

    `unavailable` maps a concept name to why it could not be made (e.g. an unreadable
    reference photo); the evaluation skips that concept's items and says why.
    """

    name: str
    engine: Any
    seconds_per_concept: float | None
    tokens_per_concept: float | None
    unavailable: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


MethodFactory = Callable[[MethodContext], PreparedMethod]


def prepare_plvm(context: MethodContext) -> PreparedMethod:
    """PLVM: one concept per reference from the Aligner (`runtime.encode_concept`), timed.

    The runtime loads the encoder and the Aligner on first use, so one untimed warm-up
    encode comes first: seconds per concept is the cost of adding a concept, not of loading.
    """
    concepts: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    seconds = 0.0
    if context.references:
        try:
            context.runtime.encode_concept(context.references[0].name, context.references[0].path)
        except PlvmError:
            pass  # the loop below records why that reference cannot be used
    bar = tqdm(context.references, desc="plvm: encode concepts", unit="concept",
               disable=not context.progress)
    for reference in bar:
        started = time.perf_counter()
        try:
            concept = context.runtime.encode_concept(reference.name, reference.path)
        except PlvmError as error:
            unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        seconds += time.perf_counter() - started
        concepts[reference.name] = concept
    tokens = [float(concept.num_context) for concept in concepts.values()]
    engine = context.engine_api.Engine(context.runtime, concepts)
    return PreparedMethod(
        name="plvm",
        engine=engine,
        seconds_per_concept=seconds / len(concepts) if concepts else None,
        tokens_per_concept=sum(tokens) / len(tokens) if tokens else None,
        unavailable=unavailable,
    )


def clean_description(text: str | None) -> str:
    """Turn a generated description into the `{text}` of "<name> is {text}."

    Keeps the first line, drops quotes, a trailing full stop and openings such as
    "This is"; lower-cases a leading article ("A woman" -> "a woman").
    """
    stripped = (text or "").strip()
    line = stripped.splitlines()[0].strip("\"'` ") if stripped else ""
    lowered = line.lower()
    for opening in _DESCRIPTION_OPENINGS:
        if lowered.startswith(opening):
            line = line[len(opening):]
            break
    line = line.rstrip(" .!,;:").strip()
    first, _, rest = line.partition(" ")
    if first in ("A", "An", "The"):
        line = first.lower() + (" " + rest if rest else "")
    return line


def count_tokens(runtime: Any, text: str) -> int | None:
    """Tokens of `text` in the runtime's tokenizer, or None when the runtime has none we know."""
    tokenizer = getattr(getattr(runtime, "backbone", None), "tokenizer", None)
    if tokenizer is None:
        tokenizer = getattr(runtime, "tokenizer", None)
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        return None
    try:
        return len(encode(text, add_special_tokens=False))
    except TypeError:
        return len(encode(text))


def _load_description_cache(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache is only a cache: write the descriptions again
    return data if isinstance(data, dict) else {}


def prepare_llava_text(context: MethodContext) -> PreparedMethod:
    """LLaVA + text prompt: the base model describes each reference in about 16 tokens,
    then every question carries "<name> is {description}." in plain words.

    Descriptions are cached in `cache_dir`; a cached one is reused while its reference path
    is unchanged. Seconds per concept is each description batch's wall time divided by its
    size (cached entries keep the time measured when they were written).
    """
    cache_path = context.cache_dir / DESCRIPTIONS_CACHE
    cache = _load_description_cache(cache_path)
    todo = [ref for ref in context.references
            if cache.get(ref.name, {}).get("reference") != str(ref.path)]
    unavailable: dict[str, str] = {}
    if todo:
        base = context.engine_api.Engine(context.runtime, {})
        requests = [context.engine_api.AskRequest(DESCRIPTION_PROMPT, ref.path) for ref in todo]
        started = time.perf_counter()
        results = base.ask(requests, batch_size=context.batch_size,
                           max_new_tokens=DESCRIPTION_MAX_NEW_TOKENS, progress=context.progress)
        per_item = (time.perf_counter() - started) / len(todo)
        for ref, result in zip(todo, results):
            if result.error is not None:
                unavailable[ref.name] = f"description failed: {result.error}"
                continue
            text = clean_description(result.answer)
            if not text:
                unavailable[ref.name] = "description failed: the model wrote nothing"
                continue
            cache[ref.name] = {
                "reference": str(ref.path),
                "raw": result.answer,
                "text": text,
                "seconds": per_item,
                "tokens": count_tokens(context.runtime, text),
            }
        write_json_atomic(cache_path, cache)
    descriptions: dict[str, str] = {}
    seconds: list[float] = []
    tokens: list[float] = []
    for ref in context.references:
        entry = cache.get(ref.name)
        if ref.name in unavailable or entry is None:
            continue
        descriptions[ref.name] = entry["text"]
        seconds.append(float(entry["seconds"]))
        counted = entry.get("tokens")
        tokens.append(float(counted if counted is not None else DESCRIPTION_MAX_NEW_TOKENS))
    engine = context.engine_api.Engine(context.runtime, {}, descriptions=descriptions)
    return PreparedMethod(
        name="llava-text",
        engine=engine,
        seconds_per_concept=sum(seconds) / len(seconds) if seconds else None,
        tokens_per_concept=sum(tokens) / len(tokens) if tokens else None,
        unavailable=unavailable,
        details={"descriptions": descriptions, "descriptions_file": str(cache_path)},
    )


def prepare_llava_none(context: MethodContext) -> PreparedMethod:
    """Plain LLaVA with no personal information: `<name>` stays literal text in the prompt."""
    engine = context.engine_api.Engine(context.runtime, {}, literal_names=True)
    return PreparedMethod(name="llava-none", engine=engine, seconds_per_concept=0.0,
                          tokens_per_concept=0.0)


YOLLAVA_CACHE = "yollava"


def prepare_yollava(context: MethodContext) -> PreparedMethod:
    """Yo'LLaVA: one concept TRAINED per identity (plvmctl.train.yollava), cached on disk.

    Positives are the reference photo and any other `ref_img*` beside it. Negatives come
    from the recipe's `yollava.index` (hard + random) when it names one, else from
    `yollava.negatives_dir`, else they are the other identities' reference photos (never a
    query photo). Each concept is written to `cache_dir/yollava/NAME.concept` (its run folder
    beside it) and reused while the model, the photos and the settings are unchanged. Seconds
    per concept is the wall time of making it (conversations, vision features, training),
    the time stored in the concept when it comes from the cache.
    """
    from .concept import Concept
    from .train.yollava import (
        YollavaConfig,
        config_digest,
        gather_negatives,
        photos_digest,
        reference_photos,
        train_yollava,
    )

    runtime = context.runtime
    config = runtime.recipe.section("yollava", YollavaConfig)
    config.validate()
    folder = context.cache_dir / YOLLAVA_CACHE
    fingerprint = runtime.backbone.fingerprint
    concepts: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    seconds: list[float] = []
    bar = tqdm(context.references, desc="yollava: train concepts", unit="concept",
               disable=not context.progress)
    for reference in bar:
        path = folder / f"{reference.name}.concept"
        try:
            positives = reference_photos(reference.path)
            wanted = {"positives_sha256": photos_digest(positives), "config_sha256": config_digest(config)}
            try:
                cached = Concept.load(path) if path.is_file() else None
            except PlvmError:
                cached = None  # a damaged cache entry is only trained again
            if cached is not None and cached.meta.base_model == fingerprint and all(
                    cached.meta.extra.get(key) == value for key, value in wanted.items()):
                concepts[reference.name] = cached.renamed(reference.name)
                seconds.append(float(cached.meta.extra.get("seconds", "nan")))
                continue
            if config.index or config.negatives_dir:
                negatives = gather_negatives(runtime, positives, config, index=config.index,
                                             negatives_dir=config.negatives_dir).photos
            else:
                negatives = [other.path for other in context.references if other.name != reference.name]
            result = train_yollava(runtime, reference.name, positives, negatives, config,
                                   folder / reference.name, progress=context.progress)
        except PlvmError as error:
            unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        result.concept.save(path)
        concepts[reference.name] = result.concept
        seconds.append(result.seconds["total"])
    engine = context.engine_api.Engine(runtime, concepts)
    return PreparedMethod(
        name="yollava",
        engine=engine,
        seconds_per_concept=sum(seconds) / len(seconds) if seconds else None,
        tokens_per_concept=float(config.num_context) if concepts else None,
        unavailable=unavailable,
        details={"concepts_folder": str(folder), "epochs": config.epochs,
                 "num_context": config.num_context},
    )


METHODS: dict[str, MethodFactory] = {
    "plvm": prepare_plvm,
    "llava-text": prepare_llava_text,
    "llava-none": prepare_llava_none,
}
METHODS["yollava"] = prepare_yollava


def get_method(name: str) -> MethodFactory:
    """The factory registered under `name`; PlvmError for unknown or not-yet-available names."""
    if name in METHODS:
        return METHODS[name]
    if name in KNOWN_METHODS:
        available = ", ".join(METHODS)
        raise PlvmError(f"method {name!r} is not available in this build (available: {available})")
    known = ", ".join(sorted(set(KNOWN_METHODS) | set(METHODS)))
    raise PlvmError(f"unknown method {name!r} (known: {known})")
