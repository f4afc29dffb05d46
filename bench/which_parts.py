"""Study: where a base LVLM's place-by-place "Which of <a> and <b>" answers go wrong (issue 23).

For each pocket folder given (`--folder LABEL=PATH`, the base LVLM alone, people described in
words), asks the which-of-two items of `several_people.evaluation_set` (the photos and
questions of `bench/base_skills.py`) and checks every part of a `places` answer
(`lvlm.places_reasoning`: "left red hair tan skin curly style <b> hair red same skin pale
different style curly same mismatch") against the true one, word by word:

* ``read``: the place and the three values read from the photo are right;
* ``named``: the candidate named is the true one (the asked person who agrees most, or with
  `--lookup first` the one with the hair colour read, or "nobody");
* ``copied``: of the parts read and named right, the three stated values are the named
  person's;
* ``verdict``: of the parts read and named right, the match / mismatch is right;

and the accuracy of the whole answer (the name its conclusion gives). Prints JSON.

    OMP_NUM_THREADS=1 python bench/which_parts.py --folder places_pairs=runs/pocket-plb   # ~2 min a folder
    OMP_NUM_THREADS=1 python bench/which_parts.py --lookup first --folder first_600=runs/pocket-first
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from plvmctl.answers import conclusion, parse_which
from plvmctl.families import load_backbone
from plvmctl.lab import lvlm, several_people
from plvmctl.lab.pocket import profile
from plvmctl.lab.several_stage import several_stage_config

PART_END = re.compile(r"(?<=match)\. ")
READ_WORDS = 7  # the place, then value and key for three traits
STATED = (9, 12, 15)  # positions of the stated values after the name: "<b> hair red same skin pale ..."


def measure_folder(folder: Path, scenes: int, seed: int, lookup: str = "most") -> dict:
    backbone = load_backbone(str(folder / "backbone"), device="cpu", dtype="float32")
    config = several_stage_config(profile("full").lvlm, which_answer="places", places_lookup=lookup)
    items, images = several_people.evaluation_set(scenes, backbone.model.config.vision_config.image_size,
                                                  config, seed)
    items = [item for item in items if item.group == "which"]
    pixels = lvlm.pixel_values(backbone.image_processor, images)
    backbone.model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        said = lvlm.generate_answers(backbone.model, backbone.tokenizer, [item.row for item in items], pixels,
                                     max_new_tokens=128)
    counts = {"answers": len(items), "right": 0, "parts": 0, "read": 0, "named": 0, "read_and_named": 0,
              "copied": 0, "verdict": 0}
    for item, answer in zip(items, said):  # item.row.answer: the true places answer
        counts["right"] += parse_which(conclusion(answer), list(item.row.descriptions)) == item.expected
        for true_part, part in zip(PART_END.split(item.row.answer)[:-1], PART_END.split(answer)[:-1]):
            want, got = true_part.split(), part.split()
            counts["parts"] += 1
            read = got[:READ_WORDS] == want[:READ_WORDS]
            named = len(got) > READ_WORDS and got[READ_WORDS] == want[READ_WORDS]
            counts["read"] += read
            counts["named"] += named
            if read and named:
                counts["read_and_named"] += 1
                counts["copied"] += len(got) > STATED[-1] and all(got[i] == want[i] for i in STATED)
                counts["verdict"] += got[-1] == want[-1]
    return {"accuracy": round(counts["right"] / counts["answers"], 4),
            "read": round(counts["read"] / counts["parts"], 4),
            "named": round(counts["named"] / counts["parts"], 4),
            "copied_when_read_and_named": round(counts["copied"] / max(1, counts["read_and_named"]), 4),
            "verdict_when_read_and_named": round(counts["verdict"] / max(1, counts["read_and_named"]), 4),
            "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", action="append", required=True, metavar="LABEL=PATH",
                        help="a pocket folder whose base LVLM to measure; repeatable")
    parser.add_argument("--scenes", type=int, default=60, help="fresh held-out photos (one which item each)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lookup", default="most", choices=("most", "first"),
                        help="the places_lookup the true answers use (the one the base was trained with)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {"scenes": args.scenes, "seed": args.seed, "lookup": args.lookup, "folders": {}}
    for spec in args.folder:
        label, _, path = spec.partition("=")
        report["folders"][label] = {"path": path, **measure_folder(Path(path), args.scenes, args.seed, args.lookup)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
