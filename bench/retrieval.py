"""Benchmark: "who is in this photo" candidate retrieval against stores of many concepts.

For stores of 1,000 / 10,000 / 100,000 concepts (synthetic unit keys: identities as cluster
centres, the default dimension 768 as DINOv2-base's CLS), builds the store's key index as
plvmctl does (concept_index.KeyIndex: Flat while n·d <= 2^22, IVF-Flat above) and measures

- build_seconds: building the index from the keys in memory;
- ms_per_photo: searching one photo's crops (the whole view and its windows: 35 crops for a
  square photo, photo_crops.crop_boxes) for `candidates` keys each, then the best crop per
  concept (recognise.match), median over photos;
- recall_at_1: the share of photos whose planted concept (a noisy copy of one key is one of its
  crops) comes out first, i.e. what IVF's approximation costs against exact search;
- index_mb (FAISS index in memory, from its serialised size) and rss_mb (process resident set).

The reference encoder's cost per photo (35 crops through DINOv2) is not included: it is the
same for any store size. Prints one JSON object; timings compare within one run.

    OMP_NUM_THREADS=1 python bench/retrieval.py
    python bench/retrieval.py --sizes 1000,100000 --dim 64 --photos 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import faiss
import numpy as np
import torch

from plvmctl.photo_crops import CropFeatures, crop_boxes
from plvmctl.concept_index import KeyIndex
from plvmctl.recognise import RetrievalConfig, match


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def run(n: int, dim: int, photos: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    keys = unit(rng.normal(size=(n, dim)).astype(np.float32))
    names = [f"c{i}" for i in range(n)]
    before = rss_mb()
    started = time.perf_counter()
    index = KeyIndex.build(names, keys, "bench")
    build = time.perf_counter() - started
    boxes = crop_boxes(96, 96, "windows")
    config = RetrievalConfig(threshold=0.5)
    times, hits = [], 0
    for number in range(photos):
        planted = int(rng.integers(n))
        crops = unit(rng.normal(size=(len(boxes), dim)).astype(np.float32))  # strangers
        crops[5] = unit(keys[planted][None] + 0.05 * rng.normal(size=(1, dim)).astype(np.float32))[0]
        photo = CropFeatures(boxes, torch.from_numpy(crops))
        started = time.perf_counter()
        looked = match(index, [photo], config)[0]
        times.append(1000 * (time.perf_counter() - started))
        hits += bool(looked.candidates) and looked.candidates[0].name == f"c{planted}"
    return {"concepts": n, "dim": dim, "factory": index.factory, "nprobe": index.nprobe,
            "crops_per_photo": len(boxes), "candidates_per_crop": config.candidates,
            "build_seconds": round(build, 3),
            "ms_per_photo": round(statistics.median(times), 3),
            "ms_per_photo_p90": round(sorted(times)[int(0.9 * (len(times) - 1))], 3),
            "recall_at_1": hits / photos,
            "index_mb": round(faiss.serialize_index(index.index).nbytes / 2**20, 1),
            "rss_mb": round(rss_mb(), 1), "rss_growth_mb": round(rss_mb() - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    report = {"bench": "retrieval", "machine": platform.machine(), "cpus": os.cpu_count(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "faiss_threads": faiss.omp_get_max_threads(),
              "stores": [run(int(n), args.dim, args.photos, args.seed) for n in args.sizes.split(",")]}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
