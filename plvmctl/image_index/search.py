"""Opening an index and searching it: nearest hits, and Yo'LLaVA's hard and random negatives.

`open_index` memory-maps the index and reads its sidecar; `OpenedIndex.search` L2-normalises
queries (ip metric), re-ranks approximate candidates exactly from the source embeddings when
those are still on disk, and removes near-duplicates. `hard_negatives` gives the nearest
neighbours of the positives' mean embedding, `random_negatives` uniformly drawn rows.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from ..errors import PlvmError
from .factory import faiss_message, find_ivf
from .sidecar import IndexInfo, read_sidecar
from .sources import unit_rows

log = logging.getLogger(__name__)

DEDUP_SCORE_EPSILON = 1e-3  # "same score" for near-duplicate removal
RERANK_FACTOR = 4  # approximate candidates fetched per wanted hit when re-ranking exactly
QUERY_BATCH = 256  # queries searched per FAISS call
FLAT_BLOCK = 65_536  # rows per matmul in exact (Flat, inner product) search
MAX_FETCH_FACTOR = 64  # never fetch more than k * this many candidates per query


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
        ivf = find_ivf(self.index)
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
            queries = unit_rows(queries)
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
                    raw = unit_rows(raw)
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
                vectors = raw if self.info.normalized else unit_rows(raw)
            elif want_vectors and self._flat is not None:
                scores, ids = self._index_search(batch, fetch)
                vectors = unit_rows(np.where((ids >= 0)[:, :, None], self._flat[np.maximum(ids, 0)], 0))
            elif want_vectors and self._can_reconstruct is not False:
                try:
                    scores, ids, raw = self.index.search_and_reconstruct(batch, fetch)
                    self._can_reconstruct = True
                    vectors = unit_rows(raw)
                except RuntimeError as error:
                    log.debug("%s cannot reconstruct vectors (%s); de-duplicating by score only",
                              self.info.factory, faiss_message(error))
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
                            f"embeddings are gone: {faiss_message(error)}") from None

    def metadata(self, ids: Sequence[int]) -> list[dict[str, Any]]:
        """Metadata rows (url, caption, path ...) of global ids."""
        return self.source.metadata(ids)


def _no_prefetch_threads(index: faiss.Index) -> None:
    """A memory-mapped IVF reads its lists through OnDiskInvertedLists, which starts 32 prefetch
    threads on every search call: ~3 ms per call, 30× a single query's own search. The lists are
    memory-mapped, so the page cache does that work; prefetching is switched off."""
    ivf = find_ivf(index)
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
                      path, faiss_message(error))
    if index is None:
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as error:
            raise PlvmError(f"not a readable FAISS index ({faiss_message(error)}): {path}") from None
    if index.d != info.dim or index.ntotal != info.count:
        raise PlvmError(f"{path} ({index.ntotal} × {index.d}) and its sidecar ({info.count} × "
                        f"{info.dim}) disagree; rebuild the index")
    _no_prefetch_threads(index)
    opened = OpenedIndex(index, info, mmapped)
    if info.search:
        opened.set_search_params(nprobe=info.search.get("nprobe"),
                                 efSearch=info.search.get("efSearch"))
    return opened


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
    positives = unit_rows(positives)
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
