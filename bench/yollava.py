"""Benchmark: seconds to train one Yo'LLaVA concept next to PLVM's encode ms, same recipe.

Prints one JSON object:

- `yollava`: one concept trained end to end on toy-world photos (conversations, cached vision
  features, `--epochs` epochs) and its wall time; `seconds_per_concept_at_default_epochs`
  scales the measured training time per epoch to Yo'LLaVA's default epoch count (an
  estimate, labelled as such);
- `plvm`: `runtime.encode_concept` milliseconds per reference (median, warm);
- `ratio`: Yo'LLaVA seconds per concept / PLVM seconds per concept;
- `speedup`: `--steps` optimizer steps of the naive loop (batch 1, vision tower every step)
  against the same number of steps of the cached-features, batch-4 loop: seconds per step,
  and per training conversation (the figure that decides an epoch's time).

Timings compare within one run (the machines are noisy); nothing here is asserted by tests.

    python bench/yollava.py --recipe tiny
    python bench/yollava.py --recipe pocket --epochs 3
    python bench/yollava.py --recipe llava15-7b --device cuda --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from plvmctl.lab import toy
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.methods.yollava.trainer import YollavaConfig, train_yollava, yollava_trainer
from plvmctl.train.per_concept import build_conversations
from plvmctl.train.soft_prompt import SoftPromptTrainer


def _photos(folder: Path, identities: list, per_identity: int, seed: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for number, identity in enumerate(identities):
        for shot in range(per_identity):
            path = folder / f"{number:03d}_{shot}.png"
            toy.render_portrait(identity, rng, size=size).save(path)
            paths.append(path)
    return paths


def _timed_steps(trainer: SoftPromptTrainer, samples: list, steps: int, batch_size: int,
                 cached: bool, sync) -> float:
    """Seconds for `steps` optimizer steps over `samples` taken in order, cycling."""
    sync()
    start = time.perf_counter()
    position = 0
    for _ in range(steps):
        chunk = [samples[(position + i) % len(samples)] for i in range(batch_size)]
        position += batch_size
        trainer.step(chunk, cached=cached)
    sync()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="override model.dtype (auto: bf16 on GPU)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the timed training run")
    parser.add_argument("--positives", type=int, default=5, help="photos of the concept")
    parser.add_argument("--negatives", type=int, default=40, help="negative photos")
    parser.add_argument("--steps", type=int, default=20, help="steps of each loop in the speed-up test")
    parser.add_argument("--encodes", type=int, default=20, help="PLVM encodes timed")
    parser.add_argument("--size", type=int, default=128, help="side of the toy photos in pixels")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = [f"model.dtype={args.dtype}"] if args.dtype else []
    start = time.perf_counter()
    recipe = load_recipe(args.recipe, overrides)
    runtime = load_runtime(recipe, device=args.device)
    load_seconds = time.perf_counter() - start
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    base = recipe.section("yollava", YollavaConfig)
    config = dataclasses.replace(base, epochs=args.epochs, hard_negatives=0,
                                 random_negatives=args.negatives,
                                 select_after_epoch=min(base.select_after_epoch, args.epochs))

    identities = list(toy.heldout_identities())
    with tempfile.TemporaryDirectory(prefix="plvmctl-bench-yollava-") as tmp:
        root = Path(tmp)
        positives = _photos(root / "positives", identities[:1], args.positives, seed=1, size=args.size)
        negatives = _photos(root / "negatives", identities[1:1 + args.negatives], 1, seed=2, size=args.size)

        result = train_yollava(runtime, "bench", positives, negatives, config, root / "run")
        seconds = result.seconds
        per_epoch = seconds["training"] / config.epochs
        default_epochs = YollavaConfig().epochs
        estimate = seconds["conversations"] + seconds["features"] + per_epoch * default_epochs

        # PLVM: one reference -> a concept, no training
        runtime.encode_concept("warmup", positives[0])
        encode_ms = []
        for number in range(args.encodes):
            sync()
            began = time.perf_counter()
            runtime.encode_concept("plvm", positives[number % len(positives)])
            sync()
            encode_ms.append(1000 * (time.perf_counter() - began))
        plvm_ms = statistics.median(encode_ms)

        # naive (batch 1, vision tower every step) vs cached features + batch 4
        samples = build_conversations(runtime, "bench", positives, negatives, config,
                                      root / "run" / "conversations.json").samples
        random.Random(0).shuffle(samples)
        naive = yollava_trainer(runtime, "bench", config)
        _timed_steps(naive, samples, 2, 1, False, sync)  # warm-up
        naive_seconds = _timed_steps(naive, samples, args.steps, 1, False, sync)
        fast = yollava_trainer(runtime, "bench", config)
        sync()
        began = time.perf_counter()
        fast.cache_features(positives + negatives)
        sync()
        cache_seconds = time.perf_counter() - began
        _timed_steps(fast, samples, 2, 4, True, sync)  # warm-up
        fast_seconds = _timed_steps(fast, samples, args.steps, 4, True, sync)

    naive_per_conversation = naive_seconds / args.steps
    fast_per_conversation = fast_seconds / (args.steps * 4)
    report = {
        "recipe": recipe.name,
        "model": str(recipe.model.source),
        "device": str(runtime.device),
        "dtype": str(runtime.backbone.dtype).replace("torch.", ""),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_seconds": round(load_seconds, 2),
        "yollava": {
            "positives": len(positives),
            "negatives": len(negatives),
            "conversations": result.counts,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "num_context": config.num_context,
            "seconds_per_concept": round(seconds["total"], 3),
            "seconds": {key: round(value, 3) for key, value in seconds.items()},
            "seconds_per_epoch": round(per_epoch, 3),
            "seconds_per_concept_at_default_epochs_estimate": round(estimate, 3),
            "default_epochs": default_epochs,
            "first_loss": round(result.losses[0], 4),
            "last_loss": round(result.losses[-1], 4),
        },
        "plvm": {"encode_ms_median": round(plvm_ms, 3), "encode_ms_min": round(min(encode_ms), 3),
                 "encodes": len(encode_ms)},
        "ratio_yollava_over_plvm": round(seconds["total"] / (plvm_ms / 1000), 1),
        "ratio_at_default_epochs_estimate": round(estimate / (plvm_ms / 1000), 1),
        "speedup": {
            "steps": args.steps,
            "naive_batch1_uncached_seconds_per_step": round(naive_seconds / args.steps, 4),
            "cached_batch4_seconds_per_step": round(fast_seconds / args.steps, 4),
            "feature_cache_seconds": round(cache_seconds, 3),
            "naive_seconds_per_conversation": round(naive_per_conversation, 5),
            "cached_batch4_seconds_per_conversation": round(fast_per_conversation, 5),
            "speedup_per_conversation": round(naive_per_conversation / fast_per_conversation, 2),
        },
    }
    if runtime.device.type == "cuda":
        report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
