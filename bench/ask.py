"""Benchmark: encode ms per reference and ask questions/s at several batch sizes.

Prints one JSON object. Timings compare within one run (the machines are noisy); nothing
here is asserted by tests.

    python bench/ask.py --recipe tiny
    python bench/ask.py --recipe pocket --batch-sizes 1,8,16 --questions 32
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import numpy as np
import torch
from PIL import Image

from plvmctl.engine import AskRequest, Engine
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime


def _photo(seed: int, size: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def _peak_memory_mb(device: torch.device) -> dict[str, float]:
    memory = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device.type == "cuda":
        memory["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="override model.dtype (auto: bf16 on GPU)")
    parser.add_argument("--references", type=int, default=20, help="references encoded one at a time")
    parser.add_argument("--questions", type=int, default=32, help="questions per batch-size run")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()

    overrides = [f"model.dtype={args.dtype}"] if args.dtype else []
    start = time.perf_counter()
    runtime = load_runtime(load_recipe(args.recipe, overrides), device=args.device)
    runtime.aligner  # load the encoder and the Aligner before timing
    load_seconds = time.perf_counter() - start

    references = [_photo(i) for i in range(args.references + 1)]
    runtime.encode_concept("warmup", references[-1])
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    encode_ms = []
    concepts = {}
    for i, reference in enumerate(references[:-1]):
        sync()
        tick = time.perf_counter()
        concept = runtime.encode_concept(f"c{i}", reference)
        sync()
        encode_ms.append(1000 * (time.perf_counter() - tick))
        concepts[concept.name] = concept

    engine = Engine(runtime, concepts)
    names = list(concepts)
    requests = [AskRequest(f"Is <{names[i % len(names)]}> next to <{names[(i + 1) % len(names)]}>?", _photo(1000 + i))
                for i in range(args.questions)]
    engine.ask(requests[:2], batch_size=2, max_new_tokens=args.max_new_tokens)  # warm-up
    ask = {}
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        sync()
        tick = time.perf_counter()
        results = engine.ask(requests, batch_size=batch_size, max_new_tokens=args.max_new_tokens)
        sync()
        seconds = time.perf_counter() - tick
        failed = sum(not r.ok for r in results)
        ask[f"batch_{batch_size}"] = {"questions_per_s": round(len(requests) / seconds, 2),
                                      "seconds": round(seconds, 3), "failed": failed}
    report = {
        "recipe": args.recipe,
        "model": runtime.backbone.name,
        "device": str(runtime.device),
        "dtype": str(runtime.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "load_s": round(load_seconds, 2),
        "aligner_parameters": sum(p.numel() for p in runtime.aligner.parameters()),
        "k": runtime.recipe.aligner.num_context if not runtime.recipe.aligner.path else runtime.aligner.config.num_context,
        "encode_ms_per_reference": {"median": round(float(np.median(encode_ms)), 3),
                                    "min": round(min(encode_ms), 3), "n": len(encode_ms)},
        "ask": ask,
        "max_new_tokens": args.max_new_tokens,
        **_peak_memory_mb(runtime.device),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
