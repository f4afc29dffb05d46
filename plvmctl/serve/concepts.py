"""Concepts read from users' stores, kept in memory while their files stay the same.

A request names its concepts; reading and checking a `.concept` file for every request would
cost more than batching saves. A concept is kept under its file's path and identity (inode,
size, modification time): a file replaced by another process (atomically, a new inode) or
deleted is read again or found missing, so servers sharing a store folder stay consistent.
"""

from __future__ import annotations

import collections
import os
import threading

from ..concept import Concept
from ..store import ConceptStore


class ConceptCache:
    """At most `size` checked concepts, the least recently used forgotten first."""

    def __init__(self, runtime, size: int = 1024):
        self.runtime = runtime
        self.size = size
        self._lock = threading.Lock()
        self._kept: collections.OrderedDict = collections.OrderedDict()

    def load(self, store: ConceptStore, name: str) -> Concept:
        """`name` from `store`, checked against the model (PlvmError as ConceptStore.load)."""
        path = store.path_for(name)
        try:
            stat = os.stat(path)
            stamp = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        except OSError:
            stamp = None
        with self._lock:
            kept = self._kept.get(path)
            if kept is not None and stamp is not None and kept[0] == stamp:
                self._kept.move_to_end(path)
                return kept[1]
        concept = self.runtime.check_concept(store.load(name))
        if stamp is not None:
            with self._lock:
                self._kept[path] = (stamp, concept)
                while len(self._kept) > self.size:
                    self._kept.popitem(last=False)
        return concept
