"""Resuming an evaluation folder only where nothing that decides the answers changed.

`OUT/items/run.json` holds the test set and each method's fingerprint (fingerprint.py: the
model weights, the recipe's settings that matter to the method, its negatives, plvmctl's
version). A method whose fingerprint differs from the recorded one has its item log and its
cached concepts set aside (`*.previous`) and is asked afresh; the others are resumed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import PlvmError
from ..fileio import write_json_atomic
from ..fingerprint import first_difference
from ..methods import METHOD_CACHES

RUN_FILE = "run.json"


def _set_aside(path: Path) -> None:
    """Move `path` to `path.previous` (replacing an older one)."""
    old = path.with_name(path.name + ".previous")
    if old.is_dir():
        shutil.rmtree(old)
    os.replace(path, old)


def check_run_folder(out_dir: Path, testset_root: str, fingerprints: Mapping[str, Any],
                     echo: Callable[[str], None]) -> dict[str, str]:
    """Resume only what is the same: a method whose answers in `out_dir` were made under another
    fingerprint (or under none recorded) has its item log and its cache set aside and starts
    afresh, said in one line; the others are resumed. Returns {method: what changed}.

    A folder made on another test set is refused (its item keys would mean other photos).
    """
    path = out_dir / "items" / RUN_FILE
    previous: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
    if previous.get("testset") not in (None, testset_root):
        raise PlvmError(f"{out_dir} holds answers for testset {previous['testset']!r}, not "
                        f"{testset_root!r}: pass another --out")
    known = previous.get("methods") if isinstance(previous.get("methods"), dict) else {}
    changed: dict[str, str] = {}
    for name, fingerprint in fingerprints.items():
        log = out_dir / "items" / f"{name}.jsonl"
        if not log.exists() or known.get(name) == fingerprint:
            continue
        changed[name] = (first_difference(known[name], fingerprint) if name in known
                         else "no fingerprint recorded with its answers")
        _set_aside(log)
        cache = out_dir / "cache" / METHOD_CACHES.get(name, "")
        if name in METHOD_CACHES and cache.exists():
            _set_aside(cache)
        echo(f"{name}: asked afresh, what decides its answers changed ({changed[name]}); "
             f"earlier answers in items/{name}.jsonl.previous")
    write_json_atomic(path, {"testset": testset_root, "methods": {**known, **fingerprints}})
    return changed


