"""Study: the pocket Aligner trained with multiple-choice attribute rows as well.

The committed pocket Aligner learns from recognition rows and open attribute questions
("What colour is <sks>'s hair?" -> "brown"). Its concepts state hair colour, skin and hair
style almost without error inside a recognition answer's comparison (0.1 / 0.1 / 2.9 % wrong on
the test set), yet the base model answers the text MCQ about the same traits from them at
0.42 / 0.82 / 0.55: asked with options in the prompt, the LM often says the first option's
value instead of reading the concept. This script makes the same training data as
`python -m plvmctl.lab.pocket --aligner-only` (profile "full", seed 0), adds `--per-trait`
multiple-choice rows per identity and trait of the text MCQ ("What is <sks>'s hair
color?\\nA. red\\nB. brown\\n...", answered as the pocket base answers: "brown B"), trains an
Aligner with the profile's settings on the committed base LVLM and encoder, and prints one
JSON line (validation, seconds, where the Aligner is). Then evaluate it as `make results`
does:

    OMP_NUM_THREADS=1 python bench/aligner_mcq.py --out runs/aligner-mcq            # ~9 min alone
    plvmctl --recipe pocket --set aligner.path=runs/aligner-mcq/run/aligner eval \\
        --testset runs/toy-testset --method plvm --neg-per-identity 30 --out runs/aligner-mcq/eval

Not yet measured with this script: the table below is from a one-off script doing these same
steps (its option draws came from another seed), run on 2026-12-02 on the pocket model of
commit 3005af9 (the committed one), 2 CPU cores shared with `make results`, --per-trait 2, on
the make results test set of 40 held-out identities. Rerun the two commands above to replace
it with this script's own output (its JSON line, then the eval's results.md):

    Aligner                    validation  recognition pos / neg / mean  text MCQ  visual MCQ
    committed (no MCQ rows)    0.950       93.8 / 98.2 / 96.0            45.4      66.7
    with MCQ attribute rows    0.981       90.0 / 98.1 / 94.0            65.8      66.2

    text MCQ by trait, with MCQ rows: hair colour 0.97, hair style 0.93, skin 0.95,
    accessory 0.38, facial hair 0.30, eye colour 0.42 (the text prompt: 0.30 / 0.38 / 0.28
    on the last three, the true description 1.00 on all)

So the Q&A reading of a concept is learnt from such rows for every trait the reference
portrait shows; accessory, facial hair and eye colour stay near chance for every method that
starts from the 64 px portrait, which bounds text MCQ near 0.67 in this world.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from plvmctl.answers import mcq_prompt
from plvmctl.lab import toy
from plvmctl.lab.pocket import ASSETS, _stage_recipe, aligner_train_config, profile
from plvmctl.runtime import load_runtime
from plvmctl.train.aligner import train_aligner

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/aligner-mcq"))
    parser.add_argument("--per-trait", type=int, default=2, help="MCQ rows per identity and trait")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
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
    print(json.dumps({"mcq_rows_added": added, "per_trait": args.per_trait, "steps": result.steps,
                      "seconds": round(time.perf_counter() - began, 1), "validation": result.validation,
                      "aligner": str(result.aligner_path)}))


if __name__ == "__main__":
    main()
