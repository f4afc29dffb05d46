"""Sources of image embeddings for the image index: shards of `[n, d]` `.npy` files.

Each shard is one `.npy` file, read memory-mapped, with a row-aligned metadata file (parquet for
LAION, JSON lines for embedded image folders). Two layouts open as a source here: a LAION /
clip-retrieval folder (`img_emb/img_emb_N.npy` + `metadata/metadata_N.*`, shards ordered by N) and
one plain `.npy` file without metadata (tests, benchmarks). Nothing is read beyond what a call
asks for, so sources of any size can be indexed and searched.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import PlvmError

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 65_536  # vectors converted to float32 and added per step


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32, a new array."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    """Files `prefix<N>suffix` in `folder`, keyed by N."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+){re.escape(suffix)}$")
    found: dict[int, Path] = {}
    if folder.is_dir():
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if match and path.is_file():
                found[int(match.group(1))] = path
    return found


def _parquet():
    """pyarrow.parquet, imported on first use."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PlvmError("reading LAION metadata needs pyarrow: pip install 'plvmctl[laion]'") from None
    return parquet


def map_npy(path: Path) -> np.ndarray:
    """A `[n, d]` float array from `path`, memory-mapped (nothing is read yet)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise PlvmError(f"not a readable .npy file ({error}): {path}") from None
    if array.ndim != 2 or array.dtype.kind != "f":
        raise PlvmError(f"expected a 2-d float array [n, d], got {array.dtype} {list(array.shape)}: {path}")
    return array


def count_metadata_rows(path: Path) -> int:
    """How many rows a metadata file has (parquet footer or jsonl lines)."""
    if path.suffix == ".parquet":
        try:
            return _parquet().ParquetFile(path).metadata.num_rows
        except PlvmError:
            raise
        except Exception as error:  # pyarrow raises several types for damaged files
            raise PlvmError(f"not a readable parquet file ({error}): {path}") from None
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


@dataclass(frozen=True)
class Shard:
    """One embeddings file and its row-aligned metadata file; global ids start .. start+count-1."""

    shard: int
    file: Path
    metadata: Path | None
    start: int
    count: int

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "file": str(self.file),
                "metadata": str(self.metadata) if self.metadata else None,
                "start": self.start, "count": self.count}


class _ParquetMetadata:
    """Row lookups in one parquet file, reading only the row groups that hold the rows."""

    def __init__(self, path: Path, cached_groups: int = 4):
        self.path = path
        self._file = _parquet().ParquetFile(path)
        sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._offsets = np.cumsum([0] + sizes)
        self._groups: OrderedDict[int, Any] = OrderedDict()
        self._cached_groups = cached_groups

    def _group(self, number: int):
        if number not in self._groups:
            self._groups[number] = self._file.read_row_group(number)
            while len(self._groups) > self._cached_groups:
                self._groups.popitem(last=False)
        self._groups.move_to_end(number)
        return self._groups[number]

    def rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        result = []
        for row in rows:
            group = int(np.searchsorted(self._offsets, row, side="right") - 1)
            table = self._group(group)
            result.append(table.slice(int(row - self._offsets[group]), 1).to_pylist()[0])
        return result


class _JsonlMetadata:
    """Row lookups in one JSON-lines file (image-folder shards are small enough to hold)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, encoding="utf-8") as handle:
            self._lines = [line for line in handle if line.strip()]

    def rows(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        result = []
        for row in rows:
            try:
                result.append(json.loads(self._lines[row]))
            except (IndexError, json.JSONDecodeError) as error:
                raise PlvmError(f"metadata row {row} unreadable ({error}): {self.path}") from None
        return result


class EmbeddingSource:
    """Embeddings as shards of `[n, d]` .npy files, opened lazily and memory-mapped.

    `kind` is "laion" (a LAION-layout folder, including embedded image folders), or "npy".
    Nothing is read into memory beyond what a call asks for: `iter_chunks` walks the shards
    in order, `sample` and `vectors` gather rows by global id, `metadata` reads the rows'
    metadata (parquet row groups or jsonl lines).
    """

    def __init__(self, kind: str, path: Path, shards: list[Shard], dim: int):
        self.kind = kind
        self.path = path
        self.shards = shards
        self.dim = dim
        self._starts = np.array([shard.start for shard in shards], dtype=np.int64)
        self._arrays: dict[int, np.ndarray] = {}
        self._metadata: OrderedDict[int, Any] = OrderedDict()
        self._vectors_ok: bool | None = None

    @property
    def count(self) -> int:
        return sum(shard.count for shard in self.shards)

    # -- vectors ----------------------------------------------------------------------
    def array(self, position: int) -> np.ndarray:
        """The memory-mapped array of the shard at `position` in `self.shards`."""
        if position not in self._arrays:
            shard = self.shards[position]
            if not shard.file.is_file():
                raise PlvmError(f"embeddings shard {shard.shard} is missing: {shard.file}")
            array = map_npy(shard.file)
            if array.shape[0] != shard.count or (shard.count and array.shape[1] != self.dim):
                raise PlvmError(f"embeddings shard {shard.shard} changed since the index was built "
                                f"(expected [{shard.count}, {self.dim}], found {list(array.shape)}): "
                                f"{shard.file}")
            self._arrays[position] = array
        return self._arrays[position]

    def vectors_available(self) -> bool:
        """Whether every shard's .npy file is still there with the expected shape."""
        if self._vectors_ok is None:
            try:
                for position in range(len(self.shards)):
                    self.array(position)
                self._vectors_ok = True
            except PlvmError as error:
                log.info("source embeddings unavailable (%s); using the index alone", error)
                self._vectors_ok = False
        return self._vectors_ok

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, ids, side="right") - 1

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """float32 rows for global `ids` (any shape); ids < 0 give zero rows."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        out = np.zeros((flat.size, self.dim), dtype=np.float32)
        valid = np.flatnonzero(flat >= 0)
        if valid.size:
            positions = self._positions(flat[valid])
            for position in np.unique(positions):
                chosen = valid[positions == position]
                local = flat[chosen] - self.shards[position].start
                order = np.argsort(local, kind="stable")  # read rows in file order
                out[chosen[order]] = self.array(int(position))[local[order]]
        return out.reshape(ids.shape + (self.dim,))

    def iter_chunks(self, chunk: int = DEFAULT_CHUNK) -> Iterator[np.ndarray]:
        """All vectors in global-id order, `chunk` rows at a time, as float32."""
        for position, shard in enumerate(self.shards):
            if shard.count == 0:
                continue
            array = self.array(position)
            for begin in range(0, shard.count, chunk):
                block = np.asarray(array[begin:begin + chunk], dtype=np.float32)
                if not np.isfinite(block).all():
                    raise PlvmError(f"non-finite values in rows {begin}..{begin + len(block) - 1} "
                                    f"of {shard.file}")
                yield block

    def sample(self, size: int, seed: int = 0) -> np.ndarray:
        """`size` distinct rows drawn uniformly at random (seeded), float32."""
        size = min(size, self.count)
        rng = np.random.default_rng(seed)
        ids = np.sort(rng.choice(self.count, size=size, replace=False))
        block = self.vectors(ids)
        if not np.isfinite(block).all():
            raise PlvmError(f"non-finite values in the embeddings under {self.path}")
        return block

    # -- metadata ---------------------------------------------------------------------
    def _reader(self, position: int):
        if position not in self._metadata:
            shard = self.shards[position]
            if shard.metadata is None:
                reader = None
            elif not shard.metadata.is_file():
                raise PlvmError(f"metadata of shard {shard.shard} is missing: {shard.metadata}")
            elif shard.metadata.suffix == ".parquet":
                reader = _ParquetMetadata(shard.metadata)
            else:
                reader = _JsonlMetadata(shard.metadata)
            self._metadata[position] = reader
            while len(self._metadata) > 8:
                self._metadata.popitem(last=False)
        self._metadata.move_to_end(position)
        return self._metadata[position]

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """The metadata row of each global id ({} for sources without metadata)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        result: list[dict[str, Any]] = [{} for _ in range(ids.size)]
        if ids.size == 0:
            return result
        if (ids < 0).any() or (ids >= self.count).any():
            raise PlvmError(f"ids outside 0..{self.count - 1}")
        positions = self._positions(ids)
        for position in np.unique(positions):
            reader = self._reader(int(position))
            if reader is None:
                continue
            chosen = np.flatnonzero(positions == position)
            rows = reader.rows([int(ids[i] - self.shards[position].start) for i in chosen])
            for i, row in zip(chosen, rows):
                result[i] = row
        return result


def open_laion(folder: str | os.PathLike) -> EmbeddingSource:
    """A LAION / clip-retrieval layout folder: img_emb/img_emb_N.npy + metadata/metadata_N.*.

    Every shard needs its metadata (`.parquet`, or `.jsonl` for embedded image folders) with
    exactly as many rows as the .npy; dimensions must agree. Shards are ordered by N.
    """
    folder = Path(folder).resolve()
    embeddings = _numbered(folder / "img_emb", "img_emb_", ".npy")
    if not embeddings:
        raise PlvmError(f"no img_emb/img_emb_N.npy files in {folder}")
    shards: list[Shard] = []
    start = 0
    dim: int | None = None
    for number in sorted(embeddings):
        path = embeddings[number]
        array = map_npy(path)
        rows = int(array.shape[0])
        candidates = [folder / "metadata" / f"metadata_{number}.parquet",
                      folder / "metadata" / f"metadata_{number}.jsonl"]
        metadata = next((c for c in candidates if c.is_file()), None)
        if metadata is None:
            raise PlvmError(f"shard {number} ({path.name}) has no metadata: expected {candidates[0]}")
        metadata_rows = count_metadata_rows(metadata)
        if metadata_rows != rows:
            raise PlvmError(f"shard {number}: {path.name} has {rows} rows but {metadata.name} has "
                            f"{metadata_rows}; they must be row-aligned")
        if rows:
            if dim is None:
                dim = int(array.shape[1])
            elif array.shape[1] != dim:
                raise PlvmError(f"shard {number}: {path.name} has dimension {array.shape[1]}, "
                                f"earlier shards {dim}")
        shards.append(Shard(number, path, metadata, start, rows))
        start += rows
    if dim is None or start == 0:
        raise PlvmError(f"the embeddings under {folder} are all empty")
    return EmbeddingSource("laion", folder, shards, dim)


def open_npy(path: str | os.PathLike) -> EmbeddingSource:
    """One `.npy` file of `[n, d]` vectors as a single shard without metadata."""
    path = Path(path).resolve()
    if not path.is_file():
        raise PlvmError(f"file not found: {path}")
    array = map_npy(path)
    if array.shape[0] == 0:
        raise PlvmError(f"no vectors in {path}")
    return EmbeddingSource("npy", path, [Shard(0, path, None, 0, int(array.shape[0]))],
                           int(array.shape[1]))


def source_kind(path: str | os.PathLike) -> str:
    """What `path` holds, judged by its layout: "npy", "laion" or "images"."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".npy":
        return "npy"
    if path.is_dir() and (path / "img_emb").is_dir():
        return "laion"
    if path.is_dir():
        return "images"
    if not path.exists():
        raise PlvmError(f"source not found: {path}")
    raise PlvmError(f"source must be a LAION-layout folder (img_emb/ + metadata/), a .npy file "
                    f"or a folder of images: {path}")


def open_source(path: str | os.PathLike) -> EmbeddingSource:
    """A LAION-layout folder or a .npy file (image folders go through `embed_image_folder`)."""
    kind = source_kind(path)
    if kind == "npy":
        return open_npy(path)
    if kind == "laion":
        return open_laion(path)
    raise PlvmError(f"{path} is a folder of images: embed it first with embed_image_folder() "
                    f"(`plvmctl index build` does this with the recipe's CLIP vision tower)")
