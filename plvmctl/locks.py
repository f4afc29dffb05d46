"""One writer at a time: an advisory lock (fcntl.flock) on a lock file.

The lock file holds the pid of the process that holds it, so a second writer can say who.
The kernel drops the lock when its process ends, however it ends (SIGKILL included): a lock
file left by a dead process is simply taken over. The file itself is never removed (removing
it would let two processes lock two different files of one name).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import PlvmError
from .fileio import writing

LOCK_FILE = ".lock"  # inside a run folder (eval --out, train --out)


@contextlib.contextmanager
def hold(lock_file: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock on `lock_file` while the block runs. Another process holding it: wait
    for it (`wait=True`) or PlvmError `<what> is in use by process <pid>`."""
    lock_file = Path(lock_file)
    with writing(lock_file):
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            raise PlvmError(f"{what} is in use by process {holder} (lock {lock_file}); wait for "
                            f"it to finish, or use another path") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock
