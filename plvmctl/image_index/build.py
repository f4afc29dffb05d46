"""Building an index: train (when the index type needs it), add every vector, write atomically.

`build_index` writes `INDEX` (a FAISS index) and `INDEX.json` (see sidecar.py) through temporary
files renamed into place, so a crash or a full disk leaves any previous index untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
from tqdm import tqdm

from ..errors import PlvmError
from ..fileio import atomic_path, atomic_writer, check_free_space
from .factory import (EXACT_LIMIT, METRICS, check_gpu, choose_factory, default_search,
                      default_train_sample, faiss_message, train_index)
from .search import OpenedIndex
from .sidecar import IndexInfo
from .sources import DEFAULT_CHUNK, EmbeddingSource, open_source, unit_rows

log = logging.getLogger(__name__)


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
                        f"{faiss_message(error)}") from None
    try:
        code_bytes = index.sa_code_size()
    except RuntimeError:  # not every index type says; its vectors are the upper bound
        code_bytes = 4 * d
    check_free_space(Path(out_path).parent, n * code_bytes, f"an index of {n} vectors")
    normalize = metric == "ip"
    search = default_search(index)
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
        used_sample = min(n, train_sample or default_train_sample(n, d, index))
        log.info("training %s on %d of %d vectors", factory, used_sample, n)
        sample = src.sample(used_sample, seed)
        if normalize:
            sample = unit_rows(sample)
        try:
            train_index(index, sample, use_gpu)
        except RuntimeError as error:
            raise PlvmError(f"training {factory} on {used_sample} vectors failed: "
                            f"{faiss_message(error)}") from None
        del sample

    with tqdm(total=n, unit="vec", desc="adding", disable=not progress) as bar:
        for block in src.iter_chunks(chunk):
            index.add(unit_rows(block) if normalize else block)
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


