"""Work split across processes: which rank am I, which items are mine, and the merge on rank 0.

`accelerate launch` and `torchrun` start one process per GPU and tell each its place through
the environment (RANK, WORLD_SIZE, LOCAL_RANK). A command that answers many items (`ask
--batch`, `find --json`, `index build`) gives each rank a disjoint, deterministic shard of
them, balanced by a cost (a photo with many image tokens costs more): items go, largest cost
first (ties by input order), to the rank with the least cost so far (ties to the lower rank).

Each rank writes its rows to its own partial file, `OUT.parts/rank-R.jsonl`, rewritten
atomically after every chunk, so a rank that dies leaves what it had finished. Each line holds
an item's input index, a key of its input (a changed input is asked again) and its row. The
shard is drawn over every item of the input and a rank skips the items some partial file
already answers: every rank sees the same shards whatever the others have written so far, so
no item is asked twice or lost, whatever process count the rerun has. When all ranks are done
(torch.distributed's barrier when a process group is initialised, else rank 0 waits until
the partial files hold every item), rank 0 merges the rows in input order and the command
writes its output as one process would, then removes OUT.parts. With one process and no
OUT.parts folder, none of this is used and nothing changes.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import PlvmError
from .fileio import write_text_atomic

MERGE_TIMEOUT_ENV = "PLVM_MERGE_TIMEOUT"  # seconds rank 0 waits for the other ranks' shards
DEFAULT_MERGE_TIMEOUT = 6 * 3600.0
POLL_SECONDS = 0.5  # how often rank 0 rereads the partial files while it waits


@dataclass(frozen=True)
class Process:
    """This process's place among those launched together (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise PlvmError(f"{name}={value!r} is not a whole number (set by accelerate launch or torchrun)") from None


def current_process() -> Process:
    """Rank, world size and local rank from the environment accelerate and torchrun set."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise PlvmError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return Process(rank, world, local)


def assign(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Split item indices over `world_size` ranks, balanced by cost: greedy, largest cost first
    (ties by index), each to the least-loaded rank (ties to the lower rank). Each rank's
    indices come back in input order. Deterministic: every rank computes the same split."""
    if world_size < 1:
        raise PlvmError(f"cannot split work over {world_size} processes")
    loads = [0.0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        shards[rank].append(index)
        loads[rank] += float(costs[index])
    return [sorted(shard) for shard in shards]


def item_key(*parts: Any) -> str:
    """A short, stable key of an item's input (what decides its answer)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def parts_folder(out: str | os.PathLike) -> Path:
    """Where the partial files of output `out` live: `OUT.parts/` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


class ShardedRun:
    """One command's items split over the launched processes (see the module's docstring).

    `keys` are the items' input keys, in input order; `costs` their costs. `todo` is this
    rank's share still unanswered; `save` records rows; `finish` waits for every rank and
    returns, on rank 0, every item's row in input order (None on the other ranks).
    """

    def __init__(self, out: str | os.PathLike, keys: Sequence[str], costs: Sequence[float],
                 process: Process | None = None):
        self.process = process or current_process()
        self.folder = parts_folder(out)
        self.keys = list(keys)
        if len(costs) != len(self.keys):
            raise PlvmError(f"{len(costs)} costs for {len(self.keys)} items")
        self.path = self.folder / f"rank-{self.process.rank}.jsonl"
        self.own = self._read(self.path)  # lines this rank wrote before (any earlier run)
        self.done = self._answered()
        shard = assign(costs, self.process.world_size)[self.process.rank]
        self.todo = [index for index in shard if index not in self.done]

    @staticmethod
    def wanted(out: str | os.PathLike | None, process: Process | None = None) -> bool:
        """True when the work is split: several processes, or partial files of `out` to
        resume from."""
        process = process or current_process()
        return process.several or (out is not None and parts_folder(out).is_dir())

    @staticmethod
    def _read(path: Path) -> list[dict]:
        lines = []
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    if isinstance(record, dict) and {"index", "key", "row"} <= record.keys():
                        lines.append(record)
                except json.JSONDecodeError:
                    continue
        return lines

    def _answered(self) -> dict[int, Any]:
        """Index → row of every item some partial file answers for the input as it is now."""
        rows: dict[int, Any] = {}
        for path in sorted(self.folder.glob("rank-*.jsonl")) if self.folder.is_dir() else []:
            for record in self.own if path == self.path else self._read(path):
                index = record["index"]
                if isinstance(index, int) and 0 <= index < len(self.keys) and record["key"] == self.keys[index]:
                    rows[index] = record["row"]
        return rows

    def save(self, rows: dict[int, Any]) -> None:
        """Add `rows` (index → row) to this rank's partial file, rewritten atomically."""
        for index, row in sorted(rows.items()):
            self.own.append({"index": index, "key": self.keys[index], "row": row})
            self.done[index] = row
        write_text_atomic(self.path, "".join(json.dumps(record) + "\n" for record in self.own))

    def finish(self, timeout: float | None = None) -> list[Any] | None:
        """Wait for every rank; rank 0 gets every item's row in input order, the others None."""
        barrier()
        if not self.process.is_main:
            return None

        def covered() -> bool:
            self.own = self._read(self.path)
            return len(self._answered()) == len(self.keys)

        wait_for(covered, lambda: f"{len(self.keys) - len(self._answered())} of {len(self.keys)} items "
                 f"still unanswered; their partial files are kept in {self.folder}", timeout)
        rows = self._answered()
        return [rows[index] for index in range(len(self.keys))]

    @staticmethod
    def clean_after(out: str | os.PathLike) -> None:
        """Remove the partial files of `out` once the merged output is written (rank 0)."""
        shutil.rmtree(parts_folder(out), ignore_errors=True)


def in_process_group() -> bool:
    """True when torch.distributed has a process group (so `barrier` holds every rank)."""
    import torch.distributed as dist  # lazy: the commands that never split start faster

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Every rank waits for the others here when torch.distributed has a process group (as
    under `accelerate launch` once an Accelerator exists); otherwise it returns at once and
    rank 0 waits for the partial files (`wait_for`)."""
    import torch.distributed as dist  # lazy: the commands that never split start faster

    if in_process_group():
        dist.barrier()


def wait_for(ready: Callable[[], bool], missing: Callable[[], str], timeout: float | None = None) -> None:
    """Poll `ready()` until it holds (rank 0 waiting for the other ranks' files), at most
    `timeout` seconds (PLVM_MERGE_TIMEOUT, default six hours); then a PlvmError that says what
    is `missing()` and that a rerun resumes."""
    if timeout is None:
        timeout = float(os.environ.get(MERGE_TIMEOUT_ENV, DEFAULT_MERGE_TIMEOUT))
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() >= deadline:
            raise PlvmError(f"waited {timeout:.0f} s for the other ranks: {missing()}; "
                            "a rerun resumes from what they wrote")
        time.sleep(POLL_SECONDS)


def ensure_process_group(process: Process | None = None) -> None:
    """Join the processes' torch.distributed group (gloo: it only carries barriers here, on
    any device) when several were launched and none is set up yet, so `barrier` holds every
    rank. Its timeout is PLVM_MERGE_TIMEOUT. accelerate launch and torchrun set MASTER_ADDR and
    MASTER_PORT; without them this is a PlvmError."""
    import torch.distributed as dist  # lazy: the commands that never split start faster

    process = process or current_process()
    if not process.several or dist.is_initialized():
        return
    if not ("MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ):
        raise PlvmError(f"WORLD_SIZE={process.world_size} without MASTER_ADDR and MASTER_PORT: launch "
                        "with `accelerate launch` or `torchrun`")
    timeout = float(os.environ.get(MERGE_TIMEOUT_ENV, DEFAULT_MERGE_TIMEOUT))
    dist.init_process_group("gloo", rank=process.rank, world_size=process.world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
