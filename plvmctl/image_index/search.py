"""Nearest-neighbour retrieval over image embeddings with FAISS: build, open, search, negatives.

Embeddings come in *shards*: `[n, d]` `.npy` files read one memory-mapped shard at a time, each
with a row-aligned metadata file. Three sources share that model:

* a LAION / clip-retrieval folder: `img_emb/img_emb_N.npy` (float16, L2-normalised) and
  `metadata/metadata_N.parquet` (url, caption, ...), shards ordered by N;
* a folder of images, embedded by a caller-supplied function into a work folder with the same
  layout (`metadata/metadata_N.jsonl` with a `path` column), resumable shard by shard;
* one plain `.npy` file of vectors (tests, benchmarks), without metadata.

`build_index` writes `INDEX` (a FAISS index) and `INDEX.json` (the sidecar: dimension, metric,
factory, embedding model, default search parameters and the shard map that turns a global id
back into shard + row, hence into metadata). `open_index` memory-maps the index; its `search`
L2-normalises queries (ip metric), re-ranks approximate candidates exactly from the source
embeddings when those are still on disk, and removes near-duplicates. `hard_negatives` is
Yo'LLaVA's retrieval of the nearest neighbours of the positives' mean embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import faiss
import numpy as np
from tqdm import tqdm

from .errors import PlvmError
from .fileio import atomic_path, atomic_writer, check_free_space, write_json_atomic, write_text_atomic
from .images import load_image

log = logging.getLogger(__name__)

SIDECAR_FORMAT = "plvmctl-index"
SIDECAR_VERSION = 1
EMBEDDINGS_FORMAT = "plvmctl-embeddings"

EXACT_LIMIT = 100_000  # up to this many vectors: exact search ("Flat")
SQ_LIMIT = 4_000_000  # up to this many: IVF with 8-bit scalar codes (d bytes per vector)
LARGE_LIMIT = 10_000_000  # from this many: OPQ + IVF with an HNSW coarse quantizer
DEFAULT_CHUNK = 65_536  # vectors converted to float32 and added per step
TRAIN_BYTES_CAP = 2 << 30  # the default training sample stays under 2 GiB of float32
DEDUP_SCORE_EPSILON = 1e-3  # "same score" for near-duplicate removal
RERANK_FACTOR = 4  # approximate candidates fetched per wanted hit when re-ranking exactly
QUERY_BATCH = 256  # queries searched per FAISS call
FLAT_BLOCK = 65_536  # rows per matmul in exact (Flat, inner product) search
MAX_FETCH_FACTOR = 64  # never fetch more than k * this many candidates per query

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

Embedder = Callable[[list], np.ndarray]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _faiss_message(error: BaseException) -> str:
    """The useful last part of a FAISS C++ exception, on one line."""
    text = str(error).strip()
    if "Error: " in text:
        text = text.rsplit("Error: ", 1)[1]
    return " ".join(text.split())


def _unit(vectors: np.ndarray) -> np.ndarray:
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


def _open_npy(path: Path) -> np.ndarray:
    """A `[n, d]` float array from `path`, memory-mapped (nothing is read yet)."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise PlvmError(f"not a readable .npy file ({error}): {path}") from None
    if array.ndim != 2 or array.dtype.kind != "f":
        raise PlvmError(f"expected a 2-d float array [n, d], got {array.dtype} {list(array.shape)}: {path}")
    return array


def _metadata_rows(path: Path) -> int:
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


# --------------------------------------------------------------------------------------------
# Sources of embeddings
# --------------------------------------------------------------------------------------------


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
            array = _open_npy(shard.file)
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
        array = _open_npy(path)
        rows = int(array.shape[0])
        candidates = [folder / "metadata" / f"metadata_{number}.parquet",
                      folder / "metadata" / f"metadata_{number}.jsonl"]
        metadata = next((c for c in candidates if c.is_file()), None)
        if metadata is None:
            raise PlvmError(f"shard {number} ({path.name}) has no metadata: expected {candidates[0]}")
        metadata_rows = _metadata_rows(metadata)
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
    array = _open_npy(path)
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


# --------------------------------------------------------------------------------------------
# Image folders: embedded into a resumable LAION-like work folder
# --------------------------------------------------------------------------------------------


@dataclass
class EmbeddedFolder:
    """The result of `embed_image_folder`: the work folder as a source, and what was skipped."""

    source: EmbeddingSource
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable files, all shards
    embedded: int  # images embedded by this call (the rest came from completed shards)
    reused_shards: int  # shards found complete and not embedded again


def list_images(folder: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """Image files under `folder` (recursive, by suffix), sorted; hidden entries and anything
    under `exclude` are left out."""
    folder = Path(folder).resolve()
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if excluded is not None and (path == excluded or excluded in path.parents):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def describe_skipped(skipped: Sequence[tuple[str, str]], first: int = 3) -> str:
    """One log line: how many images were skipped, the first few reasons, how many more."""
    shown = "; ".join(reason for _, reason in skipped[:first])
    more = f" (+{len(skipped) - first} more)" if len(skipped) > first else ""
    return f"skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}: {shown}{more}"


def _shard_complete(work: Path, number: int) -> bool:
    """A shard is complete when its jsonl (written last) matches its .npy row count."""
    embeddings = work / "img_emb" / f"img_emb_{number}.npy"
    metadata = work / "metadata" / f"metadata_{number}.jsonl"
    if not (embeddings.is_file() and metadata.is_file()):
        return False
    try:
        return _open_npy(embeddings).shape[0] == _metadata_rows(metadata)
    except PlvmError:
        return False


def embed_image_folder(folder: str | os.PathLike, work_dir: str | os.PathLike, embed: Embedder, *,
                       batch_size: int = 32, shard_size: int = 10_000,
                       model_name: str | None = None, progress: bool = True) -> EmbeddedFolder:
    """Embed every image under `folder` into `work_dir` in the LAION-like layout, resumably.

    Files are listed recursively and sorted; shard N holds files [N*shard_size, (N+1)*shard_size).
    A shard is written as `img_emb/img_emb_N.npy` (float16, L2-normalised), then
    `metadata/skipped_N.json`, then `metadata/metadata_N.jsonl` (one {"path": ...} per row), each
    atomically: a shard whose jsonl exists is complete and is not embedded again, so an
    interrupted run continues from the last complete shard. `work_dir/manifest.json` pins the
    file list, shard size and model; a different one is refused rather than mixed in.
    Unreadable images are skipped and reported (count + first few), never fatal.
    `embed(images) -> [b, d]` is called with at most `batch_size` PIL images at a time.
    """
    folder = Path(folder).resolve()
    work = Path(work_dir).resolve()
    if not folder.is_dir():
        raise PlvmError(f"image folder not found: {folder}")
    if batch_size < 1 or shard_size < 1:
        raise PlvmError("batch_size and shard_size must be at least 1")
    files = list_images(folder, exclude=work)
    if not files:
        raise PlvmError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    relative = "\n".join(p.relative_to(folder).as_posix() for p in files)
    manifest = {"format": EMBEDDINGS_FORMAT, "version": 1, "folder": str(folder), "files": len(files),
                "files_sha256": hashlib.sha256(relative.encode("utf-8")).hexdigest(),
                "shard_size": shard_size, "model": model_name}
    manifest_path = work / "manifest.json"
    if manifest_path.is_file():
        try:
            existing = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise PlvmError(f"unreadable {manifest_path} ({error}); delete the work folder") from None
        if existing != manifest:
            changed = sorted(k for k in manifest if existing.get(k) != manifest[k])
            raise PlvmError(f"work folder {work} holds embeddings of a different run "
                            f"({', '.join(changed)} differ); delete it or choose another")
    else:
        write_json_atomic(manifest_path, manifest)

    skipped: list[tuple[str, str]] = []
    embedded = 0
    reused = 0
    dim: int | None = None
    shard_count = math.ceil(len(files) / shard_size)
    bar = tqdm(total=len(files), unit="img", desc="embedding", disable=not progress)
    try:
        for number in range(shard_count):
            shard_files = files[number * shard_size:(number + 1) * shard_size]
            skipped_path = work / "metadata" / f"skipped_{number}.json"
            if _shard_complete(work, number):
                reused += 1
                if skipped_path.is_file():
                    skipped += [tuple(item) for item in json.loads(skipped_path.read_text("utf-8"))]
                array = _open_npy(work / "img_emb" / f"img_emb_{number}.npy")
                if array.shape[0]:
                    dim = int(array.shape[1])
                bar.update(len(shard_files))
                continue
            rows: list[str] = []
            blocks: list[np.ndarray] = []
            shard_skipped: list[tuple[str, str]] = []
            for begin in range(0, len(shard_files), batch_size):
                batch = shard_files[begin:begin + batch_size]
                images, paths = [], []
                for path in batch:
                    try:
                        images.append(load_image(path))
                        paths.append(str(path))
                    except PlvmError as error:
                        shard_skipped.append((str(path), str(error)))
                if images:
                    vectors = np.asarray(embed(images), dtype=np.float32)
                    if vectors.ndim != 2 or vectors.shape[0] != len(images):
                        raise PlvmError(f"the embedder returned shape {list(vectors.shape)} for "
                                        f"{len(images)} images")
                    if not np.isfinite(vectors).all():
                        raise PlvmError("the embedder returned NaN or infinite values")
                    if dim is not None and vectors.shape[1] != dim:
                        raise PlvmError(f"the embedder returned dimension {vectors.shape[1]}, "
                                        f"earlier shards have {dim}")
                    dim = int(vectors.shape[1])
                    blocks.append(_unit(vectors))
                    rows += paths
                    embedded += len(images)
                for image in images:
                    image.close()
                bar.update(len(batch))
            data = (np.concatenate(blocks) if blocks else np.zeros((0, dim or 0), np.float32))
            with atomic_writer(work / "img_emb" / f"img_emb_{number}.npy") as handle:
                np.save(handle, data.astype(np.float16))
            write_json_atomic(skipped_path, [list(item) for item in shard_skipped])
            write_text_atomic(work / "metadata" / f"metadata_{number}.jsonl",
                              "".join(json.dumps({"path": p}) + "\n" for p in rows))
            skipped += shard_skipped
    finally:
        bar.close()
    if skipped:  # the caller reports them (the CLI prints this line)
        log.info("%s", describe_skipped(skipped))
    source = open_laion(work)
    source.kind = "images"
    return EmbeddedFolder(source, skipped, embedded, reused)


# --------------------------------------------------------------------------------------------
# Choosing and building an index
# --------------------------------------------------------------------------------------------


def _nlist(n: int) -> int:
    """4·sqrt(n) rounded to a power of two, with at least 39 vectors per list."""
    nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def _pq_bytes(d: int) -> int:
    """Code bytes per vector: d/2 up to 128-d (2 dims per sub-quantizer), else min(128, d/4)."""
    return max(1, d // 2) if d <= 128 else min(128, d // 4)


def choose_factory(n: int, d: int, *, exact_limit: int = EXACT_LIMIT, sq_limit: int = SQ_LIMIT,
                   large_limit: int = LARGE_LIMIT) -> str:
    """The FAISS index factory string for `n` vectors of dimension `d`.

    The rule (autofaiss-like, without its memory tuning; measured with bench/index.py):

    * n <= exact_limit (100 k): "Flat", exact inner-product search, no training. A batch of
      queries costs one matmul over all n vectors: 84 queries/s at 1 M × 768 on 2 cores (batch
      64), so ~10× that at 100 k; above it exact search is too slow to be the default.
    * n <= sq_limit (4 M): `IVF{nlist},SQ8`: an inverted file whose lists hold 8-bit scalar
      codes (d bytes per vector, 4× smaller than float32). SQ8 scores rank candidates almost
      exactly, and `OpenedIndex.search` re-ranks the best RERANK_FACTOR·k of them exactly from
      the source embeddings, so recall is set by the lists visited (nprobe) alone: on 1 M × 768
      clustered vectors, 1,675 queries/s at batch 64 (861 at batch 1), 10-recall@10 0.999, on
      2 cores (nprobe 32 of 4096; build 197 s, 789 MB), against 84 for Flat.
    * above: `IVF{nlist},PQ{m}np`. m, the PQ bytes per vector, is d/2 for d <= 128, else
      min(128, d/4) (768-d → 128 bytes, 24× smaller than float32), lowered until it divides d.

    For every IVF: nlist = 4·sqrt(n) rounded (in log scale) to a power of two, at most n/39
    (FAISS's minimum of training points per list).
    * n >= large_limit (10 M): an OPQ rotation (D = d rounded up to a multiple of m; it spreads
      variance evenly over the sub-quantizers) and an HNSW graph as coarse quantizer, since an
      exhaustive scan of 16 k–64 k centroids per query would dominate:
      `OPQ{m}_{D},IVF{nlist}_HNSW32,PQ{m}x8np`, the shape clip-retrieval's autofaiss picks for
      LAION. OPQ is kept to this tier because training it is slow on a CPU (about a minute
      per iteration, 50 iterations, for 768-d on 2 cores) and matters most at this scale.

    `np` turns off polysemous training, which costs minutes and helps only Hamming-filtered
    search, which plvmctl does not use. The limits let tests and benchmarks force a rule.
    HNSW (no training, fast search) was left out: building its graph for 1 M × 768 takes far
    longer on 2 cores than training and filling the IVF, and it holds the float32 vectors.
    """
    if n < 1 or d < 1:
        raise PlvmError(f"cannot index {n} vectors of dimension {d}")
    if n <= exact_limit:
        return "Flat"
    nlist = _nlist(n)
    m = _pq_bytes(d)
    if n >= large_limit:
        return f"OPQ{m}_{m * math.ceil(d / m)},IVF{nlist}_HNSW32,PQ{m}x8np"
    if n <= sq_limit:
        return f"IVF{nlist},SQ8"
    while d % m:  # without a rotation, PQ needs m to divide d
        m -= 1
    return f"IVF{nlist},PQ{m}np"


def _default_train_sample(n: int, d: int, index: faiss.Index) -> int:
    """Enough for k-means (≥ 50 per list) and PQ (65 536), at most 2 GiB of float32, at most n."""
    ivf = _ivf(index)
    wanted = max(65_536, 50 * ivf.nlist) if ivf is not None else 65_536
    return max(1, min(n, wanted, TRAIN_BYTES_CAP // (4 * d)))


def _ivf(index: faiss.Index):
    """The IndexIVF inside `index` (through OPQ / pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _default_search(index: faiss.Index) -> dict[str, int]:
    """Default search parameters: nprobe = nlist/64 within 16..256 (nlist/128 for scalar-quantizer
    lists, which are scanned d bytes per vector; re-ranking makes up their code error);
    efSearch 2·nprobe (≥ 64)."""
    ivf = _ivf(index)
    if ivf is None:
        return {}
    share = 128 if isinstance(faiss.downcast_index(ivf), faiss.IndexIVFScalarQuantizer) else 64
    nprobe = min(ivf.nlist, max(16, min(256, ivf.nlist // share)))
    params = {"nprobe": nprobe}
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        params["efSearch"] = max(64, 2 * nprobe)
    return params


def check_gpu() -> None:
    """PlvmError unless this faiss build has GPU support and sees a GPU."""
    if not hasattr(faiss, "StandardGpuResources"):
        raise PlvmError("--gpu needs the faiss-gpu build: pip install 'plvmctl[gpu]' on a CUDA "
                        "machine (this faiss has no GPU support)")
    if faiss.get_num_gpus() < 1:
        raise PlvmError("--gpu: no GPU visible to faiss (check the driver and CUDA_VISIBLE_DEVICES)")


def _train(index: faiss.Index, sample: np.ndarray, use_gpu: bool) -> None:
    """Train `index`; with `use_gpu` the IVF k-means assignment runs on all visible GPUs."""
    ivf = _ivf(index)
    if not use_gpu or ivf is None:
        if use_gpu:
            log.info("--gpu: this index has no IVF clustering; training on the CPU")
        index.train(sample)
        return
    clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    ivf.clustering_index = clustering
    try:
        index.train(sample)
    finally:
        ivf.clustering_index = None


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


def build_index(source: EmbeddingSource | str | os.PathLike, out_path: str | os.PathLike, *,
                factory: str | None = None, metric: str = "ip", train_sample: int | None = None,
                chunk: int = DEFAULT_CHUNK, use_gpu: bool = False, progress: bool = True,
                embedding_model: str | None = None, seed: int = 0,
                search_params: dict[str, int] | None = None,
                exact_limit: int = EXACT_LIMIT) -> IndexInfo:
    """Build a FAISS index of `source` at `out_path`, plus the sidecar `out_path.json`.

    `factory` defaults to `choose_factory(n, d, exact_limit=...)`. With metric "ip" vectors are
    L2-normalised as they are added (scores are cosines). An index that needs training is
    trained on `train_sample` vectors drawn at random (seeded; default: enough for its k-means
    and PQ, under 2 GiB); vectors are then added `chunk` at a time, converted to float32 per
    chunk. `use_gpu` runs the IVF clustering on the GPU (faiss-gpu build only). The index and
    sidecar are written to temporary files and renamed into place, so a crash leaves any
    previous index at `out_path` untouched. `search_params` ({"nprobe": .., "efSearch": ..})
    are stored as the defaults `open_index` applies.
    """
    started = time.perf_counter()
    if metric not in METRICS:
        raise PlvmError(f"unknown metric {metric!r} (choose from {', '.join(METRICS)})")
    if chunk < 1:
        raise PlvmError("chunk must be at least 1")
    if use_gpu:
        check_gpu()
    src = source if isinstance(source, EmbeddingSource) else open_source(source)
    n, d = src.count, src.dim
    factory = factory or choose_factory(n, d, exact_limit=exact_limit)
    try:
        index = faiss.index_factory(d, factory, METRICS[metric])
    except RuntimeError as error:
        raise PlvmError(f"--factory {factory!r} is not usable for {d}-d vectors: "
                        f"{_faiss_message(error)}") from None
    try:
        code_bytes = index.sa_code_size()
    except RuntimeError:  # not every index type says; its vectors are the upper bound
        code_bytes = 4 * d
    check_free_space(Path(out_path).parent, n * code_bytes, f"an index of {n} vectors")
    normalize = metric == "ip"
    search = _default_search(index)
    if search_params:
        unknown = sorted(set(search_params) - {"nprobe", "efSearch"})
        if unknown:
            raise PlvmError(f"unknown search parameters: {', '.join(unknown)} (nprobe, efSearch)")
        search.update({k: int(v) for k, v in search_params.items() if v is not None})
    # Check the search parameters now rather than after a long build.
    probe_info = IndexInfo(path=Path(out_path), dim=d, metric=metric, count=0, factory=factory,
                           normalized=normalize, embedding_model=None, created="",
                           build_seconds=0.0, source={}, shards=[])
    OpenedIndex(index, probe_info, mmapped=False).set_search_params(**search)

    used_sample = None
    if not index.is_trained:
        used_sample = min(n, train_sample or _default_train_sample(n, d, index))
        log.info("training %s on %d of %d vectors", factory, used_sample, n)
        sample = src.sample(used_sample, seed)
        if normalize:
            sample = _unit(sample)
        try:
            _train(index, sample, use_gpu)
        except RuntimeError as error:
            raise PlvmError(f"training {factory} on {used_sample} vectors failed: "
                            f"{_faiss_message(error)}") from None
        del sample

    with tqdm(total=n, unit="vec", desc="adding", disable=not progress) as bar:
        for block in src.iter_chunks(chunk):
            index.add(_unit(block) if normalize else block)
            bar.update(len(block))

    info = IndexInfo(path=Path(out_path), dim=d, metric=metric, count=int(index.ntotal),
                     factory=factory, normalized=normalize, embedding_model=embedding_model,
                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     build_seconds=0.0, source={"kind": src.kind, "path": str(src.path)},
                     shards=list(src.shards), search=search, train_sample=used_sample, seed=seed)
    info.build_seconds = round(time.perf_counter() - started, 3)
    _write_index(index, info)
    return info


def _write_index(index: faiss.Index, info: IndexInfo) -> None:
    """Write the index and its sidecar to temporary files, then rename the index, then the
    sidecar (a fault between the two renames leaves a pair that `open_index` refuses when
    their counts differ). faiss writes through fileio's writer: it would ignore a failing
    close of a file of its own."""
    with atomic_path(info.sidecar) as sidecar_tmp, atomic_writer(info.path) as handle:
        faiss.write_index(index, faiss.PyCallbackIOWriter(handle.write))
        sidecar_tmp.write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n",
                               encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Opening and searching
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One search result: global id, score (cosine for "ip", squared L2 distance for "l2";
    NaN for random negatives) and the row's metadata (url/caption, or path, when known)."""

    id: int
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {**self.metadata, "id": self.id, "score": self.score}


@dataclass
class _Candidate:
    id: int
    score: float
    vector: np.ndarray | None  # unit-norm, or None when vectors are unavailable


@dataclass(frozen=True)
class _DuplicateRule:
    """`OpenedIndex.search`'s near-duplicate rule: a candidate is rejected when its score is within
    `epsilon` of a kept hit's and its vector has cosine >= `threshold` with that hit (score alone
    when vectors are unknown); `threshold` None keeps everything."""

    threshold: float | None
    epsilon: float

    def __call__(self, candidate: _Candidate, chosen: list[_Candidate]) -> str | None:
        if self.threshold is None:
            return None
        for other in chosen:
            if abs(candidate.score - other.score) > self.epsilon:
                continue
            if candidate.vector is None or other.vector is None:
                return "duplicate"
            if float(np.dot(candidate.vector, other.vector)) >= self.threshold:
                return "duplicate"
        return None


class OpenedIndex:
    """A FAISS index opened with its sidecar; search, negatives, metadata lookups."""

    def __init__(self, index: faiss.Index, info: IndexInfo, mmapped: bool):
        self.index = index
        self.info = info
        self.mmapped = mmapped
        self.search_params: dict[str, int] = {}
        self.source = info.reader()
        self._can_reconstruct: bool | None = None
        self._flat = self._flat_vectors()

    def _flat_vectors(self) -> np.ndarray | None:
        """For an inner-product Flat index, its float32 vectors as a numpy view (of the
        memory-mapped file when mmapped; nothing is copied), else None."""
        flat = faiss.downcast_index(self.index)
        if not isinstance(flat, faiss.IndexFlat) or self.info.metric != "ip" or flat.ntotal == 0:
            return None
        return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)

    def _matmul_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-`fetch` over the Flat index's vectors: one BLAS matmul per
        FLAT_BLOCK rows and a running partial sort; (scores, ids) best first, ties by id.
        FAISS's own Flat search (1,024 rows per matmul, a heap per query) gave 11 queries/s at
        1 M × 768, batch 64, 2 cores, against 84 for this (bench/index.py)."""
        vectors = self._flat
        best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_ids = np.zeros((len(queries), 0), dtype=np.int64)
        for begin in range(0, len(vectors), FLAT_BLOCK):
            scores = queries @ vectors[begin:begin + FLAT_BLOCK].T
            if scores.shape[1] > fetch:
                top = np.argpartition(-scores, fetch - 1, axis=1)[:, :fetch]
                scores = np.take_along_axis(scores, top, 1)
            else:
                top = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
            scores = np.concatenate([best_scores, scores], axis=1)
            ids = np.concatenate([best_ids, top + begin], axis=1)
            if scores.shape[1] > fetch:
                keep = np.argpartition(-scores, fetch - 1, axis=1)[:, :fetch]
                scores = np.take_along_axis(scores, keep, 1)
                ids = np.take_along_axis(ids, keep, 1)
            best_scores, best_ids = scores, ids
        order = np.lexsort((best_ids, -best_scores), axis=1)
        return np.take_along_axis(best_scores, order, 1), np.take_along_axis(best_ids, order, 1)

    def _index_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the index's top `fetch`, best first; -1 ids pad missing results."""
        if self._flat is None:
            return self.index.search(queries, fetch)
        scores, ids = self._matmul_search(queries, min(fetch, len(self._flat)))
        if ids.shape[1] < fetch:  # FAISS's padding
            pad = fetch - ids.shape[1]
            scores = np.concatenate([scores, np.full((len(ids), pad), -np.inf, np.float32)], 1)
            ids = np.concatenate([ids, np.full((len(ids), pad), -1, np.int64)], 1)
        return scores, ids

    @property
    def exact(self) -> bool:
        """Whether scores are exact (a Flat index)."""
        return isinstance(faiss.downcast_index(self.index), faiss.IndexFlat)

    @property
    def larger_is_better(self) -> bool:
        return self.info.metric == "ip"

    def set_search_params(self, nprobe: int | None = None, efSearch: int | None = None) -> None:
        """Set IVF `nprobe` (lists visited per query) and/or HNSW `efSearch`."""
        space = faiss.ParameterSpace()
        ivf = _ivf(self.index)
        if nprobe is not None:
            if ivf is None:
                raise PlvmError(f"nprobe applies to IVF indexes; this one is {self.info.factory}")
            if nprobe < 1:
                raise PlvmError("nprobe must be at least 1")
            nprobe = min(int(nprobe), ivf.nlist)
            space.set_index_parameter(self.index, "nprobe", nprobe)
            self.search_params["nprobe"] = nprobe
        if efSearch is not None:
            if efSearch < 1:
                raise PlvmError("efSearch must be at least 1")
            hnsw_quantizer = ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer),
                                                            faiss.IndexHNSW)
            name = "quantizer_efSearch" if hnsw_quantizer else "efSearch"
            try:
                space.set_index_parameter(self.index, name, int(efSearch))
            except RuntimeError:
                raise PlvmError(f"efSearch applies to HNSW indexes; this one is "
                                f"{self.info.factory}") from None
            self.search_params["efSearch"] = int(efSearch)

    # -- low level --------------------------------------------------------------------
    def _queries(self, queries: Any) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise PlvmError(f"queries must be [q, {self.info.dim}], got {list(queries.shape)}")
        if not np.isfinite(queries).all():
            raise PlvmError("queries contain NaN or infinite values")
        if self.info.normalized:
            queries = _unit(queries)
        return np.ascontiguousarray(queries)

    def _use_rerank(self, rerank: bool | None) -> bool:
        if rerank is None:
            return not self.exact and self.source.vectors_available()
        if rerank and not self.source.vectors_available():
            raise PlvmError("exact re-ranking needs the source embeddings, which are no longer "
                            f"where the index was built from ({self.info.source.get('path')})")
        return bool(rerank)

    def _raw(self, queries: np.ndarray, fetch: int, want_vectors: bool,
             rerank: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """ids [q, fetch], scores, unit vectors [q, fetch, d] or None, best first (-1 ids last).

        Everything is batched: one FAISS call per QUERY_BATCH queries, one gather of the
        candidates' rows from the memory-mapped source (in file order), one batched product to
        re-score them exactly, one sort; no Python loop over queries or candidates.
        """
        ids_out, scores_out, vectors_out = [], [], []
        from_source = (want_vectors or rerank) and self.source.vectors_available()
        for begin in range(0, len(queries), QUERY_BATCH):
            batch = queries[begin:begin + QUERY_BATCH]
            vectors = None
            if from_source:
                scores, ids = self._index_search(batch, fetch)
                raw = self.source.vectors(ids)  # float32 [b, fetch, d]; zero rows for -1 ids
                if self.info.normalized:
                    raw = _unit(raw)
                if rerank:
                    if self.larger_is_better:
                        scores = np.matmul(raw, batch[:, :, None])[:, :, 0]
                        scores[ids < 0] = -np.inf
                        order = np.argsort(-scores, axis=1, kind="stable")
                    else:
                        scores = ((raw - batch[:, None, :]) ** 2).sum(-1)
                        scores[ids < 0] = np.inf
                        order = np.argsort(scores, axis=1, kind="stable")
                    ids = np.take_along_axis(ids, order, 1)
                    scores = np.take_along_axis(scores, order, 1)
                    raw = np.take_along_axis(raw, order[:, :, None], 1)
                vectors = raw if self.info.normalized else _unit(raw)
            elif want_vectors and self._flat is not None:
                scores, ids = self._index_search(batch, fetch)
                vectors = _unit(np.where((ids >= 0)[:, :, None], self._flat[np.maximum(ids, 0)], 0))
            elif want_vectors and self._can_reconstruct is not False:
                try:
                    scores, ids, raw = self.index.search_and_reconstruct(batch, fetch)
                    self._can_reconstruct = True
                    vectors = _unit(raw)
                except RuntimeError as error:
                    log.debug("%s cannot reconstruct vectors (%s); de-duplicating by score only",
                              self.info.factory, _faiss_message(error))
                    self._can_reconstruct = False
                    scores, ids = self.index.search(batch, fetch)
            else:
                scores, ids = self._index_search(batch, fetch)
            ids_out.append(ids)
            scores_out.append(scores)
            vectors_out.append(vectors)
        has_vectors = all(v is not None for v in vectors_out)
        return (np.concatenate(ids_out), np.concatenate(scores_out),
                np.concatenate(vectors_out) if has_vectors else None)

    @staticmethod
    def _clean_prefixes(ids: np.ndarray, scores: np.ndarray, vectors: np.ndarray | None, k: int,
                        rule: "_DuplicateRule") -> np.ndarray:
        """Per row, whether its first min(k, valid) candidates hold no pair `rule` could call
        duplicates; the greedy rule then keeps exactly that prefix. Computed for all rows at once;
        pairs near the rule's bounds count as suspect (the greedy loop decides those exactly)."""
        rows, fetched = ids.shape
        if rule.threshold is None or rows == 0:
            return np.ones(rows, dtype=bool)
        m = min(k, fetched)
        head = scores[:, :m].astype(np.float64)
        valid = ids[:, :m] >= 0
        pairs = np.abs(head[:, :, None] - head[:, None, :]) <= rule.epsilon * (1 + 1e-6) + 1e-9
        pairs &= valid[:, :, None] & valid[:, None, :]
        pairs &= np.triu(np.ones((m, m), dtype=bool), 1)
        suspect = pairs.any(axis=(1, 2))
        if vectors is not None and suspect.any():
            chosen = np.flatnonzero(suspect)
            block = vectors[chosen, :m]
            cosines = np.matmul(block, block.transpose(0, 2, 1))
            suspect[chosen] = (pairs[chosen] & (cosines >= rule.threshold - 1e-5)).any(axis=(1, 2))
        return ~suspect

    def _collect(self, queries: np.ndarray, k: int,
                 reject: Callable[[_Candidate, list[_Candidate]], str | None],
                 want_vectors: bool, rerank: bool) -> tuple[list[list[_Candidate]], list[Counter]]:
        """Per query, the first k candidates `reject` lets through (best first); candidates
        are fetched k·2 (k·RERANK_FACTOR when re-ranking) at a time, doubling while too many are
        rejected. Also returns, per query, why candidates were rejected.

        With the plain near-duplicate rule (a `_DuplicateRule`), rows whose first k candidates
        hold no possible duplicate pair (checked for all rows at once) take that prefix without
        a Python loop over candidates; only the others go through the rule one by one."""
        total = int(self.index.ntotal)
        kept: list[list[_Candidate]] = [[] for _ in range(len(queries))]
        reasons: list[Counter] = [Counter() for _ in range(len(queries))]
        if total == 0 or k < 1:
            return kept, reasons
        fetch = min(total, k * (RERANK_FACTOR if rerank else 2))
        ceiling = min(total, max(k * MAX_FETCH_FACTOR, 4096))
        pending = list(range(len(queries)))
        while pending:
            ids, scores, vectors = self._raw(queries[pending], fetch, want_vectors, rerank)
            valid_counts = (ids >= 0).sum(axis=1).tolist()
            if isinstance(reject, _DuplicateRule):
                clean = self._clean_prefixes(ids, scores, vectors, k, reject).tolist()
            else:
                clean = [False] * len(pending)
            still = []
            for row, qi in enumerate(pending):
                valid = valid_counts[row]
                why: Counter = Counter()
                if clean[row]:
                    m = min(k, valid)
                    chosen = [_Candidate(i, s, None) for i, s in
                              zip(ids[row, :m].tolist(), scores[row, :m].tolist())]
                else:
                    chosen = []
                    for j in range(ids.shape[1]):
                        if ids[row, j] < 0:
                            continue
                        candidate = _Candidate(int(ids[row, j]), float(scores[row, j]),
                                               vectors[row, j] if vectors is not None else None)
                        reason = reject(candidate, chosen)
                        if reason is None:
                            chosen.append(candidate)
                            if len(chosen) == k:
                                break
                        else:
                            why[reason] += 1
                done = len(chosen) >= k or valid < fetch or fetch >= ceiling
                if done:
                    kept[qi], reasons[qi] = chosen, why
                else:
                    still.append(qi)
            pending = still
            fetch = min(ceiling, fetch * 2)
        return kept, reasons

    def _duplicate_rule(self, threshold: float | None, epsilon: float) -> "_DuplicateRule":
        """Reject a candidate whose score is within `epsilon` of a kept one and whose vector has
        cosine >= `threshold` with that kept one (score alone when vectors are unknown)."""
        return _DuplicateRule(threshold, epsilon)

    def _hits(self, candidates: list[_Candidate]) -> list[Hit]:
        rows = self.source.metadata([c.id for c in candidates])
        return [Hit(c.id, c.score, row) for c, row in zip(candidates, rows)]

    # -- public -----------------------------------------------------------------------
    def search(self, queries: Any, k: int, dedup_threshold: float | None = 0.98, *,
               rerank: bool | None = None,
               score_epsilon: float = DEDUP_SCORE_EPSILON) -> list[list[Hit]]:
        """The k best unique hits for each query row ([q, d] or [d]).

        Queries are L2-normalised for the ip metric. A hit is dropped as a near-duplicate when
        its score is within `score_epsilon` of a kept hit AND its vector has cosine >=
        `dedup_threshold` with it (vectors from the source embeddings, else reconstructed by
        the index; an index that can reconstruct nothing de-duplicates on score alone);
        `dedup_threshold=None` keeps everything. `rerank` (default: for approximate indexes whose
        source embeddings are still on disk) re-scores RERANK_FACTOR·k candidates exactly.
        Fewer than k hits come back only when the index has no more.
        """
        if k < 1:
            raise PlvmError("k must be at least 1")
        prepared = self._queries(queries)
        use_rerank = self._use_rerank(rerank)
        reject = self._duplicate_rule(dedup_threshold, score_epsilon)
        kept, _ = self._collect(prepared, k, reject, dedup_threshold is not None, use_rerank)
        rows = iter(self.source.metadata([c.id for candidates in kept for c in candidates]))
        return [[Hit(c.id, c.score, next(rows)) for c in candidates] for candidates in kept]

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors of `ids` from the source embeddings (exact), else reconstructed."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if self.source.vectors_available():
            return self.source.vectors(ids)
        try:
            return np.stack([self.index.reconstruct(int(i)) for i in ids]) if ids.size else \
                np.zeros((0, self.info.dim), np.float32)
        except RuntimeError as error:
            raise PlvmError(f"{self.info.factory} cannot reconstruct vectors and the source "
                            f"embeddings are gone: {_faiss_message(error)}") from None

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Metadata rows (url, caption, path ...) of global ids."""
        return self.source.metadata(ids)


def _no_prefetch_threads(index: faiss.Index) -> None:
    """A memory-mapped IVF reads its lists through OnDiskInvertedLists, which starts 32 prefetch
    threads on every search call: ~3 ms per call, 30× a single query's own search. The lists are
    memory-mapped, so the page cache does that work; prefetching is switched off."""
    ivf = _ivf(index)
    if ivf is None:
        return
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.prefetch_nthread = 0


def open_index(path: str | os.PathLike, mmap: bool = True) -> OpenedIndex:
    """Open `path` and its sidecar; memory-mapped read-only when the index type allows.

    The sidecar's default search parameters (nprobe, efSearch) are applied; change them with
    `set_search_params`. PlvmError when the index or sidecar is missing, corrupt, or the two
    disagree.
    """
    path = Path(path)
    if not path.is_file():
        raise PlvmError(f"index not found: {path}")
    info = read_sidecar(path)
    index = None
    mmapped = False
    if mmap:
        try:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            mmapped = True
        except RuntimeError as error:
            log.debug("%s cannot be memory-mapped (%s); reading it into memory",
                      path, _faiss_message(error))
    if index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise PlvmError(f"not a readable FAISS index ({_faiss_message(error)}): {path}") from None
    if index.d != info.dim or index.ntotal != info.count:
        raise PlvmError(f"{path} ({index.ntotal} × {index.d}) and its sidecar ({info.count} × "
                        f"{info.dim}) disagree; rebuild the index")
    _no_prefetch_threads(index)
    opened = OpenedIndex(index, info, mmapped)
    if info.search:
        opened.set_search_params(nprobe=info.search.get("nprobe"),
                                 efSearch=info.search.get("efSearch"))
    return opened


# --------------------------------------------------------------------------------------------
# Negatives for Yo'LLaVA
# --------------------------------------------------------------------------------------------


def hard_negatives(index: OpenedIndex, positive_embeddings: Any, k: int = 150,
                   exclude_threshold: float = 0.95, *, dedup_threshold: float | None = 0.98,
                   rerank: bool | None = None) -> list[Hit]:
    """Yo'LLaVA's hard negatives: the k nearest neighbours of the positives' mean embedding.

    The positives are L2-normalised, averaged and re-normalised; hits with cosine >=
    `exclude_threshold` to any positive (the positives themselves, re-uploads, crops) are
    excluded, and near-duplicates among the hits are removed as in `search`. Needs the
    hits' vectors: from the source embeddings, else reconstructed by the index.
    """
    if k < 1:
        raise PlvmError("k must be at least 1")
    positives = np.asarray(positive_embeddings, dtype=np.float32)
    if positives.ndim == 1:
        positives = positives[None, :]
    if positives.ndim != 2 or positives.shape[0] == 0 or positives.shape[1] != index.info.dim:
        raise PlvmError(f"positive embeddings must be [p >= 1, {index.info.dim}], "
                        f"got {list(positives.shape)}")
    if not np.isfinite(positives).all():
        raise PlvmError("positive embeddings contain NaN or infinite values")
    positives = _unit(positives)
    mean = positives.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if norm < 1e-6:
        raise PlvmError("the positives' embeddings cancel out (their mean is zero)")
    query = (mean / norm)[None, :].astype(np.float32)
    if not index.source.vectors_available():
        probe = index._raw(query, 1, want_vectors=True, rerank=False)[2]
        if probe is None:
            raise PlvmError(f"hard negatives need the hits' vectors: the source embeddings are "
                            f"gone and {index.info.factory} cannot reconstruct them")
    use_rerank = index._use_rerank(rerank)
    duplicate = index._duplicate_rule(dedup_threshold, DEDUP_SCORE_EPSILON)

    def reject(candidate: _Candidate, chosen: list[_Candidate]) -> str | None:
        if candidate.vector is None:
            return "no vector"
        if float((positives @ candidate.vector).max()) >= exclude_threshold:
            return "near a positive"
        return duplicate(candidate, chosen)

    kept, reasons = index._collect(index._queries(query), k, reject, True, use_rerank)
    if reasons[0]:
        log.info("hard negatives: left out %s", ", ".join(f"{n} {why}" for why, n in reasons[0].items()))
    return index._hits(kept[0])


def random_negatives(index_info: IndexInfo | OpenedIndex, n: int, seed: int = 0,
                     exclude_ids: Sequence[int] = ()) -> list[Hit]:
    """`n` distinct ids drawn uniformly at random (seeded), none in `exclude_ids`, with their
    metadata; `score` is NaN (no query). Yo'LLaVA's easy negatives."""
    if isinstance(index_info, OpenedIndex):
        info, reader = index_info.info, index_info.source
    else:
        info, reader = index_info, index_info.reader()
    if n < 0:
        raise PlvmError("n must not be negative")
    excluded = {int(i) for i in exclude_ids if 0 <= int(i) < info.count}
    if n > info.count - len(excluded):
        raise PlvmError(f"asked for {n} random negatives but the index has only "
                        f"{info.count - len(excluded)} eligible vectors")
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    drawn = rng.choice(info.count, size=min(info.count, n + len(excluded)), replace=False)
    ids = [int(i) for i in drawn if int(i) not in excluded][:n]
    rows = reader.metadata(ids)
    return [Hit(i, float("nan"), row) for i, row in zip(ids, rows)]
