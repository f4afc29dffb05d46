"""The image index: sources (LAION shards, .npy, image folders), build/open/search, negatives, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from plvmctl import image_index
from plvmctl.image_index import search as index_search
from plvmctl.image_index.factory import default_search, find_ivf
from plvmctl.cli.index import index as index_group
from plvmctl.errors import PlvmError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """FAISS's OpenMP threads spin on a shared 2-core machine; one thread is faster there."""
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, seed: int, draw: int, clusters: int = 1000,
              intrinsic: int = 8) -> np.ndarray:
    """Unit vectors around `clusters` centres (fixed by `seed`), each cluster spread over its own
    low-rank basis; `draw` seeds which points are drawn."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    bases = (rng.standard_normal((clusters, intrinsic, d)) / math.sqrt(d)).astype(np.float32)
    rng = np.random.default_rng(draw)
    out = np.empty((n, d), np.float32)
    for begin in range(0, n, 10_000):
        m = min(10_000, n - begin)
        labels = rng.integers(0, clusters, m)
        z = rng.standard_normal((m, intrinsic)).astype(np.float32)
        block = centres[labels] + np.einsum("mi,mid->md", z, bases[labels])
        block += 0.02 * rng.standard_normal((m, d)).astype(np.float32)
        out[begin:begin + m] = unit(block)
    return out


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ x.T
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
    return np.take_along_axis(top, order, 1)


def save_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


# --------------------------------------------------------------------------------------------
# Factory choice and recall
# --------------------------------------------------------------------------------------------


def test_choose_factory_rules():
    assert image_index.choose_factory(1, 768) == "Flat"
    assert image_index.choose_factory(100_000, 768) == "Flat"
    # Above 100 k: IVF with 8-bit scalar codes (re-ranked exactly at search time) up to 4 M.
    assert image_index.choose_factory(100_001, 768) == "IVF1024,SQ8"
    assert image_index.choose_factory(1_000_000, 768) == "IVF4096,SQ8"
    assert image_index.choose_factory(4_000_000, 768) == "IVF8192,SQ8"
    mid = image_index.choose_factory(4_000_001, 768)
    assert mid == "IVF8192,PQ128np"  # 4·sqrt(4e6) = 8000 → 2^round(12.97) = 8192
    assert image_index.choose_factory(2_000_000, 768, sq_limit=0) == "IVF4096,PQ128np"
    assert image_index.choose_factory(2_000_000, 1000, sq_limit=0) == "IVF4096,PQ125np"  # m | d
    large = image_index.choose_factory(100_000_000, 768)
    assert large == "OPQ128_768,IVF32768_HNSW32,PQ128x8np"
    assert image_index.choose_factory(100_000, 64, exact_limit=10_000) == "IVF1024,SQ8"
    assert image_index.choose_factory(100_000, 64, exact_limit=10_000, sq_limit=0) == "IVF1024,PQ32np"
    # the large tier wins over the SQ8 limit when both are forced down
    assert image_index.choose_factory(100_000, 64, exact_limit=10, large_limit=50_000).startswith("OPQ")
    odd = image_index.choose_factory(50_000, 30, exact_limit=10, sq_limit=0)
    nlist = int(odd.split(",")[0][3:])
    m = int(odd.split(",")[1][2:-2])
    assert nlist & (nlist - 1) == 0 and 30 % m == 0
    tiny = image_index.choose_factory(500, 64, exact_limit=10)  # at most n/39 per list
    assert tiny == "IVF8,SQ8" and 8 * 39 <= 500 < 16 * 39


def test_default_nprobe_by_code_kind():
    """Scalar-quantizer lists are visited nlist/128 at a time (at least 16), PQ lists nlist/64."""
    for factory, nprobe in [("IVF4096,SQ8", 32), ("IVF1024,SQ8", 16), ("IVF8,SQ8", 8),
                            ("IVF4096,PQ8np", 64), ("IVF32768,SQ8", 256)]:
        index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
        assert default_search(index) == {"nprobe": nprobe}, factory


@pytest.fixture(scope="module")
def hundred_k(tmp_path_factory):
    """100 k × 64 clustered vectors on disk, 200 held-out queries and their exact top-10."""
    folder = tmp_path_factory.mktemp("hundred_k")
    x = clustered(100_000, 64, seed=0, draw=1)
    q = clustered(200, 64, seed=0, draw=2)  # held out: same clusters, other points
    return save_npy(folder / "x.npy", x), x, q, exact_top(x, q, 10)


def recall_at_10(hits: list[list[image_index.Hit]], truth: np.ndarray) -> tuple[float, float]:
    """(10-recall@10: share of the exact top-10 found, 1-recall@10: exact top-1 in the top-10)."""
    found = [[h.id for h in row] for row in hits]
    ten = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    one = np.mean([t[0] in f for f, t in zip(found, truth)])
    return float(ten), float(one)


def test_default_index_is_exact_for_100k(hundred_k, tmp_path):
    path, x, q, truth = hundred_k
    info = image_index.build_index(path, tmp_path / "flat.index", progress=False)
    assert info.factory == "Flat" and info.count == 100_000 and info.dim == 64
    opened = image_index.open_index(tmp_path / "flat.index")
    ten, one = recall_at_10(opened.search(q, 10, dedup_threshold=None), truth)
    assert ten >= 0.99 and one == 1.0


def test_ivfpq_recall_with_nprobe(hundred_k, tmp_path):
    path, x, q, truth = hundred_k
    factory = image_index.choose_factory(len(x), 64, exact_limit=10_000, sq_limit=0)
    info = image_index.build_index(path, tmp_path / "ivfpq.index", factory=factory,
                                 train_sample=10_000, progress=False)
    assert info.factory == "IVF1024,PQ32np" and info.train_sample == 10_000
    assert info.search == {"nprobe": 16}
    opened = image_index.open_index(tmp_path / "ivfpq.index")
    assert opened.mmapped and opened.search_params == {"nprobe": 16}
    assert not opened.exact

    opened.set_search_params(nprobe=1)
    low_ten, _ = recall_at_10(opened.search(q, 10, dedup_threshold=None, rerank=False), truth)
    opened.set_search_params(nprobe=16)
    raw_ten, raw_one = recall_at_10(opened.search(q, 10, dedup_threshold=None, rerank=False), truth)
    assert raw_one >= 0.9  # PQ codes alone: the true nearest neighbour is in the top 10
    assert raw_ten >= low_ten
    # Default search re-ranks 4·k candidates exactly from the source embeddings still on disk.
    ten, one = recall_at_10(opened.search(q, 10), truth)
    assert ten >= 0.9 and one >= 0.95
    assert ten > raw_ten


def test_ivf_sq8_tier_with_every_list_visited_equals_exact_search(tmp_path):
    """Above exact_limit the default index is IVF-SQ8; visiting every list and re-ranking
    exactly gives the exact top-k (ids and cosines), batched and one query at a time."""
    x = clustered(6_000, 32, seed=4, draw=5, clusters=50)
    q = clustered(40, 32, seed=4, draw=6, clusters=50)
    path = save_npy(tmp_path / "x.npy", x)
    info = image_index.build_index(path, tmp_path / "sq.index", progress=False, exact_limit=1_000)
    assert info.factory == image_index.choose_factory(6_000, 32, exact_limit=1_000) == "IVF128,SQ8"
    assert info.search == {"nprobe": 16}
    opened = image_index.open_index(tmp_path / "sq.index")
    assert not opened.exact
    opened.set_search_params(nprobe=128)
    truth = exact_top(x, q, 10)
    hits = opened.search(q, 10, dedup_threshold=None)
    assert [[h.id for h in row] for row in hits] == truth.tolist()
    for row, query in zip(hits, q):
        np.testing.assert_allclose([h.score for h in row], x[[h.id for h in row]] @ query, atol=1e-5)
    one_by_one = [opened.search(query, 10, dedup_threshold=None)[0] for query in q[:5]]
    assert [[h.id for h in row] for row in one_by_one] == truth[:5].tolist()
    # SQ8 codes alone already rank well; re-ranking makes the scores exact
    raw = opened.search(q, 10, dedup_threshold=None, rerank=False)
    assert recall_at_10(raw, truth)[0] >= 0.9
    assert max(abs(h.score - float(x[h.id] @ query)) for row, query in zip(raw, q) for h in row) > 1e-5


@pytest.mark.parametrize("rerank", [True, False])
def test_batched_dedup_equals_the_candidate_by_candidate_rule(tmp_path, rerank):
    """Rows without a possible duplicate pair take their first k candidates in one step; the
    result must equal running the rule on each candidate, with and without duplicates."""
    rng = np.random.default_rng(8)
    base = unit(rng.standard_normal((3_000, 16)))
    copies = base[rng.choice(3_000, 400, replace=False)]  # exact copies: equal scores
    near = unit(copies[:200] + 1e-5 * rng.standard_normal((200, 16)))
    x = np.vstack([base, copies, near])
    path = save_npy(tmp_path / "x.npy", x)
    image_index.build_index(path, tmp_path / "d.index", progress=False,
                          factory="Flat" if not rerank else "IVF16,SQ8")
    opened = image_index.open_index(tmp_path / "d.index")
    if rerank:
        opened.set_search_params(nprobe=16)
    queries = np.vstack([x[:30], copies[:30], unit(rng.standard_normal((30, 16)))])
    prepared = opened._queries(queries)
    rule = opened._duplicate_rule(0.98, image_index.DEDUP_SCORE_EPSILON)

    def one_by_one(candidate, chosen):  # not a _DuplicateRule: the per-candidate path
        return rule(candidate, chosen)

    fast, _ = opened._collect(prepared, 10, rule, True, rerank)
    slow, reasons = opened._collect(prepared, 10, one_by_one, True, rerank)
    assert [[c.id for c in row] for row in fast] == [[c.id for c in row] for row in slow]
    assert [[c.score for c in row] for row in fast] == [[c.score for c in row] for row in slow]
    assert sum(r["duplicate"] for r in reasons) >= 30  # duplicates were met and removed
    ids, scores, vectors = opened._raw(prepared, 20, True, rerank)
    clean = opened._clean_prefixes(ids, scores, vectors, 10, rule)
    assert clean.any() and not clean.all()
    hits = opened.search(queries, 10)
    assert [[h.id for h in row] for row in hits] == [[c.id for c in row] for row in slow]


@pytest.mark.slow
def test_the_ten_million_tier_opq_ivf_hnsw_pq_builds_and_searches(hundred_k, tmp_path):
    """The factory of ≥ 10 M vectors (OPQ rotation, HNSW coarse quantizer), forced on 100 k
    (slow: OPQ training takes about a minute here)."""
    path, x, q, truth = hundred_k
    factory = image_index.choose_factory(len(x), 64, exact_limit=10_000, large_limit=50_000)
    assert factory == "OPQ32_64,IVF1024_HNSW32,PQ32x8np"
    info = image_index.build_index(path, tmp_path / "large.index", factory=factory,
                                 train_sample=10_000, progress=False)
    assert info.search == {"nprobe": 16, "efSearch": 64}
    opened = image_index.open_index(tmp_path / "large.index")
    assert opened.search_params == {"nprobe": 16, "efSearch": 64}
    opened.set_search_params(efSearch=128)
    ten, one = recall_at_10(opened.search(q, 10), truth)  # re-ranked exactly from the source
    assert ten >= 0.9 and one >= 0.95


def test_set_search_params_on_flat_is_an_error(tmp_path):
    path = save_npy(tmp_path / "v.npy", unit(np.random.default_rng(0).standard_normal((50, 8))))
    image_index.build_index(path, tmp_path / "f.index", progress=False)
    opened = image_index.open_index(tmp_path / "f.index")
    with pytest.raises(PlvmError, match="nprobe applies to IVF"):
        opened.set_search_params(nprobe=4)
    with pytest.raises(PlvmError, match="efSearch applies to HNSW"):
        opened.set_search_params(efSearch=32)
    with pytest.raises(PlvmError, match="not usable"):
        image_index.build_index(path, tmp_path / "g.index", factory="NotAFactory", progress=False)


# --------------------------------------------------------------------------------------------
# LAION layout
# --------------------------------------------------------------------------------------------


def write_laion(folder: Path, sizes: dict[int, int], d: int = 16, seed: int = 0,
                metadata_rows: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """LAION-layout shards: float16 unit vectors + parquet (url, caption, n) in row groups of 3."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vectors = {}
    for number, size in sizes.items():
        vectors[number] = unit(rng.standard_normal((size, d))).astype(np.float16)
        np.save(folder / "img_emb" / f"img_emb_{number}.npy", vectors[number])
        rows = (metadata_rows or {}).get(number, size)
        table = pa.table({"url": [f"https://example.com/{number}/{r}.jpg" for r in range(rows)],
                          "caption": [f"shard {number} row {r}" for r in range(rows)],
                          "n": list(range(rows))})
        pq.write_table(table, folder / "metadata" / f"metadata_{number}.parquet", row_group_size=3)
    return vectors


def test_laion_shards_map_ids_to_the_right_rows(tmp_path):
    vectors = write_laion(tmp_path / "laion", {0: 5, 2: 7, 10: 4})
    source = image_index.open_laion(tmp_path / "laion")
    assert [s.shard for s in source.shards] == [0, 2, 10]  # numeric, not lexical, order
    assert [(s.start, s.count) for s in source.shards] == [(0, 5), (5, 7), (12, 4)]
    info = image_index.build_index(source, tmp_path / "laion.index", progress=False,
                                 embedding_model="ViT-test")
    assert info.count == 16 and info.dim == 16
    sidecar = json.loads((tmp_path / "laion.index.json").read_text())
    assert sidecar["embedding_model"] == "ViT-test" and sidecar["metric"] == "ip"
    assert [(s["shard"], s["start"], s["count"]) for s in sidecar["shards"]] == [
        (0, 0, 5), (2, 5, 7), (10, 12, 4)]
    assert sidecar["shards"][1]["file"].endswith("img_emb_2.npy")

    opened = image_index.open_index(tmp_path / "laion.index")
    everything = np.concatenate([vectors[0], vectors[2], vectors[10]]).astype(np.float32)
    results = opened.search(everything, 1)
    expected = [(0, r) for r in range(5)] + [(2, r) for r in range(7)] + [(10, r) for r in range(4)]
    for global_id, (hits, (number, row)) in enumerate(zip(results, expected)):
        assert hits[0].id == global_id
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[0].metadata["url"] == f"https://example.com/{number}/{row}.jpg"
        assert hits[0].metadata["caption"] == f"shard {number} row {row}"
        assert hits[0].metadata["n"] == row


def test_laion_row_count_mismatch_names_the_shard(tmp_path):
    write_laion(tmp_path / "laion", {0: 5, 1: 6}, metadata_rows={1: 4})
    with pytest.raises(PlvmError, match=r"shard 1: img_emb_1\.npy has 6 rows but metadata_1\.parquet has 4"):
        image_index.open_laion(tmp_path / "laion")


def test_laion_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    write_laion(tmp_path / "laion", {0: 5})
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import now raises ImportError
    with pytest.raises(PlvmError, match=r"needs pyarrow: pip install 'plvmctl\[laion\]'"):
        image_index.open_laion(tmp_path / "laion")


def test_l2_metric_keeps_vectors_as_they_are(tmp_path):
    x = np.random.default_rng(4).standard_normal((100, 8)).astype(np.float32) * 3
    path = save_npy(tmp_path / "v.npy", x)
    info = image_index.build_index(path, tmp_path / "l2.index", metric="l2", progress=False)
    assert info.metric == "l2" and not info.normalized
    hits = image_index.open_index(tmp_path / "l2.index").search(x[7] + 0.01, 3)[0]
    assert hits[0].id == 7 and hits[0].score == pytest.approx(8 * 0.01 ** 2, rel=1e-2)
    assert hits[0].score <= hits[1].score <= hits[2].score


def test_laion_missing_metadata_and_empty_folder(tmp_path):
    write_laion(tmp_path / "laion", {0: 5, 1: 6})
    (tmp_path / "laion" / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(PlvmError, match="shard 1"):
        image_index.open_laion(tmp_path / "laion")
    (tmp_path / "empty" / "img_emb").mkdir(parents=True)
    with pytest.raises(PlvmError, match="no img_emb"):
        image_index.build_index(tmp_path / "empty", tmp_path / "x.index", progress=False)


def test_sidecar_missing_corrupt_or_disagreeing(tmp_path):
    path = save_npy(tmp_path / "v.npy", unit(np.random.default_rng(0).standard_normal((40, 8))))
    image_index.build_index(path, tmp_path / "a.index", progress=False)
    sidecar = tmp_path / "a.index.json"
    good = sidecar.read_text()
    sidecar.unlink()
    with pytest.raises(PlvmError, match="sidecar missing"):
        image_index.open_index(tmp_path / "a.index")
    sidecar.write_text(good[: len(good) // 2])
    with pytest.raises(PlvmError, match="corrupt"):
        image_index.open_index(tmp_path / "a.index")
    data = json.loads(good)
    data["count"] = 41
    data["shards"][0]["count"] = 41
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PlvmError, match="disagree"):
        image_index.open_index(tmp_path / "a.index")
    del data["dim"]
    sidecar.write_text(json.dumps(data))
    with pytest.raises(PlvmError, match="'dim' missing"):
        image_index.open_index(tmp_path / "a.index")
    with pytest.raises(PlvmError, match="index not found"):
        image_index.open_index(tmp_path / "nope.index")


def test_mmap_falls_back_to_a_plain_read(tmp_path, monkeypatch):
    path = save_npy(tmp_path / "v.npy", unit(np.random.default_rng(0).standard_normal((40, 8))))
    image_index.build_index(path, tmp_path / "a.index", progress=False)
    real = faiss.read_index

    def no_mmap(name, flags=0):
        if flags & faiss.IO_FLAG_MMAP:
            raise RuntimeError("Error: 'mmap' failed: not supported for this index")
        return real(name)

    monkeypatch.setattr(faiss, "read_index", no_mmap)
    opened = image_index.open_index(tmp_path / "a.index")
    assert not opened.mmapped and opened.index.ntotal == 40


# --------------------------------------------------------------------------------------------
# Near-duplicates and negatives
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source_on_disk", [True, False])
def test_search_removes_near_duplicates(tmp_path, source_on_disk):
    rng = np.random.default_rng(3)
    base = unit(rng.standard_normal((300, 32)))
    copy = base[0]
    near_copy = unit(base[0] + 1e-4 * rng.standard_normal(32))
    related = unit(base[0] + 0.4 * unit(rng.standard_normal(32)))  # similar, not a duplicate
    x = np.vstack([base, copy, near_copy, related])  # ids 300, 301, 302
    assert 0.8 < float(related @ base[0]) < 0.95
    path = save_npy(tmp_path / "v.npy", x)
    image_index.build_index(path, tmp_path / "d.index", progress=False)
    if not source_on_disk:  # vectors then come from index reconstruction
        path.rename(tmp_path / "moved.npy")
    opened = image_index.open_index(tmp_path / "d.index")
    assert opened.source.vectors_available() == source_on_disk

    hits = opened.search(base[0], 5)[0]
    ids = [h.id for h in hits]
    assert len(ids) == 5 and len(set(ids) & {0, 300, 301}) == 1
    assert 302 in ids
    everything = [h.id for h in opened.search(base[0], 5, dedup_threshold=None)[0]]
    assert {0, 300, 301} <= set(everything)


def hard_negative_fixture(tmp_path: Path):
    rng = np.random.default_rng(11)
    d = 32
    centre = unit(rng.standard_normal(d))
    positives = unit(centre + 0.25 * rng.standard_normal((3, d)) / math.sqrt(d))
    others = unit(rng.standard_normal((400, d)))
    near_positives = unit(positives + 0.01 * rng.standard_normal((3, d)) / math.sqrt(d))
    decoy = unit(centre + 1.2 * unit(rng.standard_normal(d)))  # close to the mean, not a positive
    x = np.vstack([others, positives, near_positives, decoy, decoy])  # 400-402, 403-405, 406, 407
    assert (positives @ near_positives.T).max(axis=0).min() > 0.99
    assert (positives @ decoy).max() < 0.95
    path = save_npy(tmp_path / "v.npy", x)
    image_index.build_index(path, tmp_path / "h.index", progress=False)
    return x, positives


def test_hard_negatives_are_nearest_to_the_mean_without_positives_or_duplicates(tmp_path):
    x, positives = hard_negative_fixture(tmp_path)
    opened = image_index.open_index(tmp_path / "h.index")
    hits = image_index.hard_negatives(opened, positives, k=20, exclude_threshold=0.95)
    ids = [h.id for h in hits]
    assert len(ids) == 20
    assert not set(ids) & set(range(400, 406))
    assert len(set(ids) & {406, 407}) == 1

    query = unit(unit(positives).mean(axis=0))
    order = np.argsort(-(x @ query), kind="stable")
    expected = [int(i) for i in order if (positives @ x[i]).max() < 0.95 and i != 407][:20]
    assert [406 if i == 407 else i for i in ids] == expected  # 406 and 407 tie exactly
    assert [h.score for h in hits] == sorted([h.score for h in hits], reverse=True)


def test_random_negatives(tmp_path):
    x, _ = hard_negative_fixture(tmp_path)
    opened = image_index.open_index(tmp_path / "h.index")
    first = image_index.random_negatives(opened, 50, seed=1, exclude_ids=range(100))
    again = image_index.random_negatives(opened.info, 50, seed=1, exclude_ids=range(100))
    ids = [h.id for h in first]
    assert ids == [h.id for h in again] and len(set(ids)) == 50
    assert min(ids) >= 100 and max(ids) < len(x)
    assert all(math.isnan(h.score) for h in first)
    assert [h.id for h in image_index.random_negatives(opened, 50, seed=2)] != ids
    with pytest.raises(PlvmError, match="only 308 eligible"):
        image_index.random_negatives(opened, 309, seed=0, exclude_ids=range(100))


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def fake_embed(images: list[Image.Image]) -> np.ndarray:
    """Mean colours of a 4×4 grid: a stand-in for CLIP that tells the test photos apart."""
    return unit(np.stack([np.asarray(im.resize((4, 4)), np.float32).reshape(-1) / 255 + 0.01
                          for im in images]))


def make_photos(folder: Path, count: int = 7) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        pixels = np.random.default_rng(number).integers(0, 256, (24, 24, 3), dtype=np.uint8)
        paths.append(folder / f"a{number}.png")
        Image.fromarray(pixels).save(paths[-1])
    (folder / "bad.png").write_text("not an image")
    (folder / "notes.txt").write_text("ignored")
    return paths


def test_image_folder_skips_bad_files_and_resumes(tmp_path):
    photos = make_photos(tmp_path / "photos")
    work = tmp_path / "work"
    calls = []

    def failing(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return fake_embed(images)

    with pytest.raises(RuntimeError, match="interrupted"):
        image_index.embed_image_folder(tmp_path / "photos", work, failing, batch_size=3,
                                     shard_size=3, progress=False)
    assert (work / "metadata" / "metadata_0.jsonl").is_file()
    assert not (work / "metadata" / "metadata_1.jsonl").exists()

    embedded_now = []

    def counting(images):
        embedded_now.append(fake_embed(images))
        return embedded_now[-1]

    result = image_index.embed_image_folder(tmp_path / "photos", work, counting, batch_size=3,
                                          shard_size=3, progress=False)
    assert result.reused_shards == 1 and result.embedded == 4  # a3..a6, not a0..a2 again
    assert sum(len(block) for block in embedded_now) == 4
    assert result.source.count == 7
    assert len(result.skipped) == 1 and result.skipped[0][0].endswith("bad.png")
    assert "skipped 1 unreadable image" in image_index.describe_skipped(result.skipped)

    info = image_index.build_index(result.source, tmp_path / "p.index", progress=False,
                                 embedding_model="fake")
    assert info.source["kind"] == "images"
    opened = image_index.open_index(tmp_path / "p.index")
    query = fake_embed([Image.open(photos[4]).convert("RGB")])
    top = opened.search(query, 1)[0][0]
    assert top.id == 4 and top.metadata["path"] == str(photos[4].resolve())

    with pytest.raises(PlvmError, match="shard_size differ"):
        image_index.embed_image_folder(tmp_path / "photos", work, fake_embed, shard_size=4,
                                     progress=False)


# --------------------------------------------------------------------------------------------
# Crash safety, GPU errors
# --------------------------------------------------------------------------------------------


def test_crash_while_writing_leaves_the_old_index(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    first = save_npy(tmp_path / "first.npy", unit(rng.standard_normal((30, 8))))
    second = save_npy(tmp_path / "second.npy", unit(rng.standard_normal((60, 8))))
    out = tmp_path / "out" / "i.index"
    image_index.build_index(first, out, progress=False)
    before = (out.read_bytes(), (tmp_path / "out" / "i.index.json").read_bytes())

    def broken(index, writer):
        raise RuntimeError("Error: 'fwrite' failed: No space left on device")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(PlvmError, match="No space left"):
        image_index.build_index(second, out, progress=False)
    assert (out.read_bytes(), (tmp_path / "out" / "i.index.json").read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["i.index", "i.index.json"]
    monkeypatch.undo()
    assert image_index.open_index(out).info.count == 30


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources"), reason="faiss has GPU support here")
def test_gpu_without_faiss_gpu_is_a_clear_error(tmp_path):
    path = save_npy(tmp_path / "v.npy", unit(np.random.default_rng(0).standard_normal((40, 8))))
    with pytest.raises(PlvmError, match=r"faiss-gpu build: pip install 'plvmctl\[gpu\]'"):
        image_index.build_index(path, tmp_path / "g.index", use_gpu=True, progress=False)
    assert not (tmp_path / "g.index").exists()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def fake_app(name: str = "fake-clip") -> SimpleNamespace:
    return SimpleNamespace(runtime=SimpleNamespace(
        backbone=SimpleNamespace(embed_images=fake_embed, name=name)))


def test_cli_build_and_search_npy(tmp_path):
    x = unit(np.random.default_rng(0).standard_normal((200, 16)))
    save_npy(tmp_path / "x.npy", x)
    save_npy(tmp_path / "q.npy", x[[5, 17]])
    runner = CliRunner()
    built = runner.invoke(index_group, ["build", str(tmp_path / "x.npy"), "--out",
                                        str(tmp_path / "x.index"), "--no-progress"])
    assert built.exit_code == 0, built.output
    assert str(tmp_path / "x.index") in built.output
    assert "200 vectors, dim 16, Flat" in built.output
    found = runner.invoke(index_group, ["search", str(tmp_path / "x.index"), "--vector-npy",
                                        str(tmp_path / "q.npy"), "-k", "3", "--json"])
    assert found.exit_code == 0, found.output
    lines = [json.loads(line) for line in found.output.splitlines()]
    assert [line["hits"][0]["id"] for line in lines] == [5, 17]
    assert all(len(line["hits"]) == 3 for line in lines)

    failed = runner.invoke(index_group, ["search", str(tmp_path / "x.index")])
    assert failed.exit_code == 1 and "error: nothing to search" in failed.output
    failed = runner.invoke(index_group, ["build", str(tmp_path / "x.npy"), "--out",
                                         str(tmp_path / "y.index"), "--nprobe", "4", "--no-progress"])
    assert failed.exit_code == 1 and "nprobe applies to IVF" in failed.output
    assert not (tmp_path / "y.index").exists()


def test_cli_image_folder_with_an_embedder(tmp_path):
    photos = make_photos(tmp_path / "photos")
    runner = CliRunner()
    built = runner.invoke(index_group, ["build", str(tmp_path / "photos"), "--out",
                                        str(tmp_path / "p.index"), "--batch-size", "2",
                                        "--no-progress"], obj=fake_app())
    assert built.exit_code == 0, built.output
    assert "7 vectors, dim 48, Flat" in built.output and "skipped 1 unreadable image" in built.output
    assert (tmp_path / "p.index.embeddings" / "img_emb" / "img_emb_0.npy").is_file()
    found = runner.invoke(index_group, ["search", str(tmp_path / "p.index"), str(photos[2]),
                                        "-k", "2"], obj=fake_app())
    assert found.exit_code == 0, found.output
    first_hit = found.output.splitlines()[1]
    assert "id=2" in first_hit and str(photos[2].resolve()) in first_hit
    other = runner.invoke(index_group, ["search", str(tmp_path / "p.index"), str(photos[2])],
                          obj=fake_app("another-model"))
    assert other.exit_code == 1 and "holds embeddings of fake-clip" in other.output
    no_model = runner.invoke(index_group, ["search", str(tmp_path / "p.index"), str(photos[2])],
                             obj=object())
    assert no_model.exit_code == 1 and "needs a model" in no_model.output


def test_memory_mapped_ivf_starts_no_prefetch_threads(tmp_path):
    """OnDiskInvertedLists (how FAISS memory-maps IVF lists) would start 32 prefetch threads
    per search call; open_index turns that off, and searching still works."""
    x = unit(np.random.default_rng(2).standard_normal((2_000, 16)))
    path = save_npy(tmp_path / "x.npy", x)
    image_index.build_index(path, tmp_path / "m.index", factory="IVF16,SQ8", progress=False)
    opened = image_index.open_index(tmp_path / "m.index")
    assert opened.mmapped
    lists = faiss.downcast_InvertedLists(find_ivf(opened.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.prefetch_nthread == 0
    assert opened.search(x[5], 1, dedup_threshold=None)[0][0].id == 5


def test_flat_search_is_a_matmul_equal_to_faiss(tmp_path, monkeypatch):
    """Exact inner-product search runs as blocked numpy matmuls over the (memory-mapped) Flat
    vectors; ids and scores equal FAISS's own search, ties by id, -1 padding past the end."""
    rng = np.random.default_rng(6)
    x = unit(rng.standard_normal((1_000, 24)))
    x[700] = x[300]  # an exact tie
    path = save_npy(tmp_path / "x.npy", x)
    image_index.build_index(path, tmp_path / "f.index", progress=False)
    opened = image_index.open_index(tmp_path / "f.index")
    assert opened.mmapped and opened._flat is not None and not opened._flat.flags.owndata
    monkeypatch.setattr(index_search, "FLAT_BLOCK", 128)  # several blocks, a short last one
    q = np.vstack([x[300], unit(rng.standard_normal((20, 24)))])
    scores, ids = opened._index_search(q, 15)
    faiss_scores, faiss_ids = opened.index.search(q, 15)
    by_id = np.lexsort((faiss_ids, -faiss_scores), axis=1)  # FAISS orders exact ties arbitrarily
    assert ids.tolist() == np.take_along_axis(faiss_ids, by_id, 1).tolist()
    assert ids[0, :2].tolist() == [300, 700]
    np.testing.assert_allclose(scores, faiss_scores, atol=1e-5)
    hits = opened.search(q, 10, dedup_threshold=None)
    assert [[h.id for h in row] for row in hits] == ids[:, :10].tolist()
    small = image_index.open_index(image_index.build_index(save_npy(tmp_path / "s.npy", x[:5]), tmp_path / "s.index",
                                                       progress=False).path)
    scores, ids = small._index_search(q[:2], 8)
    assert (ids[:, 5:] == -1).all() and sorted(ids[1, :5].tolist()) == [0, 1, 2, 3, 4]
    # without the source embeddings, duplicates are still found from the index's own vectors
    path.rename(tmp_path / "gone.npy")
    again = image_index.open_index(tmp_path / "f.index")
    assert not again.source.vectors_available()
    assert len({h.id for h in again.search(x[300], 3)[0]} & {300, 700}) == 1
