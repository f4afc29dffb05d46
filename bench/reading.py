"""How fast does the pocket LM learn to read a description in its prompt? (text only, no photo)

The pocket base LVLM must answer questions about `<name>` from the sentence "<name> is ..." in
its preamble before PLVM's Aligner can write that sentence in soft tokens. This bench trains a
fresh pocket LLaVA (the committed sizes) on text-only rows and prints, every --every steps,
the first-answer-token accuracy on held-out identities among the row's possible answers.

    python bench/reading.py --questions hair  --steps 400    # one template, one trait
    python bench/reading.py --questions open  --steps 3000   # every trait, open answers
    python bench/reading.py --questions mixed --steps 1500   # as in pretraining (+ Yes/No, MCQ)
    python bench/reading.py --questions mcq   --steps 1500   # the evaluation's multiple choice only
    python bench/reading.py --format keyvalue ...            # "face round skin pale hair black ..."
    python bench/reading.py --copy-warmup 300 ...            # induction heads first (lvlm's copy_steps)

Prints one JSON object per evaluation and a summary at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch

from plvmctl.lab import toy
from plvmctl.lab import lvlm


def make_row(identity: toy.Identity, rng: random.Random, questions: str, describe) -> lvlm.Row:
    """One text-only row about `identity`, its description in the preamble."""
    descriptions = {identity.name: describe(identity)}
    if questions in ("mixed", "mcq"):
        row = lvlm.text_row(identity, rng, lvlm.LvlmTrainConfig(mcq_share=0.5 if questions == "mixed" else 1.0))
        return dataclasses.replace(row, descriptions=descriptions)
    trait = "hair_colour" if questions == "hair" else rng.choice(list(toy._ATTRIBUTE_TEMPLATES))
    templates = toy._ATTRIBUTE_TEMPLATES[trait]
    template = templates[0] if questions == "hair" else rng.choice(templates)
    return lvlm.Row("text", template.replace("<sks>", f"<{identity.name}>"), getattr(identity, trait),
                    None, descriptions, tuple(toy.TRAITS[trait]))


@torch.no_grad()
def accuracy(model, tokenizer, rows: list[lvlm.Row]) -> float:
    model.eval()
    batch = lvlm.encode_rows(rows, tokenizer, lvlm.num_image_tokens(model))
    logits = lvlm.forward_logits(model, batch, None)
    hits = 0
    for i, row in enumerate(rows):
        scores = logits[i, batch.prompt_lengths[i] - 1]
        expected = int(batch.labels[i, batch.prompt_lengths[i]])
        candidates = [tokenizer(" " + option, add_special_tokens=False)["input_ids"][0]
                      for option in row.options]
        hits += max(candidates, key=lambda token: float(scores[token])) == expected
    model.train()
    return hits / len(rows)


def copy_warmup(model, optimizer, steps: int, rng: random.Random) -> list[float]:
    """`steps` optimizer steps on lvlm.copy_warmup_loss (repeated random word sequences)."""
    return [lvlm.copy_warmup_step(model, optimizer, rng) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--format", choices=lvlm.DESCRIPTION_STYLES, default="sentence")
    parser.add_argument("--questions", choices=("hair", "open", "mixed", "mcq"), default="open")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=64, help="rows per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--eval-rows", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--copy-warmup", type=int, default=0,
                        help="first train N steps on repeated random word sequences")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    def describe(identity: toy.Identity) -> str:
        return lvlm.describe(identity, args.format)

    vocabulary = lvlm.collect_vocabulary(description=args.format)
    model, tokenizer, _ = lvlm.build_pocket_llava(vocabulary, lvlm.LvlmSizes(), args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    pool, heldout = toy.training_identities(), toy.heldout_identities()
    rng, eval_rng = random.Random(args.seed), random.Random(args.seed + 1000)
    eval_rows = [make_row(heldout[eval_rng.randrange(len(heldout))], eval_rng, args.questions, describe)
                 for _ in range(args.eval_rows)]
    chance = sum(1 / len(row.options) for row in eval_rows) / len(eval_rows)
    model.train()
    started = time.perf_counter()
    if args.copy_warmup:
        losses = copy_warmup(model, optimizer, args.copy_warmup, random.Random(args.seed + 7))
        print(json.dumps({"copy_warmup_steps": args.copy_warmup, "loss_first": round(losses[0], 3),
                          "loss_last": round(sum(losses[-10:]) / 10, 3),
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    curve = []
    for step in range(args.steps + 1):
        if step % args.every == 0:
            point = {"step": step, "heldout_accuracy": round(accuracy(model, tokenizer, eval_rows), 3),
                     "seconds": round(time.perf_counter() - started, 1)}
            curve.append(point)
            print(json.dumps(point), flush=True)
        if step == args.steps:
            break
        rows = [make_row(pool[rng.randrange(len(pool))], rng, args.questions, describe)
                for _ in range(args.rows)]
        batch = lvlm.encode_rows(rows, tokenizer, lvlm.num_image_tokens(model))
        loss = lvlm.answer_loss(lvlm.forward_logits(model, batch, None), batch.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    first_90 = next((p["step"] for p in curve if p["heldout_accuracy"] >= 0.9), None)
    print(json.dumps({"format": args.format, "questions": args.questions, "rows_per_step": args.rows,
                      "lr": args.lr, "steps": args.steps, "copy_warmup": args.copy_warmup, "chance": round(chance, 3),
                      "final_accuracy": curve[-1]["heldout_accuracy"], "first_step_at_0.9": first_90,
                      "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
