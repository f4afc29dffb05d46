"""The item log, `OUT/items/<method>.jsonl`: every answered item of a method, one JSON line,
appended as soon as its batch returns, so an interrupted evaluation resumes by asking only
what is not there yet. A record keeps the raw answer (or the options' scores); reading the
log back pairs each item with its record and says why an item is not scored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..answers import parse_mcq_answer, parse_yes_no, pick_by_likelihood
from ..fileio import writing
from .items import TASKS, EvalItem, answer_mode


class ItemLog:
    """`OUT/items/<method>.jsonl`: one JSON line per answered item, appended and flushed.

    Records are looked up by (key, mode); a later line for the same pair wins. A damaged
    line (from a crash mid-write) is ignored and the file is re-terminated before appending.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self._fd: int | None = None
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.records[(record["key"], record["mode"])] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def done(self, key: str, mode: str) -> bool:
        """True when the item has an answer without an error."""
        record = self.records.get((key, mode))
        return record is not None and record.get("error") is None

    def append(self, records: list[dict[str, Any]]) -> None:
        with writing(self.path):  # a full disk: `cannot write <this log>: <reason>`
            self._append(records)

    def _append(self, records: list[dict[str, Any]]) -> None:
        """One batch, one appending `os.write` loop: a failure anywhere leaves the batch out of
        `records`, and at worst a torn last line on disk, which a later read skips."""
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, 2)
                    if existing.read(1) != b"\n":
                        text = "\n" + text
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        for record in records:
            self.records[(record["key"], record["mode"])] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



def predict(item: EvalItem, record: Mapping[str, Any]) -> str | None:
    """The answer an item's logged record gives: "yes" / "no", an option letter, or None."""
    if item.task == "recognition":
        return parse_yes_no(record.get("answer"))
    if record.get("scores") is not None:
        letters = [letter for letter, _ in item.options]
        return pick_by_likelihood(letters, [record["scores"].get(letter) for letter in letters])
    return parse_mcq_answer(record.get("answer"), item.options)


def logged_items(items: dict[str, list[EvalItem]], log: ItemLog, mcq: str,
                 unavailable: Mapping[str, str] | None = None):
    """Per item of each task, in order: (task, item, its logged record, why it is not scored
    or None). Its record is None when the item is skipped."""
    for task in TASKS:
        mode = answer_mode(task, mcq)
        for item in items[task]:
            record = log.records.get((item.key, mode))
            reason = item.missing or (unavailable or {}).get(item.identity)
            if reason is None and record is None:
                reason = "not answered"
            if reason is None and record.get("error") is not None:
                reason = f"engine error: {record['error']}"
            yield task, item, (None if reason else record), reason

