"""Where does a "compare" recognition answer go wrong? Copy, read, compare, verdict.

A pocket base LVLM trained with `recognition_answer="compare"` answers "Is <name> in this
photo?" by checking the description against everyone in the photo before its verdict:
"left hair red red same skin tan dark different style long long same mismatch ... . No, ...".
On fresh photos of held-out people this generates those answers and scores each part
against the truth: the described value copied from the prompt (copy), the value read from
the photo (read, per trait), the same/different word against the words written (compare),
and the final Yes/No (verdict, positive and negative apart).

    python bench/comparing.py --backbone runs/bench/compare          # a saved bench/pretrain.py run
    python bench/comparing.py                                          # the committed pocket model

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from plvmctl.lab import toy
from plvmctl.evaluate import parse_yes_no
from plvmctl.lab.pocket import ASSETS
from plvmctl.tiny import clip_image_processor
from plvmctl.lab import lvlm


def score(rows: list[lvlm.Row], infos: list, said: list[str], traits: tuple[str, ...]) -> dict:
    counts = {"copy": [0, 0], "compare": [0, 0], "positive": [0, 0], "negative": [0, 0], "places": [0, 0]}
    read = {trait: [0, 0] for trait in traits}
    for row, info, answer in zip(rows, infos, said):
        truth = parse_yes_no(row.answer)
        key = "positive" if truth == "yes" else "negative"
        counts[key][0] += int(parse_yes_no(answer) == truth)
        counts[key][1] += 1
        words = answer.split(".")[0].split()
        people = sorted(info.people, key=lambda p: toy.POSITIONS.index(p.position))
        width = 2 + 4 * len(traits)
        counts["places"][0] += int(words[0::width][:len(people)] == [p.position for p in people])
        counts["places"][1] += 1
        words_of = next(iter(row.descriptions.values())).split()
        described = dict(zip(words_of[0::2], words_of[1::2]))  # "hair red skin tan ..." -> {hair: red, ...}
        for number, person in enumerate(people):
            chunk = words[number * width:(number + 1) * width]
            if len(chunk) < width:
                break
            for i, trait in enumerate(traits):
                _, stated, seen, verdict = chunk[1 + 4 * i:5 + 4 * i]
                counts["copy"][0] += int(stated == described[lvlm.DESCRIPTION_KEYS[trait]])
                counts["copy"][1] += 1
                read[trait][0] += int(seen == getattr(person.identity, trait))
                read[trait][1] += 1
                counts["compare"][0] += int(verdict == ("same" if stated == seen else "different"))
                counts["compare"][1] += 1
    result = {name: round(hit / total, 4) if total else None for name, (hit, total) in counts.items()}
    result["read"] = {trait: round(hit / total, 4) if total else None for trait, (hit, total) in read.items()}
    result["verdict_mean"] = round((result["positive"] + result["negative"]) / 2, 4)
    result["rows"] = len(rows)
    return result


def compared(model, tokenizer, processor, *, scenes: int = 80, seed: int = 1, name_share: float = 0.5,
             examples: int = 2) -> dict:
    """`score` of the answers `model` generates to fresh recognition rows about held-out people."""
    config = lvlm.LvlmTrainConfig(recognition_answer="compare", description="keyvalue", scene_share=0.0,
                                  about_share=0.0, recognition_share=1.0, rows_per_scene=2,
                                  name_share=name_share)
    rng = random.Random(f"bench-comparing-{seed}")
    pool = toy.heldout_identities()
    rows, images, row_infos = [], [], []
    for _ in range(scenes):
        image, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool,
                                       size=model.config.vision_config.image_size)
        images.append(image)
        for row in lvlm.scene_rows(info, len(images) - 1, rng, pool, config, config.rows_per_scene):
            rows.append(row)
            row_infos.append(info)
    was_training = model.training
    model.eval()
    said = lvlm.generate_answers(model, tokenizer, rows, lvlm.pixel_values(processor, images))
    model.train(was_training)
    report = score(rows, row_infos, said, config.compare_traits)
    report["examples"] = [{"said": s, "truth": r.answer} for r, s in list(zip(rows, said))[:examples]]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=str(ASSETS / "backbone"))
    parser.add_argument("--scenes", type=int, default=80)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--name-share", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    processor = clip_image_processor(model.config.vision_config.image_size)
    print(json.dumps(compared(model, tokenizer, processor, scenes=args.scenes, seed=args.seed,
                              name_share=args.name_share, examples=4), indent=1))


if __name__ == "__main__":
    main()
