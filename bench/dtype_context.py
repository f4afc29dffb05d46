"""Benchmark: how far a concept's context tokens move when the reference encoder and the
Aligner run in float16 or bfloat16 instead of float32.

What `model.dtype: auto` rests on (runtime.recipe_dtype: fp16 on a GPU with the released
Aligner, as its authors ran it). The same reference photos (`--photos`, or 8 toy portraits of
held-out identities) are encoded once per dtype with the recipe's encoder and Aligner; the
base LVLM is loaded once (it only checks sizes). For each half dtype, against float32: the
largest absolute difference of any context-token entry, and the relative error
||context - context_fp32|| / ||context_fp32|| (mean over photos). Prints one JSON object.

    python bench/dtype_context.py --recipe llava15-7b --device cuda   # the released Aligner
    python bench/dtype_context.py --recipe pocket --device cpu         # runs anywhere (seconds)

Measuring the released Aligner needs its weights and a GPU; no figure for it is committed.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from plvmctl.images import load_image
from plvmctl.recipe import load_recipe
from plvmctl.runtime import Runtime, load_runtime

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def reference_photos(paths: list[str]) -> list:
    if paths:
        return [load_image(path) for path in paths]
    from plvmctl.lab import toy

    rng = random.Random("bench-dtype-context")
    return [toy.render_portrait(identity, rng) for identity in rng.sample(toy.heldout_identities(), 8)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="pocket")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--photos", nargs="*", default=[], help="reference photos [8 toy portraits]")
    options = parser.parse_args()

    base = load_runtime(load_recipe(options.recipe), device=options.device)
    photos = reference_photos(options.photos)
    items = [(f"ref{number}", photo) for number, photo in enumerate(photos)]
    context = {}
    for name, dtype in DTYPES.items():
        runtime = Runtime(recipe=base.recipe, backbone=base.backbone, device=base.device, dtype=dtype)
        context[name] = torch.stack([concept.context for concept in runtime.encode_concepts(items)])
    exact = context["float32"]
    errors = {}
    for name in ("float16", "bfloat16"):
        difference = context[name] - exact
        relative = difference.flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
        errors[name] = {"max_abs": float(difference.abs().max()), "relative": float(relative.mean())}
    print(json.dumps({"benchmark": "dtype-context", "recipe": base.recipe.name, "device": str(base.device),
                      "aligner": str(base.aligner_id), "photos": len(photos),
                      "context_shape": list(exact.shape[1:]), "against_float32": errors}))


if __name__ == "__main__":
    main()
