"""Study: the pocket Aligner trained with multiple-choice attribute rows as well.

The committed pocket Aligner learns from recognition rows and open attribute questions
("What colour is <sks>'s hair?" -> "brown"). Asked the text MCQ about the same traits, with the
options in the prompt, the base LM often says an option's value that the concept does not hold.
This script makes the same training data as `python -m plvmctl.lab.pocket --aligner-only`
(profile "full", seed 0), adds `--per-trait` multiple-choice rows per identity and trait of the
text MCQ ("What is <sks>'s hair color?\\nA. red\\nB. brown\\n...", answered as the pocket base
answers: "brown B"), trains an Aligner with the profile's settings on the committed base LVLM
and encoder, then evaluates it and the committed Aligner as `make results` does (PLVM, the toy
test set of `--testset`, 30 negatives per identity, seed 0): recognition, text and visual MCQ,
and the text MCQ per question (one question per trait on a toy set). Prints one JSON object.

    OMP_NUM_THREADS=1 python bench/aligner_mcq.py --out runs/aligner-mcq \\
        --testset runs/toy-testset > docs/bench/aligner_mcq.json       # ~17 min training + 2 evals

A finished training in `--out` (OUT/train.json) is reused; the evaluations resume as `eval`
does. docs/bench/aligner_mcq.json is that command's output, on the test set `make results`
writes (40 held-out identities, seed 0); docs/benchmarks.md reads it.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from plvmctl.answers import mcq_prompt
from plvmctl.evaluate import build_items, load_testset, recipe_mcq_mode, run_evaluation
from plvmctl.evaluate.item_stats import outcomes, question_accuracy
from plvmctl.lab import toy
from plvmctl.lab.pocket import ASSETS, _stage_recipe, aligner_train_config, profile
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from plvmctl.train.aligner import train_aligner

NEG_PER_IDENTITY = 30  # as `make results`
SEED = 0

# the order of the traits in a toy identity's id ("round-light-brown-short-glasses-none-blue")
IDENTITY_TRAITS = ("face", "skin", "hair_colour", "hair_style", "accessory", "facial_hair", "eye_colour")


def add_mcq_rows(manifest: Path, out: Path, per_trait: int, seed: int) -> int:
    """Copy `manifest` to `out` with `per_trait` MCQ attribute rows per identity and text-MCQ
    trait; returns the number of rows added."""
    rng = random.Random(f"aligner-mcq-{seed}")
    added = 0
    lines = []
    for line in manifest.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        traits = dict(zip(IDENTITY_TRAITS, row["identity"].split("-")))
        for trait, (template, values) in toy._TEXT_QUESTIONS.items():
            for _ in range(per_trait):
                choice, letter = toy._multiple_choice(values, traits[trait], rng)
                row["attributes"].append({"question": mcq_prompt(template, list(choice.items())),
                                          "answer": f"{traits[trait]} {letter}"})
                added += 1
        lines.append(json.dumps(row))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return added


def train(args: argparse.Namespace) -> dict:
    """Train the Aligner with MCQ rows into OUT/run (or reuse a finished one); what it did."""
    record = args.out / "train.json"
    if record.is_file():
        return {**json.loads(record.read_text(encoding="utf-8")), "reused": True}
    settings = profile("full")
    data = args.out / "toy"
    manifest = toy.generate_training_data(data, settings.identities, settings.photos, args.seed,
                                          extra_scenes=0, progress=False)
    with_mcq = data / "manifest-mcq.jsonl"
    added = add_mcq_rows(Path(manifest), with_mcq, args.per_trait, args.seed)
    runtime = load_runtime(_stage_recipe(ASSETS / "backbone", ASSETS / "encoder", None, settings.num_context),
                           device="cpu")
    began = time.perf_counter()
    result = train_aligner(runtime, aligner_train_config(settings, with_mcq, args.out / "run", args.seed))
    done = {"mcq_rows_added": added, "per_trait": args.per_trait, "steps": result.steps,
            "seconds": round(time.perf_counter() - began, 1), "validation": result.validation,
            "aligner": str(result.aligner_path)}
    record.write_text(json.dumps(done) + "\n", encoding="utf-8")
    return {**done, "reused": False}


def evaluate(aligner: str | None, testset: Path, out: Path) -> dict:
    """PLVM with `aligner` (None: the committed one) on `testset`, as `make results` asks it:
    recognition, MCQ accuracies and the text MCQ per published question."""
    recipe = load_recipe("pocket", [f"aligner.path={aligner}"] if aligner else [])
    mcq = recipe_mcq_mode(recipe)
    loaded = load_testset(testset)
    results = run_evaluation(load_runtime(recipe, device="cpu"), loaded, ["plvm"], out,
                             neg_per_identity=NEG_PER_IDENTITY, seed=SEED, mcq=mcq, progress=False)
    plvm = results["methods"]["plvm"]
    items = build_items(loaded, neg_per_identity=NEG_PER_IDENTITY, seed=SEED)
    correct = outcomes(items, out / plvm["items_file"], mcq)
    questions = {row.key: row.question for row in loaded.text}
    by_question = question_accuracy(items["text"], correct["text"], questions)
    return {"recognition": {key: round(plvm["recognition"][key], 4) for key in ("positive", "negative", "mean")},
            "text_mcq": round(plvm["text_qa"]["accuracy"], 4), "visual_mcq": round(plvm["visual_qa"]["accuracy"], 4),
            "text_mcq_by_question": {question: round(row["accuracy"], 4) for question, row in by_question.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/aligner-mcq"))
    parser.add_argument("--testset", type=Path, default=Path("runs/toy-testset"),
                        help="toy test set to evaluate on (`make results` writes runs/toy-testset)")
    parser.add_argument("--per-trait", type=int, default=2, help="MCQ rows per identity and trait")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    trained = train(args)
    print(json.dumps({"command": "python bench/aligner_mcq.py --out " + str(args.out) + " --testset "
                      + str(args.testset) + f" --per-trait {args.per_trait} --seed {args.seed}",
                      "train": trained,
                      "committed": evaluate(None, args.testset, args.out / "eval-committed"),
                      "with_mcq_rows": evaluate(trained["aligner"], args.testset, args.out / "eval")},
                     indent=1))


if __name__ == "__main__":
    main()
