"""Benchmark: FAISS index build time, size, queries/s and recall@10 on synthetic embeddings.

Generates N clustered unit vectors (float16 .npy, LAION-like, written in chunks so memory stays
small), computes the exact top-10 of held-out queries by streaming over them, then for the
factory `choose_factory` picks (and any `--factory`) measures: build seconds, index bytes on
disk, queries/s through `OpenedIndex.search` at batch 64 and batch 1, and recall against the
exact top-10, both as 10-recall@10 (share of the exact top-10 found) and 1-recall@10 (exact
nearest neighbour within the top 10), for the default search (near-duplicate removal, and exact
re-ranking of approximate indexes from the source embeddings) and for the FAISS index alone, and
the baseline an exact search must beat: a numpy matmul over the memory-mapped float16 vectors
("numpy_matmul", float32 conversion included). Prints one JSON object;
timings compare within one run (the machines are noisy); nothing here is asserted by tests.

    python bench/index.py                              # 1 M × 768: IVF4096,SQ8 (the rule)
    python bench/index.py --n 200000 --factory large   # + the IVF-PQ tier's factory
    python bench/index.py --factory flat --workdir /tmp/bench-index   # + Flat; data kept, reused
    python bench/index.py --n 100000 --d 64 --factory IVF1024,PQ32np --nprobe 16
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from plvmctl import image_index
from plvmctl.image_index.factory import find_ivf

CHUNK = 50_000


def say(message: str) -> None:
    """Progress on stderr (stdout carries only the JSON report)."""
    print(f"[bench/index {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class Clusters:
    """`clusters` centres, each with its own `intrinsic`-dimensional spread, plus a little noise:
    roughly how image embeddings sit (tight groups on low-dimensional sheets)."""

    def __init__(self, d: int, clusters: int, intrinsic: int, spread: float, seed: int):
        rng = np.random.default_rng(seed)
        self.centres = rng.standard_normal((clusters, d)).astype(np.float32)
        scale = spread / math.sqrt(d)  # each cluster direction has length `spread` (centres ~sqrt(d))
        self.bases = (rng.standard_normal((clusters, intrinsic, d)) * scale).astype(np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        clusters, intrinsic, d = self.bases.shape
        labels = rng.integers(0, clusters, n)
        z = rng.standard_normal((n, intrinsic)).astype(np.float32)
        out = self.centres[labels] + 0.02 * rng.standard_normal((n, d)).astype(np.float32)
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.diff(labels[order])) + 1
        for group in np.split(order, bounds):  # one small matmul per cluster
            out[group] += z[group] @ self.bases[labels[group[0]]]
        return _unit(out).astype(np.float32)


def generate(path: Path, n: int, d: int, clusters: Clusters, seed: int) -> None:
    """n vectors into a float16 .npy, CHUNK rows at a time."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, d))
    rng = np.random.default_rng(seed)
    for begin in range(0, n, CHUNK):
        array[begin:begin + CHUNK] = clusters.draw(min(CHUNK, n - begin), rng)
    array.flush()
    del array


def exact_top10(path: Path, queries: np.ndarray) -> np.ndarray:
    """The exact top-10 ids by inner product, streaming over the vectors."""
    data = np.load(path, mmap_mode="r")
    best_scores = np.full((len(queries), 10), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 10), np.int64)
    step = 20_000
    for begin in range(0, len(data), step):
        block = np.asarray(data[begin:begin + step], np.float32)
        block_scores = queries @ block.T
        block_top = np.argpartition(-block_scores, min(9, len(block) - 1), axis=1)[:, :10]
        scores = np.concatenate([best_scores, np.take_along_axis(block_scores, block_top, 1)], 1)
        ids = np.concatenate([best_ids, block_top + begin], axis=1)
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        best_scores = np.take_along_axis(scores, top, 1)
        best_ids = np.take_along_axis(ids, top, 1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, 1)


def numpy_search(path: Path, queries: np.ndarray, k: int = 10, step: int = 65_536) -> np.ndarray:
    """The baseline exact search: a numpy matmul over the memory-mapped float16 vectors,
    `step` rows converted to float32 at a time, a running top-k; ids [q, k], best first."""
    data = np.load(path, mmap_mode="r")
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k), np.int64)
    for begin in range(0, len(data), step):
        block_scores = queries @ np.asarray(data[begin:begin + step], np.float32).T
        top = np.argpartition(-block_scores, k - 1, axis=1)[:, :k]
        scores = np.concatenate([best_scores, np.take_along_axis(block_scores, top, 1)], 1)
        ids = np.concatenate([best_ids, top + begin], axis=1)
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(scores, keep, 1)
        best_ids = np.take_along_axis(ids, keep, 1)
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, 1)


def measure_numpy(path: Path, queries: np.ndarray, truth: np.ndarray, batches: int) -> dict:
    """Queries/s of `numpy_search` at batch 64 over the first `batches` batches, and batch 1."""
    count = min(len(queries), 64 * batches)
    started = time.perf_counter()
    found = np.concatenate([numpy_search(path, queries[b:b + 64]) for b in range(0, count, 64)])
    batch64 = count / (time.perf_counter() - started)
    started = time.perf_counter()
    numpy_search(path, queries[:1])
    batch1 = 1 / (time.perf_counter() - started)
    say(f"numpy matmul: {batch64:.1f} q/s at batch 64, {batch1:.2f} q/s at batch 1")
    return {"queries": count, "queries_per_s_batch64": round(batch64, 2),
            "queries_per_s_batch1": round(batch1, 2), **recall(found.tolist(), truth[:count])}


def recall(found: list[list[int]], truth: np.ndarray) -> dict[str, float]:
    ten = np.mean([len(set(f[:10]) & set(t)) / 10 for f, t in zip(found, truth)])
    one = np.mean([t[0] in f[:10] for f, t in zip(found, truth)])
    return {"recall_10_at_10": round(float(ten), 4), "recall_1_at_10": round(float(one), 4)}


def measure(opened: image_index.OpenedIndex, queries: np.ndarray, truth: np.ndarray,
            single: int) -> dict:
    """Default search (dedup + rerank when approximate) and the FAISS index alone."""
    started = time.perf_counter()
    hits = []
    for begin in range(0, len(queries), 64):
        hits += opened.search(queries[begin:begin + 64], 10)
    batch64 = len(queries) / (time.perf_counter() - started)
    started = time.perf_counter()
    for row in queries[:single]:
        opened.search(row, 10)
    batch1 = single / (time.perf_counter() - started)

    say(f"default search: {batch64:.1f} q/s at batch 64, {batch1:.1f} q/s at batch 1")
    result = {"queries_per_s_batch64": round(batch64, 1), "queries_per_s_batch1": round(batch1, 1),
              **recall([[h.id for h in row] for row in hits], truth)}
    if opened.exact:  # the FAISS search alone is the same search: not repeated
        return result
    started = time.perf_counter()
    raw = []
    for begin in range(0, len(queries), 64):
        _, ids = opened.index.search(queries[begin:begin + 64], 10)
        raw += ids.tolist()
    faiss_batch64 = len(queries) / (time.perf_counter() - started)
    result["faiss_only"] = {"queries_per_s_batch64": round(faiss_batch64, 1), **recall(raw, truth)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index")
    parser.add_argument("--d", type=int, default=768, help="dimension")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for recall")
    parser.add_argument("--single", type=int, default=100, help="queries timed one at a time")
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--intrinsic", type=int, default=16, help="dimension of each cluster's spread")
    parser.add_argument("--spread", type=float, default=3.0,
                        help="cluster spread; 3.0 gives nearest-neighbour cosines ~0.94 (CLIP-like)")
    parser.add_argument("--factory", action="append", default=[],
                        help="extra factory to measure (repeatable); 'large' = choose_factory's "
                             "IVF-PQ rule for this n and d")
    parser.add_argument("--nprobe", type=int, default=None, help="override the default nprobe")
    parser.add_argument("--train-sample", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    parser.add_argument("--workdir", default=None,
                        help="where to write vectors and indexes [default: a temp folder, removed "
                             "after]; vectors, queries and their exact top-10 found there from a "
                             "run with the same data options are reused")
    parser.add_argument("--numpy-batches", type=int, default=2,
                        help="batches of 64 queries timed through the numpy-matmul baseline "
                             "(0: skip it)")
    parser.add_argument("--single-limit", type=int, default=None,
                        help="queries timed one at a time for an exact (Flat) index "
                             "[default: --single]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="plvmctl-bench-index-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        clusters = Clusters(args.d, args.clusters, args.intrinsic, args.spread, args.seed)
        vectors = workdir / "vectors.npy"
        stamp = workdir / "data.json"
        data_options = {key: getattr(args, key) for key in
                        ("n", "d", "queries", "clusters", "intrinsic", "spread", "seed")}
        reused = (stamp.is_file() and vectors.is_file() and (workdir / "truth.npy").is_file()
                  and json.loads(stamp.read_text()) == data_options)
        generate_s = exact_s = None
        if reused:
            queries = np.load(workdir / "queries.npy")
            truth = np.load(workdir / "truth.npy")
            say(f"reusing the vectors, queries and exact top-10 in {workdir}")
        else:
            started = time.perf_counter()
            generate(vectors, args.n, args.d, clusters, args.seed + 1)
            queries = clusters.draw(args.queries, np.random.default_rng(args.seed + 2))
            generate_s = round(time.perf_counter() - started, 2)
            say(f"generated {args.n} x {args.d} in {generate_s:.1f} s")
            started = time.perf_counter()
            truth = exact_top10(vectors, queries)
            exact_s = round(time.perf_counter() - started, 2)
            say(f"exact top-10 of {args.queries} queries in {exact_s:.1f} s")
            if args.workdir:
                np.save(workdir / "queries.npy", queries)
                np.save(workdir / "truth.npy", truth)
                stamp.write_text(json.dumps(data_options))
        baseline = (measure_numpy(vectors, queries, truth, args.numpy_batches)
                    if args.numpy_batches > 0 else None)

        chosen = image_index.choose_factory(args.n, args.d)
        aliases = {"large": image_index.choose_factory(args.n, args.d, exact_limit=0,
                                                       sq_limit=0),
                   "mid": image_index.choose_factory(args.n, args.d, exact_limit=0),
                   "flat": "Flat"}
        factories = [chosen] + [aliases.get(f, f) for f in args.factory]
        results = []
        for number, factory in enumerate(dict.fromkeys(factories)):
            out = workdir / f"index{number}.faiss"
            started = time.perf_counter()
            info = image_index.build_index(vectors, out, factory=factory, progress=False,
                                           train_sample=args.train_sample, seed=args.seed)
            build_s = time.perf_counter() - started
            say(f"built {factory} in {build_s:.1f} s")
            opened = image_index.open_index(out)
            if args.nprobe and find_ivf(opened.index) is not None:
                opened.set_search_params(nprobe=args.nprobe)
            results.append({"factory": factory, "chosen": factory == chosen,
                            "build_s": round(build_s, 2), "train_sample": info.train_sample,
                            "index_bytes": out.stat().st_size,
                            "bytes_per_vector": round(out.stat().st_size / args.n, 1),
                            "search_params": opened.search_params, "mmapped": opened.mmapped,
                            **measure(opened, queries, truth,
                                       args.single_limit or args.single if opened.exact
                                       else args.single)})
            del opened
            out.unlink()
        report = {
            "bench": "index", "n": args.n, "d": args.d, "queries": args.queries,
            "single_queries": args.single, "clusters": args.clusters, "intrinsic": args.intrinsic,
            "spread": args.spread,
            "vectors_dtype": "float16", "vectors_bytes": vectors.stat().st_size,
            "generate_s": generate_s, "exact_top10_s": exact_s, "data_reused": reused,
            "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "numpy_matmul": baseline,
            "indexes": results,
        }
        print(json.dumps(report, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
