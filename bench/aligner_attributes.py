"""Study: what the Aligner's training makes the base LM answer about a concept.

bench/trait_reading.py shows every trait of the 64 px reference portrait in the reference
encoder's tokens (linear probes >= 0.95 on held-out identities) and most of them in the
Aligner's output, while the base LM answers accessory, facial hair and eye colour near chance
(docs/results.md, text MCQ per question). In the Aligner's loss, a compared recognition answer
holds ~25 tokens and the verdict's weight w = 20; an attribute answer ~3 tokens, so the traits
that recognition does not compare get a few % of the gradient. This script evaluates pocket
folders that differ only in their Aligner (each made by `python -m plvmctl.lab.pocket
--aligner-only`, the command in `--variant`'s record) as `make results` asks PLVM (the toy test
set of `--testset`, 30 negatives per identity, seed 0): recognition, text and visual MCQ, both
per question, and the trait probes of the Aligner's output. Prints one JSON object.

docs/bench/aligner_attributes.json compares four Aligners on the committed base, each trained
by `python -m plvmctl.lab.pocket --aligner-only` (about 15 min each) on a copy of the pocket
folder as it was before the description term (`before`: the Aligner of commit a3a1851's
parent, the profile then had description_weight 0); `--aligner description_weight=0` gives
that profile back:

    git archive a3a1851~1 plvmctl/assets/pocket | tar -x -C /tmp && cp -r /tmp/plvmctl/assets/pocket runs/pocket-before
    for v in aw8 vis desc; do cp -r runs/pocket-before runs/pocket-$v; done
    python -m plvmctl.lab.pocket --out runs/pocket-aw8 --aligner-only --aligner description_weight=0 --aligner attribute_weight=8
    python -m plvmctl.lab.pocket --out runs/pocket-vis --aligner-only --aligner description_weight=0 \\
        --aligner visual_mcq_per_photo=4 --aligner visual_share=0.3
    python -m plvmctl.lab.pocket --out runs/pocket-desc --aligner-only --aligner description_weight=1
    OMP_NUM_THREADS=1 python bench/aligner_attributes.py --testset runs/toy-testset --variant before=runs/pocket-before \\
        --variant aw8=runs/pocket-aw8 --variant vis=runs/pocket-vis --variant desc=runs/pocket-desc \\
        --out runs/aligner-attributes > docs/bench/aligner_attributes.json          # ~30 min

`desc` is the committed Aligner. docs/bench/aligner_attributes_desc3.json (and _seed1, on
runs/toy-testset-s1) hold `--variant desc3=runs/pocket-desc3`, made as `desc` with
`--aligner description_weight=3`. docs/bench/aligner_attributes_seed1.json holds `before` and
`desc` on the test identities of seed 1 (`plvmctl toy testset --out runs/toy-testset-s1
--identities 40 --seed 1`), a seed nothing was tuned on.

Each evaluation resumes as `eval` does (OUT/<label>).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from plvmctl.evaluate import build_items, load_testset, recipe_mcq_mode, run_evaluation
from plvmctl.evaluate.item_stats import outcomes, question_accuracy
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime

from trait_reading import portrait_probes

NEG_PER_IDENTITY = 30  # as `make results`
SEED = 0


def evaluate(folder: Path, testset: Path, out: Path) -> dict:
    """PLVM with `folder`'s Aligner on the committed base, as `make results` asks it."""
    recipe = load_recipe("pocket", [f"aligner.path={folder / 'aligner'}"])
    mcq = recipe_mcq_mode(recipe)
    loaded = load_testset(testset)
    runtime = load_runtime(recipe, device="cpu")
    results = run_evaluation(runtime, loaded, ["plvm"], out, neg_per_identity=NEG_PER_IDENTITY, seed=SEED,
                             mcq=mcq, progress=False)
    plvm = results["methods"]["plvm"]
    items = build_items(loaded, neg_per_identity=NEG_PER_IDENTITY, seed=SEED)
    correct = outcomes(items, out / plvm["items_file"], mcq)
    by_question = {}
    for task, rows in (("text", loaded.text), ("visual", loaded.visual)):
        questions = {row.key: row.question for row in rows}
        by_question[task] = {question: round(row["accuracy"], 4) for question, row in
                             question_accuracy(items[task], correct[task], questions).items()}
    return {"recognition": {key: round(plvm["recognition"][key], 4) for key in ("positive", "negative", "mean")},
            "text_mcq": round(plvm["text_qa"]["accuracy"], 4), "visual_mcq": round(plvm["visual_qa"]["accuracy"], 4),
            "text_mcq_by_question": by_question["text"], "visual_mcq_by_question": by_question["visual"],
            "aligner_trait_probes": aligner_probes(runtime)}


def aligner_probes(runtime) -> dict[str, float]:
    """bench/trait_reading.py's `aligner` stage for this runtime's Aligner (its defaults)."""
    return portrait_probes(runtime, photos=False)["stages"]["aligner"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testset", type=Path, default=Path("runs/toy-testset"))
    parser.add_argument("--variant", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a pocket folder to evaluate (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("runs/aligner-attributes"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"command": "python bench/aligner_attributes.py --testset " + str(args.testset) + " "
              + " ".join(f"--variant {v}" for v in args.variant) + f" --out {args.out}", "variants": {}}
    for variant in args.variant:
        label, _, folder = variant.partition("=")
        card = json.loads((Path(folder) / "card.json").read_text(encoding="utf-8"))
        settings = {key: value for key, value in card.get("settings", {}).items() if key.startswith("aligner_")}
        report["variants"][label] = {"folder": folder, "aligner_settings": settings,
                                     "aligner_validation": card.get("aligner", {}).get("validation_recognition"),
                                     **evaluate(Path(folder), args.testset, args.out / label)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
