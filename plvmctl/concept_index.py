"""Retrieval keys of concepts and the concept store's FAISS index of them.

A concept's retrieval key says what its subject looks like to the reference encoder (DINOv2 by
default): the L2-normalised CLS vector of its reference photo, or for a concept trained on
several photos (Yo'LLaVA, MyVLM) the normalised mean of its photos' normalised CLS vectors. It
is stored in the `.concept` file as the part `retrieval.key` [D] (so the file is format
version 2), with the encoder's fingerprint in `extra.retrieval.encoder` (keys of another
encoder are not comparable) and the number of photos behind it in `extra.retrieval.photos`.
A PLVM concept of several photos (references.py) also keeps each photo's key, `retrieval.keys`
[N, D]: the index then holds all N (rows id .. id+N-1 of the concept), and a photo's crop
scores the concept by the best of them.

The store keeps an index of the keys beside the concepts:

    STORE/.retrieval/index.json          what the index holds: encoder, dimension, factory,
                                         every concept file's size and mtime and its row id
                                         (null, with a reason, for a concept without a key)
    STORE/.retrieval/index-<gen>.faiss   the FAISS index it names (inner product on unit keys)

Writes are atomic: a new index file under a new generation name, then index.json, then the old
index file is removed, so index.json always names a complete index. `ConceptStore.save` and
`remove` update an existing index in place; `build` (`plvmctl concepts reindex`) rebuilds it.
It is never trusted when stale: `open_store_index` compares it with the store's files and
rebuilds it (or, with `rebuild=False`, says why it is stale).

The index is exact (`Flat`) while n·d stays under EXACT_FLOATS (5,461 keys of 768-d, 65,536 of
64-d; a photo's 35 crops then take ~30 ms on one core, bench/retrieval.py), then
`IVF{nlist},Flat`, searched with nprobe = max(16, nlist/16): the lists hold the keys themselves, so every score is
the exact cosine the threshold is calibrated on (retrieval.choose_factory's PQ codes would make
the scores approximate).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .concept import NAME_PATTERN, SUFFIX, Concept
from .errors import PlvmError, WriteError
from .fileio import write_bytes_atomic, write_json_atomic
from .locks import LOCK_FILE, hold

log = logging.getLogger(__name__)

# `ConceptStore` in the annotations below is plvmctl.store's: the store imports this module to
# keep its index in step, so this module only names it.

KEY_PART = "retrieval.key"
KEYS_PART = "retrieval.keys"  # [N, D] each reference photo's key (several-photo concepts)
ENCODER_META = "retrieval.encoder"
PHOTOS_META = "retrieval.photos"
REFERENCE_PATH_META = "reference_path"

INDEX_FOLDER = ".retrieval"
TABLE_FILE = "index.json"
TABLE_FORMAT = "plvmctl.concept-index"
TABLE_VERSION = 1
EXACT_FLOATS = 1 << 22  # Flat while keys × dimension stays at most this (16 MB of float32)
MIN_NPROBE = 16


# --------------------------------------------------------------------------------------------
# Keys


def encoder_fingerprint(encoder) -> str:
    """A short, path-independent id of a reference encoder: its config and first weights."""
    config = encoder.model.config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for parameter in list(encoder.model.parameters())[:2]:
        digest.update(parameter.detach().float().cpu().reshape(-1)[:256].numpy().tobytes())
    return digest.hexdigest()[:16]


def key_from_cls(cls_vectors: torch.Tensor) -> torch.Tensor:
    """One key from the CLS vectors [N, D] of a concept's photos: the normalised mean of their
    normalised rows (one photo: its normalised CLS)."""
    if cls_vectors.ndim != 2 or cls_vectors.shape[0] == 0:
        raise PlvmError(f"a retrieval key needs [N, D] CLS vectors, got {tuple(cls_vectors.shape)}")
    unit = torch.nn.functional.normalize(cls_vectors.detach().float().cpu(), dim=-1)
    return torch.nn.functional.normalize(unit.mean(0), dim=0)


def photos_key(runtime, images: Sequence) -> torch.Tensor:
    """The key of photos (PIL images) from the runtime's reference encoder."""
    with torch.no_grad():
        return key_from_cls(runtime.encoder.encode(list(images))[:, 0])


def with_key(concept: Concept, key: torch.Tensor, encoder: str, photos: int = 1,
             reference_path: str | os.PathLike | None = None) -> Concept:
    """`concept` carrying retrieval key `key` (made by encoder fingerprint `encoder`)."""
    meta = concept.meta
    extra = dict(meta.extra)
    extra.update({ENCODER_META: encoder, PHOTOS_META: str(photos)})
    if reference_path is not None:
        extra[REFERENCE_PATH_META] = str(Path(reference_path).resolve())
    parts = dict(concept.parts)
    parts[KEY_PART] = key.detach().float().cpu().reshape(-1).contiguous()
    return Concept(concept.name, concept.word, concept.head, concept.context,
                   replace(meta, extra=extra), concept.visual, parts)


def concept_key(concept: Concept) -> tuple[torch.Tensor, str] | None:
    """(key, encoder fingerprint) of `concept`, or None when it has no key."""
    key = concept.parts.get(KEY_PART)
    if key is None:
        return None
    return key.float().reshape(-1), concept.meta.extra.get(ENCODER_META, "")


def concept_keys(concept: Concept) -> tuple[torch.Tensor, str] | None:
    """(keys [N, D], encoder fingerprint) the index holds for `concept`: each photo's key when
    it keeps them, else its one key; None when it has no key."""
    found = concept_key(concept)
    if found is None:
        return None
    keys = concept.parts.get(KEYS_PART)
    return (keys.float().reshape(len(keys), -1) if keys is not None else found[0][None]), found[1]


def read_keys(path: str | os.PathLike) -> tuple[np.ndarray, str] | None:
    """`concept_keys` read from a .concept file without loading its other tensors."""
    from safetensors import SafetensorError, safe_open

    found = read_key(path)
    if found is None:
        return None
    try:
        with safe_open(str(path), framework="np") as handle:
            if KEYS_PART not in handle.keys():
                return found[0][None], found[1]
            keys = np.asarray(handle.get_tensor(KEYS_PART), dtype=np.float32)
    except (SafetensorError, OSError, ValueError) as error:
        raise PlvmError(f"not a readable .concept file ({error}): {path}") from None
    return keys.reshape(len(keys), -1), found[1]


def read_key(path: str | os.PathLike) -> tuple[np.ndarray, str] | None:
    """(key, encoder) read from a .concept file without loading its other tensors; None when
    it has no key. PlvmError when the file is unreadable."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            metadata = handle.metadata() or {}
            if KEY_PART not in handle.keys():
                return None
            key = np.asarray(handle.get_tensor(KEY_PART), dtype=np.float32).reshape(-1)
    except (SafetensorError, OSError, ValueError) as error:
        raise PlvmError(f"not a readable .concept file ({error}): {path}") from None
    return key, metadata.get(f"extra.{ENCODER_META}", "")


# --------------------------------------------------------------------------------------------
# An index of keys (in memory)


def choose_index_factory(n: int, d: int, exact_floats: int = EXACT_FLOATS) -> str:
    """`Flat` while n·d <= exact_floats, else `IVF{nlist},Flat` (nlist as the image index's rule)."""
    from .image_index.factory import nlist_for

    if n * d <= exact_floats:
        return "Flat"
    return f"IVF{nlist_for(n)},Flat"


def _new_index(factory: str, keys: np.ndarray, ids: np.ndarray):
    import faiss

    d = keys.shape[1]
    if factory == "Flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    else:
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
    if len(keys):
        index.add_with_ids(keys, ids)
    return index


def default_nprobe(index) -> int | None:
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return min(ivf.nlist, max(MIN_NPROBE, ivf.nlist // 16))


@dataclass
class KeyIndex:
    """A FAISS index of concept keys: row ids → concept names, searched by cosine."""

    index: object
    names: dict[int, str]  # row id -> concept name
    encoder: str
    dim: int
    factory: str
    nprobe: int | None = None

    @classmethod
    def build(cls, names: Sequence[str], keys: np.ndarray, encoder: str = "",
              exact_floats: int = EXACT_FLOATS) -> "KeyIndex":
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or len(keys) != len(names):
            raise PlvmError(f"expected one [D] key per concept, got {keys.shape} for {len(names)}")
        factory = choose_index_factory(len(keys), keys.shape[1], exact_floats)
        ids = np.arange(len(keys), dtype=np.int64)
        index = _new_index(factory, keys, ids)
        return cls(index, {i: name for i, name in enumerate(names)}, encoder, keys.shape[1],
                   factory, default_nprobe(index))

    @classmethod
    def from_concepts(cls, concepts: dict[str, Concept], encoder: str = "") -> "KeyIndex":
        """An index of the keys of `concepts` (those without a key, or with another encoder's
        key when `encoder` is given, are left out)."""
        names, keys = [], []
        for name, concept in concepts.items():
            found = concept_keys(concept)
            if found is None or (encoder and found[1] != encoder):
                continue
            names += [name] * len(found[0])
            keys.append(found[0].numpy())
        if not keys:
            raise PlvmError("none of the concepts has a retrieval key")
        return cls.build(names, np.concatenate(keys), encoder or concept_key(concepts[names[0]])[1])

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """For each unit query row, up to k (concept name, cosine) pairs, best first (a concept
        with several keys may appear more than once)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise PlvmError(f"the concept index holds {self.dim}-d keys, got queries of shape "
                            f"{tuple(queries.shape)}: made with another reference encoder")
        k = min(k, self.count)
        if k < 1 or len(queries) == 0:
            return [[] for _ in range(len(queries))]
        if self.nprobe:
            import faiss

            faiss.extract_index_ivf(self.index).nprobe = self.nprobe
        scores, ids = self.index.search(queries, k)
        return [[(self.names[int(i)], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]


# --------------------------------------------------------------------------------------------
# The store's index on disk


@dataclass
class StoreStatus:
    """Whether a store's index can be trusted: `fresh`, or why not (`reason`)."""

    fresh: bool
    reason: str = ""


@dataclass
class BuildReport:
    """What a build indexed and what it left out (name → reason)."""

    indexed: int
    left_out: dict[str, str] = field(default_factory=dict)
    factory: str = ""
    encoder: str = ""
    index: "KeyIndex | None" = None  # the index built
    unsaved: str = ""  # why it could not be written (only with build(must_write=False))


def _stat(path: Path) -> dict[str, int]:
    info = path.stat()
    return {"size": info.st_size, "mtime_ns": info.st_mtime_ns}


class StoreIndex:
    """The index of one ConceptStore's keys, in STORE/.retrieval/."""

    def __init__(self, store: ConceptStore):
        self.store = store
        self.folder = store.root / INDEX_FOLDER
        self.table_path = self.folder / TABLE_FILE

    # -- reading -------------------------------------------------------------------------
    def files(self) -> dict[str, dict[str, int]]:
        """Every concept file of the store: name → size and mtime."""
        found = {}
        if self.store.root.is_dir():
            for entry in os.scandir(self.store.root):
                if entry.name.endswith(SUFFIX) and entry.is_file():
                    name = entry.name[:-len(SUFFIX)]
                    if NAME_PATTERN.match(name):
                        info = entry.stat()
                        found[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        return found

    def table(self) -> dict | None:
        if not self.table_path.is_file():
            return None
        try:
            table = json.loads(self.table_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError, UnicodeDecodeError):
            return None
        if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT \
                or table.get("version") != TABLE_VERSION:
            return None
        return table

    def status(self, table: dict | None = None) -> StoreStatus:
        """Fresh when index.json describes every concept file as it is now."""
        table = table if table is not None else self.table()
        if table is None:
            return StoreStatus(False, f"no index in {self.folder} (or an unreadable one)")
        if not (self.folder / table.get("file", "")).is_file():
            return StoreStatus(False, f"the index file {table.get('file')} is missing")
        indexed, files = table.get("concepts", {}), self.files()
        for name in sorted(set(files) | set(indexed)):
            if name not in indexed:
                return StoreStatus(False, f"<{name}> is not in the index")
            if name not in files:
                return StoreStatus(False, f"<{name}> was removed from the store")
            entry = indexed[name]
            if (entry.get("size"), entry.get("mtime_ns")) != (files[name]["size"], files[name]["mtime_ns"]):
                return StoreStatus(False, f"<{name}> changed since the index was built")
        return StoreStatus(True)

    def load(self) -> KeyIndex:
        """The index as it is on disk (fresh or not: see `open_store_index`)."""
        import faiss

        table = self.table()
        if table is None:
            raise PlvmError(f"no concept index in {self.folder}: run `plvmctl concepts reindex`")
        path = self.folder / table["file"]
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise PlvmError(f"unreadable concept index {path}: run `plvmctl concepts reindex` "
                            f"({str(error).splitlines()[-1]})") from None
        names = {entry["id"] + row: name for name, entry in table["concepts"].items()
                 if entry.get("id") is not None for row in range(entry.get("keys", 1))}
        if index.ntotal != len(names):
            raise PlvmError(f"concept index {path} holds {index.ntotal} keys but index.json names "
                            f"{len(names)}: run `plvmctl concepts reindex`")
        return KeyIndex(index, names, table["encoder"], table["dim"], table["factory"],
                        table.get("nprobe"))

    # -- writing -------------------------------------------------------------------------
    def _write(self, index, table: dict) -> None:
        """New index file under a new name, then index.json, then the old file goes."""
        import faiss

        old = self.table()
        table["file"] = f"index-{uuid.uuid4().hex[:12]}.faiss"
        write_bytes_atomic(self.folder / table["file"], faiss.serialize_index(index).tobytes())
        try:
            write_json_atomic(self.table_path, table)
        except BaseException:
            (self.folder / table["file"]).unlink(missing_ok=True)
            raise
        if old and old.get("file") and old["file"] != table["file"]:
            (self.folder / old["file"]).unlink(missing_ok=True)

    def lock(self):
        """Writers of the index take turns (two `encode`s into one store both update it)."""
        return hold(self.folder / LOCK_FILE, f"the concept index of {self.store.root}", wait=True)

    def build(self, encoder: str | None = None, exact_floats: int = EXACT_FLOATS,
              must_write: bool = True) -> BuildReport:
        """Index every key of the store made by `encoder` (default: the most common one). With
        `must_write=False` an index that cannot be written (a full disk) is still returned."""
        with self.lock():
            return self._build(encoder, exact_floats, must_write)

    def _build(self, encoder: str | None, exact_floats: int, must_write: bool) -> BuildReport:
        files = self.files()
        read: dict[str, tuple[np.ndarray, str]] = {}
        left_out: dict[str, str] = {}
        for name in sorted(files):
            try:
                found = read_keys(self.store.path_for(name))
            except PlvmError as error:
                left_out[name] = str(error)
                continue
            if found is None:
                left_out[name] = "no retrieval key"
            else:
                read[name] = found
        if encoder is None:
            counts = Counter(e for _, e in read.values())
            encoder = counts.most_common(1)[0][0] if counts else ""
        names, keys = [], []
        first: dict[str, int] = {}  # concept -> its first row
        for name, (key, made_by) in read.items():
            if made_by != encoder:
                left_out[name] = f"key made by another reference encoder ({made_by or 'unknown'})"
            elif keys and key.shape[1] != keys[0].shape[1]:
                left_out[name] = f"key of dimension {key.shape[1]}, not {keys[0].shape[1]}"
            else:
                first[name] = sum(len(k) for k in keys)
                names += [name] * len(key)
                keys.append(key)
        dim = int(keys[0].shape[1]) if keys else 0
        matrix = np.concatenate(keys) if keys else np.zeros((0, max(dim, 1)), np.float32)
        if keys:
            built = KeyIndex.build(names, matrix, encoder, exact_floats)
        else:
            import faiss

            built = KeyIndex(faiss.IndexIDMap2(faiss.IndexFlatIP(1)), {}, encoder, 1, "Flat")
        entries = {name: {**stat, "id": first.get(name)} for name, stat in files.items()}
        for name, (key, _) in read.items():
            if name in first and len(key) > 1:
                entries[name]["keys"] = len(key)
        for name, reason in left_out.items():
            entries[name]["note"] = reason
        table = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "encoder": encoder,
                 "dim": built.dim, "factory": built.factory, "nprobe": built.nprobe,
                 "next_id": len(names), "concepts": entries}
        report = BuildReport(len(first), left_out, built.factory, encoder, built)
        try:
            self._write(built.index, table)
        except WriteError as error:
            if must_write:
                raise
            report.unsaved = str(error)
        return report

    def refresh(self, name: str) -> None:
        """Update an existing index for concept `name` just written or removed. An index that
        does not exist stays absent (it is built on first use); one that was already stale
        stays stale (only this entry changes)."""
        with self.lock():
            self._refresh(name)

    def _refresh(self, name: str) -> None:
        table = self.table()
        if table is None:
            return
        index = self.load()
        if index.count == 0:  # nothing indexed yet: the key width is not known, build afresh
            self._build(table.get("encoder") or None, EXACT_FLOATS, True)
            return
        entries = table["concepts"]
        old = entries.pop(name, None)
        if old is not None and old.get("id") is not None:
            index.index.remove_ids(np.arange(old["id"], old["id"] + old.get("keys", 1), dtype=np.int64))
        path = self.store.path_for(name)
        if path.is_file():
            entry = _stat(path)
            try:
                found = read_keys(path)
            except PlvmError as error:
                found, entry["note"] = None, str(error)
            if found is None:
                entry.setdefault("note", "no retrieval key")
                entry["id"] = None
            elif found[1] != table["encoder"] or found[0].shape[1] != table["dim"]:
                entry.update(id=None, note=f"key made by another reference encoder ({found[1] or 'unknown'})")
            else:
                count = len(found[0])
                entry["id"] = table["next_id"]
                if count > 1:
                    entry["keys"] = count
                table["next_id"] += count
                index.index.add_with_ids(found[0], np.arange(entry["id"], entry["id"] + count, dtype=np.int64))
            entries[name] = entry
        self._write(index.index, table)


def open_store_index(store: ConceptStore, encoder: str, rebuild: bool = True,
                     say=None) -> KeyIndex:
    """The store's index of keys made by `encoder`, rebuilt first when missing, stale or made
    with another encoder (`say` gets one line about it); with `rebuild=False` those are a
    PlvmError instead."""
    index_files = StoreIndex(store)
    table = index_files.table()
    status = index_files.status(table)
    if status.fresh and table.get("encoder") != encoder:
        status = StoreStatus(False, "the index holds keys of another reference encoder")
    if not status.fresh:
        if not rebuild:
            raise PlvmError(f"the concept index of {store.root} is stale ({status.reason}): run "
                            f"`plvmctl concepts reindex`")
        report = index_files.build(encoder, must_write=False)
        if say:
            say(f"concept index rebuilt ({status.reason}): {report.indexed} concepts indexed"
                + (f", {len(report.left_out)} without a usable key (see `plvmctl concepts reindex`)"
                   if report.left_out else "")
                + (f"; kept in memory only ({report.unsaved})" if report.unsaved else ""))
    index = report.index if not status.fresh and report.unsaved else index_files.load()
    if index.count == 0:
        raise PlvmError(f"no concept in {store.root} has a retrieval key of this reference encoder: "
                        f"encode concepts, or run `plvmctl concepts reindex --photos DIR`")
    return index


# --------------------------------------------------------------------------------------------
# Keys for concepts that lack them (plvmctl concepts reindex)


@dataclass
class KeyFill:
    """What `add_missing_keys` did: name → the photo its key came from, or why it has none."""

    added: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


def _photos_by_digest(folders: Sequence[str | os.PathLike]) -> dict[str, Path]:
    from .fileio import sha256_file
    from .images import list_images

    found: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise PlvmError(f"photo folder not found: {folder}")
        for path in list_images(folder):
            found.setdefault(sha256_file(path), path)
    return found


def add_missing_keys(runtime, store: ConceptStore, photo_folders: Sequence[str | os.PathLike] = (),
                     ) -> KeyFill:
    """Give every concept of `store` without a key of the runtime's encoder one, from its
    reference photo: the path it recorded when that file still has the recorded sha256, else a
    photo under `photo_folders` with that sha256. Concepts whose photo is not found are
    reported in `missing`. Files are rewritten atomically (as format version 2)."""
    from .fileio import sha256_file
    from .images import load_image

    encoder = runtime.encoder_fingerprint
    result = KeyFill()
    by_digest: dict[str, Path] | None = None
    for name in store.names():
        path = store.path_for(name)
        try:
            found = read_key(path)
            if found is not None and found[1] == encoder:
                continue
            concept = Concept.load(path)
        except PlvmError as error:
            result.missing[name] = str(error)
            continue
        digest = concept.meta.reference_sha256
        recorded = concept.meta.extra.get(REFERENCE_PATH_META)
        photo = None
        if recorded and Path(recorded).is_file() and (not digest or sha256_file(recorded) == digest):
            photo = Path(recorded)
        elif digest:
            if by_digest is None:
                by_digest = _photos_by_digest(photo_folders)
            photo = by_digest.get(digest)
        if photo is None:
            where = f"; pass --photos DIR with its reference photo (sha256 {digest[:12]}…)" if digest \
                else "; it records no reference photo"
            result.missing[name] = f"reference photo not found{where}"
            continue
        try:
            key = photos_key(runtime, [load_image(photo)])
        except PlvmError as error:
            result.missing[name] = f"reference photo {photo} unreadable: {error}"
            continue
        with_key(concept, key, encoder, 1, photo).save(path)
        result.added[name] = str(photo)
    return result
