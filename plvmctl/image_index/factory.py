"""Which FAISS index suits n vectors of dimension d, and how to train and tune it.

The factory rule (`choose_factory`), the IVF inside a composite index (`find_ivf`), the default
search parameters stored with an index, the training sample size and GPU training. Building and
searching both need these, so they sit below both.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from ..errors import PlvmError

log = logging.getLogger(__name__)

EXACT_LIMIT = 100_000  # up to this many vectors: exact search ("Flat")
SQ_LIMIT = 4_000_000  # up to this many: IVF with 8-bit scalar codes (d bytes per vector)
LARGE_LIMIT = 10_000_000  # from this many: OPQ + IVF with an HNSW coarse quantizer
TRAIN_BYTES_CAP = 2 << 30  # the default training sample stays under 2 GiB of float32

METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def faiss_message(error: BaseException) -> str:
    """The useful last part of a FAISS C++ exception, on one line."""
    text = str(error).strip()
    if "Error: " in text:
        text = text.rsplit("Error: ", 1)[1]
    return " ".join(text.split())


def nlist_for(n: int) -> int:
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
    nlist = nlist_for(n)
    m = _pq_bytes(d)
    if n >= large_limit:
        return f"OPQ{m}_{m * math.ceil(d / m)},IVF{nlist}_HNSW32,PQ{m}x8np"
    if n <= sq_limit:
        return f"IVF{nlist},SQ8"
    while d % m:  # without a rotation, PQ needs m to divide d
        m -= 1
    return f"IVF{nlist},PQ{m}np"


def default_train_sample(n: int, d: int, index: faiss.Index) -> int:
    """Enough for k-means (≥ 50 per list) and PQ (65 536), at most 2 GiB of float32, at most n."""
    ivf = find_ivf(index)
    wanted = max(65_536, 50 * ivf.nlist) if ivf is not None else 65_536
    return max(1, min(n, wanted, TRAIN_BYTES_CAP // (4 * d)))


def find_ivf(index: faiss.Index):
    """The IndexIVF inside `index` (through OPQ / pre-transforms), or None."""
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def default_search(index: faiss.Index) -> dict[str, int]:
    """Default search parameters: nprobe = nlist/64 within 16..256 (nlist/128 for scalar-quantizer
    lists, which are scanned d bytes per vector; re-ranking makes up their code error);
    efSearch 2·nprobe (≥ 64)."""
    ivf = find_ivf(index)
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


def train_index(index: faiss.Index, sample: np.ndarray, use_gpu: bool) -> None:
    """Train `index`; with `use_gpu` the IVF k-means assignment runs on all visible GPUs."""
    ivf = find_ivf(index)
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
