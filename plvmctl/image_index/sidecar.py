"""The sidecar `INDEX.json` written next to every index: its on-disk format and validation.

The sidecar says what the FAISS file holds (dimension, metric, count, factory, embedding model),
the default search parameters, and the shard map that turns a global id back into shard + row,
hence into the row's metadata. A sidecar is checked field by field when read, so a damaged or
foreign file is refused with a reason instead of giving wrong hits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import PlvmError
from .factory import METRICS
from .sources import EmbeddingSource, Shard

SIDECAR_FORMAT = "plvmctl-index"
SIDECAR_VERSION = 1


@dataclass
class IndexInfo:
    """The sidecar `INDEX.json`: what the index holds and how ids map back to shard rows."""

    path: Path
    dim: int
    metric: str
    count: int
    factory: str
    normalized: bool
    embedding_model: str | None
    created: str
    build_seconds: float
    source: dict[str, Any]
    shards: list[Shard]
    search: dict[str, int] = field(default_factory=dict)
    train_sample: int | None = None
    seed: int = 0

    @property
    def sidecar(self) -> Path:
        return sidecar_path(self.path)

    def to_json(self) -> dict[str, Any]:
        return {"format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "dim": self.dim,
                "metric": self.metric, "count": self.count, "factory": self.factory,
                "normalized": self.normalized, "embedding_model": self.embedding_model,
                "created": self.created, "build_seconds": self.build_seconds,
                "source": self.source, "search": self.search, "train_sample": self.train_sample,
                "seed": self.seed, "shards": [shard.to_json() for shard in self.shards]}

    @classmethod
    def from_json(cls, data: Any, path: Path) -> "IndexInfo":
        """Validate a parsed sidecar; PlvmError naming what is wrong."""
        where = sidecar_path(path)

        def bad(reason: str) -> PlvmError:
            return PlvmError(f"index sidecar {where} is invalid ({reason}); rebuild the index")

        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise bad(f"not a {SIDECAR_FORMAT} sidecar")
        if data.get("version") != SIDECAR_VERSION:
            raise bad(f"version {data.get('version')!r}, this plvmctl reads {SIDECAR_VERSION}")
        for key, kind in [("dim", int), ("count", int), ("factory", str), ("metric", str),
                          ("normalized", bool), ("shards", list)]:
            if not isinstance(data.get(key), kind):
                raise bad(f"'{key}' missing or not {kind.__name__}")
        if data["metric"] not in METRICS:
            raise bad(f"unknown metric {data['metric']!r}")
        shards = []
        start = 0
        try:
            for entry in data["shards"]:
                shard = Shard(int(entry["shard"]), Path(entry["file"]),
                              Path(entry["metadata"]) if entry.get("metadata") else None,
                              int(entry["start"]), int(entry["count"]))
                if shard.start != start or shard.count < 0:
                    raise ValueError(f"shard {shard.shard} starts at {shard.start}, expected {start}")
                start += shard.count
                shards.append(shard)
        except (KeyError, TypeError, ValueError) as error:
            raise bad(f"shard map: {error}") from None
        if start != data["count"]:
            raise bad(f"shards hold {start} rows, count says {data['count']}")
        search = data.get("search") or {}
        if not isinstance(search, dict):
            raise bad("'search' is not an object")
        return cls(path=Path(path), dim=data["dim"], metric=data["metric"], count=data["count"],
                   factory=data["factory"], normalized=data["normalized"],
                   embedding_model=data.get("embedding_model"), created=str(data.get("created", "")),
                   build_seconds=float(data.get("build_seconds") or 0.0),
                   source=dict(data.get("source") or {}), shards=shards,
                   search={str(k): int(v) for k, v in search.items()},
                   train_sample=data.get("train_sample"), seed=int(data.get("seed") or 0))

    def reader(self) -> EmbeddingSource:
        """The source embeddings and metadata as the shard map describes them (opened lazily)."""
        return EmbeddingSource(str(self.source.get("kind", "laion")),
                               Path(self.source.get("path", ".")), self.shards, self.dim)


def sidecar_path(index_path: str | os.PathLike) -> Path:
    """`INDEX.json` next to `INDEX`."""
    return Path(str(index_path) + ".json")


def read_sidecar(index_path: str | os.PathLike) -> IndexInfo:
    """The validated sidecar of `index_path`; PlvmError when missing or corrupt."""
    path = sidecar_path(index_path)
    if not path.is_file():
        raise PlvmError(f"index sidecar missing: {path} (rebuild with `plvmctl index build`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise PlvmError(f"index sidecar {path} is corrupt ({error}); rebuild the index") from None
    return IndexInfo.from_json(data, Path(index_path))
