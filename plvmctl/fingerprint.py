"""What decides an answer, written down: the fingerprint an evaluation folder is resumed by.

`plvmctl eval --out DIR` resumes a method only when everything that decides its answers is
what it was (`answer_fingerprint`):

- the recipe as resolved after every `--set`: every section, with the sections that belong to
  one other method left out (`METHOD_SECTIONS`: changing `yollava:` does not touch plvm's
  answers) and the settings that decide no answer left out (`NOT_DECIDING`: the batch sizes,
  and how much of an answer `ask` prints);
- the sha256 of the model's, the reference encoder's and the Aligner's files (`weights_digest`;
  cached by path, size and modification time, so a 14 GB model is read once, not every run);
- where a trained method's negative photos came from (`pool` in the method's part);
- the plvmctl version and the sha256 of the package's source (`source_digest`).

Which items are asked (limit, sampled negatives, seed) does not change an answer and is not
in it; the multiple-choice mode is part of every logged answer's key already (an answer by
likelihood is never read as a generated one).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from . import __version__
from .errors import WriteError
from .fileio import sha256_file, write_json_atomic

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_SUFFIXES = (".py", ".json", ".yaml", ".txt")
# Recipe sections read by one method alone: a change there starts that method afresh, no other.
METHOD_SECTIONS = {"yollava": "yollava", "myvlm": "myvlm", "mcllava": "mcllava", "plvm-auto": "retrieval"}
# Settings that do not decide an answer: how many questions go through the model at once, and
# how much of an answer `ask` prints (model.reasoning; but it decides whom plvm-auto finds
# when it verifies candidates together, reading the conclusion of one "Who of ...?" answer).
NOT_DECIDING = {"generation": ("batch_size",), "retrieval": ("batch_size",), "model": ("reasoning",)}
DECIDING_FOR = {"plvm-auto": {"model": ("reasoning",)}}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over the package's source files (name and bytes; the committed assets left out:
    their weights are digested on their own)."""
    digest = hashlib.sha256()
    files = sorted(p for p in PACKAGE_DIR.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                   and "__pycache__" not in p.parts and "assets" not in p.relative_to(PACKAGE_DIR).parts)
    for path in files:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def digest_cache_file() -> Path:
    """Where file digests are remembered: $XDG_CACHE_HOME/plvmctl/sha256.json (~/.cache/...)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "plvmctl" / "sha256.json"


def _file_sha256(path: Path, cache: dict[str, Any]) -> str:
    stat = path.stat()
    key = str(path.resolve())
    known = cache.get(key)
    if known and known.get("size") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns:
        return known["sha256"]
    value = sha256_file(path)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": value}
    return value


def weights_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (relative names and their sha256s, sorted;
    hidden files left out). Each file's sha256 is remembered by (path, size, mtime)."""
    path = Path(path)
    cache_file = digest_cache_file()
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        cache = {}
    before = json.dumps(cache, sort_keys=True)
    if path.is_file():
        value = _file_sha256(path, cache)
    else:
        digest = hashlib.sha256()
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        for file in files:
            digest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file, cache)}\n".encode())
        value = digest.hexdigest()
    if json.dumps(cache, sort_keys=True) != before:
        try:
            write_json_atomic(cache_file, cache)
        except (OSError, WriteError):
            pass  # a cache that cannot be written (full disk, read-only home) only costs time
    return value


def source_weights(recipe, source: str | None, revision: str | None = None) -> str | None:
    """The digest of a recipe's model source: a local file or folder's `weights_digest`; a hub
    id's local snapshot when it is downloaded (else "id@revision"); "tiny" and None as they are."""
    from .runtime import resolve_recipe_path

    if source is None or source == "tiny":
        return source
    local = Path(resolve_recipe_path(recipe, source))
    if local.exists():
        return weights_digest(local)
    try:
        from huggingface_hub import snapshot_download

        return weights_digest(snapshot_download(source, revision=revision, local_files_only=True))
    except Exception:  # not downloaded, or not a hub id: the name is all there is
        return f"{source}@{revision or 'main'}"


def resolved_recipe(recipe, method: str) -> dict[str, Any]:
    """The recipe as resolved, with other methods' sections and the batch sizes left out."""
    others = {section for name, section in METHOD_SECTIONS.items() if name != method}
    data: dict[str, Any] = {name: dataclasses.asdict(getattr(recipe, name))
                            for name in ("model", "encoder", "aligner", "generation")}
    data.update({name: dict(section) for name, section in recipe.sections.items() if name not in others})
    kept = DECIDING_FOR.get(method, {})
    for section, keys in NOT_DECIDING.items():
        if isinstance(data.get(section), dict):
            for key in keys:
                if key not in kept.get(section, ()):
                    data[section].pop(key, None)
    return json.loads(json.dumps(data, sort_keys=True, default=str))


def model_weights(recipe) -> dict[str, str | None]:
    """The digests of the backbone's, the encoder's and the Aligner's files."""
    return {"model": source_weights(recipe, recipe.model.source, recipe.model.revision),
            "encoder": source_weights(recipe, recipe.encoder.source),
            "aligner": source_weights(recipe, recipe.aligner.path)}


def answer_fingerprint(recipe, method: str, weights: Mapping[str, Any],
                       extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that decides `method`'s answers (see the module docstring); `extra` holds
    what only the method knows (where its negatives came from)."""
    return {"plvmctl": {"version": __version__, "source_sha256": source_digest()},
            "recipe": resolved_recipe(recipe, method), "weights": dict(weights),
            "method": json.loads(json.dumps(dict(extra or {}), sort_keys=True, default=str))}


def first_difference(before: Any, now: Any, where: str = "") -> str:
    """The first place two fingerprints differ, as "recipe.generation.max_new_tokens: 64 -> 8"."""
    if isinstance(before, Mapping) and isinstance(now, Mapping):
        for key in sorted(set(before) | set(now)):
            if before.get(key) != now.get(key):
                return first_difference(before.get(key), now.get(key), f"{where}.{key}" if where else key)
        return ""
    shorten = lambda value: (json.dumps(value)[:40] + "…") if len(json.dumps(value)) > 40 else json.dumps(value)  # noqa: E731
    return f"{where}: {shorten(before)} -> {shorten(now)}"
