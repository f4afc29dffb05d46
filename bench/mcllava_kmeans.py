"""Benchmark: MC-LLaVA's k-means start against Yo'LLaVA's word start, steps to accuracy.

Three held-out toy identities (never seen by any training) become concepts, trained together
(`train_mcllava`) twice with the same rows and seed: once with the context tokens started at
k-means centroids of their visual tokens (`kmeans: true`, MC-LLaVA), once at the word
"person" plus noise (`kmeans: false`, Yo'LLaVA's start). After every epoch the concepts answer
"Is <name> in this photo?" on held-out scenes (`plvmctl toy concepts`: per concept, scenes that
show it and as many that do not; strangers around), generated and read as `plvmctl eval`
reads them, without the visual prompt (the k-means start alone), and once more at the end with
it. Prints one JSON object: per run, accuracy (positive / negative / mean) by optimizer step.

    OMP_NUM_THREADS=1 python bench/mcllava_kmeans.py                 # pocket recipe (timing below)
    python bench/mcllava_kmeans.py --recipe tiny --epochs 2          # the machinery only

Measured on the committed pocket model (the one that answers multiple choice value first;
2 CPU cores shared with other jobs, 1 torch thread; 3 concepts, 4 portraits each + one scene
of two together, 36 held-out scenes, ~35 s of training a run, 80 s for both):

    OMP_NUM_THREADS=1 python bench/mcllava_kmeans.py --epochs 10 --queries 6 [--seed 1]

    held-out recognition mean, by epoch (seed 0: 79 steps an epoch; seed 1: 86)
    epoch            1      2      3      4      5      6      7      8      9     10
    seed 0 k-means 0.611  0.555  0.528  0.638  0.723  0.750  0.805  0.778  0.778  0.861
    seed 0 word    0.527  0.611  0.750  0.861  0.805  0.888  0.888  0.834  0.916  0.945
    seed 1 k-means 0.445  0.472  0.527  0.555  0.611  0.638  0.583  0.666  0.666  0.750
    seed 1 word    0.417  0.555  0.639  0.528  0.555  0.500  0.583  0.555  0.584  0.612

Both starts now learn (the concepts' recognition rows carry the base model's own comparison,
YollavaConfig.reasoning_base); which one is ahead changes with the seed (word by 0.08 at the
end of seed 0, k-means by 0.14 at the end of seed 1), so two seeds of three concepts show no
reliable speed-up from the k-means start on this model. The visual prompt at the end located
the concept on 6 / 5 of 18 scenes that show it and on 3 / 4 of 18 that do not (seed 0 / 1),
and moved the final mean by -0.03 (seed 0, both starts), 0.00 (seed 1 k-means) and +0.03
(seed 1 word): with 32 px patches and a one-column place, a drawn ring or a place word adds
little to a model that already compares every person in the photo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from plvmctl.answers import RECOGNITION_QUESTION, parse_yes_no
from plvmctl.engine import AskRequest
from plvmctl.lab.concepts import write_concept_folders
from plvmctl.methods import make_engine
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.methods.mcllava.trainer import McllavaConfig, train_mcllava
from plvmctl.train.per_concept import list_photos


def held_out_accuracy(runtime, concepts: dict, queries: list[dict], *, locate: bool) -> dict:
    """Recognition accuracy of `concepts` on the query scenes (positive, negative, mean)."""
    engine = make_engine(runtime, concepts, locate=locate)
    requests = [AskRequest(RECOGNITION_QUESTION.format(name=row["about"]), row["photo"]) for row in queries]
    results = engine.ask(requests, batch_size=32)
    right = {"positive": [0, 0], "negative": [0, 0]}
    located = {"positive": 0, "negative": 0, "right_place": 0}
    for row, result in zip(queries, results):
        kind = "positive" if row["about"] in row["people"] else "negative"
        place = result.notes.get("located", {}).get(row["about"])
        located[kind] += place is not None
        located["right_place"] += place is not None and kind == "positive" and \
            place.endswith(row["places"][row["about"]])
        said = parse_yes_no(result.answer)
        right[kind][0] += int(said == ("yes" if kind == "positive" else "no"))
        right[kind][1] += 1
    accuracy = {kind: round(hit / total, 3) if total else None for kind, (hit, total) in right.items()}
    accuracy["mean"] = round((accuracy["positive"] + accuracy["negative"]) / 2, 3)
    if locate:  # how often the visual prompt fired on scenes with / without the concept, and where
        accuracy["located"] = {kind: f"{count}/{right[kind][1]}" if kind in right else count
                               for kind, count in located.items()}
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="pocket")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--concepts", type=int, default=3)
    parser.add_argument("--photos", type=int, default=4, help="portraits per concept")
    parser.add_argument("--queries", type=int, default=6, help="held-out scenes per concept and kind")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--attribute-per-photo", type=int, default=None, help="[recipe's mcllava section]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    runtime = load_runtime(recipe, device=args.device)
    base = recipe.section("mcllava", McllavaConfig)
    changes = {"epochs": args.epochs, "select_after_epoch": args.epochs, "seed": args.seed}
    if args.attribute_per_photo is not None:
        changes["attribute_per_photo"] = args.attribute_per_photo
    report: dict = {"recipe": recipe.name, "epochs": args.epochs, "torch_threads": torch.get_num_threads(),
                    "runs": {}}
    with tempfile.TemporaryDirectory(prefix="plvmctl-bench-mcllava-") as tmp:
        root = Path(tmp)
        made = write_concept_folders(root / "toy", args.concepts, photos=args.photos, together=1,
                                     negatives=0, queries=args.queries, seed=args.seed)
        photos = {name: list_photos(folder) for name, folder in made["concepts"].items()}
        report["queries"] = len(made["queries"])
        for label, kmeans in (("kmeans", True), ("word", False)):
            config = dataclasses.replace(base, kmeans=kmeans, **changes)
            curve = []

            def after_epoch(epoch: int, steps: int, trainer) -> None:
                concepts = {name: trainer.concept(name=name) for name in trainer.names}
                curve.append({"epoch": epoch, "step": steps,
                              **held_out_accuracy(runtime, concepts, made["queries"], locate=False)})

            started = time.perf_counter()
            result = train_mcllava(runtime, photos, {}, config, root / label, on_epoch=after_epoch)
            seconds = time.perf_counter() - started
            report["runs"][label] = {
                "kmeans": kmeans, "rows": result.counts["rows"], "steps": result.counts["steps"],
                "curve": curve, "seconds_with_evaluation": round(seconds, 1),
                "training_seconds": round(result.seconds["training"], 1),
                "final_with_visual_prompt": held_out_accuracy(runtime, result.concepts, made["queries"], locate=True),
                "final_without": held_out_accuracy(runtime, result.concepts, made["queries"], locate=False),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
