"""The baselines without soft tokens: `llava-text` (the base model describes the reference in
about 16 tokens, the question carries that description) and `llava-none` (no personal
information, `<name>` stays literal text)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ...answers import DESCRIPTION_MAX_NEW_TOKENS, DESCRIPTION_PROMPT, clean_description
from ...fileio import write_json_atomic
from ..base import MethodContext, PreparedMethod

DESCRIPTIONS_CACHE = "llava-text-descriptions.json"

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
