"""Study: what a pocket base LVLM can do, one person and several people at once (issue 23).

Measures the base LVLM of each pocket folder given (`--folder LABEL=PATH`, no Aligner: people
are described in words, each name a name token of its own; a base trained with name tags gets
them by its config) on the same fresh photos of held-out people:

* ``one_person``: `lvlm.measure_comparisons` and `lvlm.measure` with the `full` profile's
  settings (one person described a prompt): copying the stated values, reading each trait from
  the photo, the recognition verdict, the generic questions;
* ``several_people``: `several_people.measure_several_people` with the several-people stage's
  settings (`several_stage.SEVERAL_STAGE`: one to three other people described too, "Which of
  <a> and <b>"), answers up to the pocket recipe's 200 tokens; and ``several_comparisons``,
  `lvlm.measure_comparisons` with those settings, as a build of them records it in its card.

The two settings are kept apart on purpose: `measure_comparisons` with the several-people
settings draws recognition rows that describe other people too, a harder test than the
one-person one.

    OMP_NUM_THREADS=1 python bench/base_skills.py --folder committed=plvmctl/assets/pocket \\
        --folder continued=runs/pocket-sb > docs/bench/base_skills_continued.json       # ~10 min

`continued` is the committed base continued on several people for 1,200 steps by
`python -m plvmctl.lab.several_base --out runs/pocket-sb --work runs/pocket-sb-work`.
The committed base has no words for the several-people questions ("both", "who"): its
``several_people`` figures are those of a base that was never asked them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from plvmctl.families import load_backbone
from plvmctl.lab import lvlm
from plvmctl.lab.pocket import profile
from plvmctl.lab.several_stage import several_stage_config
from plvmctl.lab.several_people import measure_several_people

MAX_NEW_TOKENS = 200  # the pocket recipe's generation limit


def measure_folder(folder: Path, scenes: int, seed: int) -> dict:
    torch.manual_seed(seed)  # the name vectors (`lvlm.name_vectors`) come from torch's generator
    backbone = load_backbone(str(folder / "backbone"), device="cpu", dtype="float32")
    model, tokenizer, processor = backbone.model, backbone.tokenizer, backbone.image_processor
    one = profile("full").lvlm
    several = several_stage_config(one)
    comparisons = lvlm.measure_comparisons(model, tokenizer, processor, scenes=scenes, seed=seed, config=one)
    accuracy = lvlm.measure(model, tokenizer, processor, scenes=scenes, seed=seed, config=one)
    crowded = lvlm.measure_comparisons(model, tokenizer, processor, scenes=scenes, seed=seed, config=several)
    people = measure_several_people(model, tokenizer, processor, several, scenes=scenes, seed=seed,
                                    max_new_tokens=MAX_NEW_TOKENS)
    return {
        "one_person": {"comparisons": {key: value for key, value in comparisons.items()
                                       if key not in ("examples", "rows")},
                       "accuracy": {key: value["accuracy"] for key, value in accuracy.items()}},
        "several_people": {key: value for key, value in people.items() if key != "examples"},
        "several_comparisons": {key: value for key, value in crowded.items() if key not in ("examples", "rows")},
        "examples": {"which": people.get("examples", {}).get("which")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", action="append", required=True, metavar="LABEL=PATH",
                        help="a pocket folder whose base LVLM to measure; repeatable")
    parser.add_argument("--scenes", type=int, default=60, help="fresh held-out photos per measure")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"scenes": args.scenes, "seed": args.seed, "max_new_tokens": MAX_NEW_TOKENS, "folders": {}}
    for spec in args.folder:
        label, _, path = spec.partition("=")
        started = time.perf_counter()
        report["folders"][label] = {"path": path, **measure_folder(Path(path), args.scenes, args.seed),
                                    "seconds": round(time.perf_counter() - started, 1)}
        print(f"[base_skills] {label}: {report['folders'][label]['seconds']} s", file=sys.stderr)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
