"""Does the pocket base LVLM learn to answer with several people described at once? (issue 23)

The committed pocket base recognises one described person per prompt, but with a second
person's sentence in the preamble it fails (docs/bench/pairs.md: PLVM's two-concept positives
5.8 %, "Which of <a> and <b>" 5.0 %). This bench fine-tunes the committed base
(plvmctl/assets/pocket/backbone) on the curriculum's row mix (`pocket.CURRICULUM`) plus the
multi-concept rows of plvmctl.lab.lvlm (`crowd_row`: recognition with 1-3 other people
described too; `which_row`: "Which of <a> and <b> is in this photo?"), in words: people are
described "key value" in the preamble, every name a name token of its own (as PLVM's concept
table gives every concept its own word), no Aligner. Nothing is saved.

Measured on fresh photos of held-out people, before training and every --every steps, by
generating answers and reading them with the evaluation's parsers (`answers.parse_yes_no`,
`answers.parse_which`):

* ``single``: "Is <a> in this photo?" with <a>'s sentence alone (positive / negative);
* ``two``: the same with a second sentence, <a>'s first or second: positives have an absent
  person's sentence besides, negatives the sentence of someone in the photo (as `eval --pairs`
  does, which puts the asked sentence first);
* ``which``: "Which of <a> and <b> is in this photo?" with one of the two there (the first
  name the answer says must be that one), and how many answers name neither;
* answer lengths in tokens (a name is one token) and how many pass the pocket recipe's 64;
* ``reading``: open text questions about a held-out person, no photo, first answer token among
  the possible answers, with their sentence alone, first of two or second of two.

Absent people are one visible trait away from someone in the photo half of the time (the
pretraining's hard negatives), which is harder than `eval --pairs`' random test identities.
Prints one JSON object (and writes it to --out when given).

    python bench/multi_concept.py --steps 50 --every 50 --scenes 10                 # machinery

The committed results (docs/bench/multi_concept_*.json; each was run with --out /tmp/mc/NAME.json
and copied; CPU, one torch thread, 2 cores shared with two other long runs, 2026-12-07; the
first two ran before the ``reading`` measure existed and have none):

    # crowd recognition rows + which-of-two, full comparisons                      ~22 min
    python bench/multi_concept.py --steps 600 --every 300 --scenes 40 --which-answer full \
        --out docs/bench/multi_concept_full.json
    # + recognition answers restate the asked person's traits first; short which   ~19 min
    python bench/multi_concept.py --steps 600 --every 300 --scenes 40 --which-answer short --recall \
        --skip-base --out docs/bench/multi_concept_recall_short.json
    # + 200 text-only steps first, half the text rows with other people described  ~18 min
    python bench/multi_concept.py --steps 600 --every 300 --scenes 40 --which-answer full --recall \
        --crowd-text-share 0.5 --reading-steps 200 --out docs/bench/multi_concept_reading_recall_full.json

"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from plvmctl.lab import lvlm, toy
from plvmctl.lab.several_people import answer_tokens, evaluation_set, measure, reading, reading_set
from plvmctl.lab.pocket import ASSETS, CURRICULUM
from plvmctl.tiny import clip_image_processor

def truth_lengths(tokenizer, config: lvlm.LvlmTrainConfig, steps: int = 20) -> dict:
    """Mean and max answer tokens of the training rows per kind (EOS not counted)."""
    rng = random.Random("plvmctl-multi-concept-lengths")
    lengths: dict[str, list[int]] = {}
    for _ in range(steps):
        rows, _, _ = lvlm.sample_step(rng, toy.training_identities(), config, scene_size=32)
        for row in rows:
            kind = row.kind + ("-crowd" if len(row.descriptions) > 1 and row.kind == "recognition" else "")
            lengths.setdefault(kind, []).append(answer_tokens(tokenizer, row.answer))
    return {kind: {"mean": round(sum(v) / len(v), 1), "max": max(v), "rows": len(v)}
            for kind, v in sorted(lengths.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--scenes", type=int, default=40, help="held-out photos (7 items each)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--crowd-share", type=float, default=0.5)
    parser.add_argument("--which-share", type=float, default=0.25)
    parser.add_argument("--which-answer", choices=lvlm.WHICH_ANSWER_STYLES, default="full")
    parser.add_argument("--crowd-text-share", type=float, default=0.0,
                        help="share of text rows with other people described too")
    parser.add_argument("--reading-steps", type=int, default=0,
                        help="first steps on text rows alone (lvlm's reading_steps)")
    parser.add_argument("--recall", action="store_true",
                        help="recognition answers restate the asked person's traits first (lvlm.recall)")
    parser.add_argument("--name-tags", action="store_true",
                        help="every token after a name carries its vector (lvlm's name_tags, plvmctl.name_tags)")
    parser.add_argument("--dense-text-groups", type=int, default=0,
                        help="dense text rows a step, many questions about one prompt (lvlm.text_group)")
    parser.add_argument("--dense-questions", type=int, default=8)
    parser.add_argument("--dense-several-share", type=float, default=0.75)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-base", action="store_true",
                        help="do not measure the committed base before training (another run did)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = ASSETS / "backbone"
    model = LlavaForConditionalGeneration.from_pretrained(backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    size = model.config.vision_config.image_size
    processor = clip_image_processor(size)
    config = dataclasses.replace(
        CURRICULUM, steps=args.steps, warmup_steps=args.warmup, lr=args.lr, seed=args.seed, log_every=50,
        copy_steps=0, vision_steps=0, vision_aux_weight=0.0, position_aux_weight=0.0,
        crowd_share=args.crowd_share, which_share=args.which_share, which_answer=args.which_answer,
        recall=args.recall, crowd_text_share=args.crowd_text_share, reading_steps=args.reading_steps,
        name_tags=args.name_tags, dense_text_groups=args.dense_text_groups, dense_questions=args.dense_questions,
        dense_several_share=args.dense_several_share)
    items, images = evaluation_set(args.scenes, size, config, args.seed)
    texts = reading_set(200, config, args.seed)
    pixels = lvlm.pixel_values(processor, images)
    started = time.perf_counter()
    curve = []
    if not args.skip_base:
        curve.append({"step": 0, **measure(model, tokenizer, pixels, items, args.max_new_tokens, args.seed),
                      "reading": reading(model, tokenizer, texts, args.seed),
                      "measure_seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps({key: curve[0][key] for key in curve[0] if key != "examples"}), file=sys.stderr,
              flush=True)
    clock = {"train": 0.0, "since": time.perf_counter()}

    def after_step(step: int) -> None:
        clock["train"] += time.perf_counter() - clock["since"]
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            began = time.perf_counter()
            point = {"step": step + 1, **measure(model, tokenizer, pixels, items, args.max_new_tokens, args.seed),
                     "reading": reading(model, tokenizer, texts, args.seed),
                     "measure_seconds": round(time.perf_counter() - began, 1),
                     "seconds_per_step": round(clock["train"] / (step + 1), 3)}
            curve.append(point)
            print(json.dumps({key: point[key] for key in point if key != "examples"}), file=sys.stderr, flush=True)
        clock["since"] = time.perf_counter()

    result = lvlm.train_lvlm(model, tokenizer, processor, config, after_step=after_step,
                             echo=lambda message: print(message, file=sys.stderr, flush=True))
    changed = {"steps": args.steps, "lr": args.lr, "warmup_steps": args.warmup, "seed": args.seed,
               "crowd_share": args.crowd_share, "which_share": args.which_share,
               "which_answer": args.which_answer, "recall": args.recall, "crowd_text_share": args.crowd_text_share,
               "reading_steps": args.reading_steps, "vision_aux_weight": 0.0, "name_tags": args.name_tags,
               "dense_text_groups": args.dense_text_groups, "dense_questions": args.dense_questions,
               "dense_several_share": args.dense_several_share}
    report = {"bench": "multi_concept", "command": " ".join(["python", "bench/multi_concept.py", *sys.argv[1:]]),
              "base": "plvmctl/assets/pocket/backbone", "config": "pocket.CURRICULUM with " + json.dumps(changed),
              "eval_scenes": args.scenes, "threads": args.threads,
              "seconds_per_step": round(clock["train"] / max(1, result.steps), 3),
              "loss_first10": round(sum(result.losses[:10]) / 10, 4) if len(result.losses) >= 10 else None,
              "loss_last10": round(sum(result.losses[-10:]) / 10, 4) if len(result.losses) >= 10 else None,
              "training_answer_tokens": truth_lengths(tokenizer, config), "curve": curve}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
