"""The "who is in this photo" task: every query photo of a test set searched for all test
identities at once by retrieval (recognise.py), scored against who stands in each photo
(`testset.photo_truth`). It asks no question of a method, so it runs once per evaluation,
apart from the methods' tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..concept_index import KeyIndex
from ..engine import Engine
from ..fileio import write_text_atomic
from ..images import load_image
from ..recognise import calibrate_threshold, look, presence_metrics, retrieval_config
from .testset import TestSet, photo_truth, relative_path


def retrieval_task(runtime: Any, testset: TestSet, out_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    """"Who is in this photo?" by retrieval: every query photo searched for all test
    identities' keys (PLVM concepts of their reference photos; recognise.py, the recipe's
    `retrieval` settings). Micro precision / recall / F1 over (photo, identity) pairs, top-1
    accuracy, and the threshold with the best F1 on this set (calibrate_threshold). Each
    photo's truth, found concepts and best candidates go to OUT/items/retrieval.jsonl."""
    config = retrieval_config(runtime.recipe)
    concepts = {c.name: c for c in runtime.encode_concepts(
        [(identity.name, identity.reference) for identity in testset.identities])}
    index = KeyIndex.from_concepts(concepts, runtime.encoder_fingerprint)
    engine = None
    if config.verify:  # retrieve, then verify (recognise.verify)
        engine = Engine(runtime, concepts)
    truth = photo_truth(testset)
    photos = list(truth)
    looked = []
    bar = tqdm(total=len(photos), desc="retrieval: who is in this photo", unit="photo", disable=not progress)
    for start in range(0, len(photos), config.batch_size):
        chunk = photos[start:start + config.batch_size]
        looked += look(runtime, index, [load_image(p) for p in chunk], config, engine)
        bar.update(len(chunk))
    bar.close()
    metrics = presence_metrics([truth[p] for p in photos], [[f.name for f in l.found] for l in looked])
    top1 = sum(bool(l.candidates) and l.candidates[0].name in truth[p] for p, l in zip(photos, looked))
    scores, present = [], []  # for calibration: what a photo's top K could ever find
    for photo, result in zip(photos, looked):
        best = {f.name: f.score for f in result.candidates[:config.top_k]}
        for name in concepts:
            scores.append(best.get(name))
            present.append(name in truth[photo])
    records = [{"image": relative_path(p, testset.root), "truth": sorted(truth[p]),
                "found": [f.to_json() for f in l.found],
                "candidates": [f.to_json() for f in l.candidates[:5]]} for p, l in zip(photos, looked)]
    write_text_atomic(out_dir / "items" / "retrieval.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {**metrics, "threshold": config.threshold, "top_k": config.top_k, "crops": config.crops,
            "verify": config.verify, "verify_by": config.verify_by,
            "identities": len(concepts), "top1_accuracy": top1 / len(photos) if photos else None,
            "best_threshold": calibrate_threshold(scores, present) if any(present) else None,
            "items_file": "items/retrieval.jsonl"}

