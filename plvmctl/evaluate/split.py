"""An evaluation split over the processes accelerate or torchrun launched (plvmctl.shards).

Every rank prepares each method, then asks its share of the items (balanced by cost: a photo's
image tokens and the question's length) and appends the answers to its own item log,
`items/<method>.jsonl.parts/rank-R.jsonl`, every rank seeing the method's main log as already
answered. When all ranks are done with a method (a torch.distributed barrier), rank 0 appends
their records to `items/<method>.jsonl` in the order one process would have written them,
removes the rank logs, scores the method and, at the end, writes the report. Rank logs left by
a run that died are folded into the main log when the next run starts (with any process count,
before resume.py decides whether they still hold), so what they answered is not asked again. With one process nothing of this happens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from ..shards import Process, assign, barrier, current_process, ensure_process_group, parts_folder
from .itemlog import ItemLog
from .items import EvalItem

IMAGE_TOKENS = 576  # LLaVA-1.5's image tokens: the cost of a photo when the model cannot say


class EvalSplit:
    """Which items this rank asks and the merge of the ranks' item logs (see the module)."""

    def __init__(self, runtime: Any = None, process: Process | None = None):
        """`process` defaults to the launcher's (joining the ranks' process group); a given
        one joins none, and its caller plays the ranks in turn (tests)."""
        self.backbone = getattr(runtime, "backbone", None)
        self.process = process or current_process()
        if process is None and self.process.several:
            ensure_process_group(self.process)

    def _cost(self, item: EvalItem) -> float:
        image_tokens = 0
        if item.image is not None:
            try:
                image_tokens = sum(self.backbone.image_token_counts([item.image]))
            except Exception:  # no model to ask (a fake runtime) or an unreadable photo
                image_tokens = IMAGE_TOKENS
        return image_tokens + len(item.question) / 4

    def mine(self, items: Sequence[EvalItem]) -> list[EvalItem]:
        """This rank's share of `items` (all of them with one process), in their order."""
        if not self.process.several:
            return list(items)
        share = assign([self._cost(item) for item in items], self.process.world_size)[self.process.rank]
        return [items[index] for index in share]

    def started(self, logs: Sequence[Path], check: Callable[[], dict]) -> dict:
        """Before any method is asked: rank 0 (or the only process) folds the rank logs a run
        that died left into their main `logs`, then runs `check` (which sets aside the logs of
        methods whose answers no longer hold) and returns what it returns; every rank waits
        for it, and the others get {}."""
        result: dict = {}
        if self.process.is_main:
            for log in logs:
                folder = parts_folder(log)
                if folder.is_dir():
                    _append(log, [record for path in sorted(folder.glob("rank-*.jsonl"))
                                  for record in _records(path)])
                    shutil.rmtree(folder)
            result = check()
        barrier()
        return result

    def item_log(self, path: Path) -> ItemLog:
        """The log this rank appends to: the main log with one process, else its rank log,
        which counts the main log's answers as its own."""
        if not self.process.several:
            return ItemLog(path)
        log = ItemLog(parts_folder(path) / f"rank-{self.process.rank}.jsonl")
        log.records = {**ItemLog(path).records, **log.records}
        return log

    def merge(self, log: ItemLog, path: Path, lists: Sequence[Sequence[EvalItem]]) -> tuple[ItemLog | None, int]:
        """After every rank asked a method (`log` is this rank's): on rank 0, the main log
        `path` with every rank's answers appended in the order of `lists` (the items as one
        process asks them) and how many records came from the other ranks; (None, 0) on the
        other ranks. One process: `log` itself."""
        if not self.process.several:
            return log, 0
        barrier()
        if not self.process.is_main:
            return None, 0
        folder = parts_folder(path)
        position = {}
        for item in (item for items in lists for item in items):
            position.setdefault((item.task, item.key), len(position))
        records = []
        others = 0
        for rank_log in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
            found = _records(rank_log)
            records += found
            others += len(found) if rank_log.name != f"rank-{self.process.rank}.jsonl" else 0
        records.sort(key=lambda record: position.get((record.get("task"), record.get("key")), len(position)))
        _append(path, records)
        shutil.rmtree(folder, ignore_errors=True)
        return ItemLog(path), others


def _records(path: Path) -> list[dict]:
    """Every readable record of an item log file, in its order (a torn line is skipped)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record and "mode" in record:
            records.append(record)
    return records


def _append(path: Path, records: list[dict]) -> None:
    if records:
        log = ItemLog(path)
        try:
            log.append(records)
        finally:
            log.close()
