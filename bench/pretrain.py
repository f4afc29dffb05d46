"""What does more base-model training buy? Pretrain the pocket LVLM (the committed sizes and
settings of `make pocket`) for --steps and measure it on held-out people along the way.

    python bench/pretrain.py --steps 8000 --measure-every 1000           # as `make pocket`, longer
    python bench/pretrain.py --steps 1200 --reference-share 1.0          # people shown by portraits
    python bench/pretrain.py --description keyvalue --copy-steps 300     # "key value" + copy warm-up
    python bench/pretrain.py --steps 1200 --position-weight 1.0 --save runs/bench/position
                                          # image tokens told their column; then bench/looking.py --backbone
    python bench/pretrain.py --steps 1200 --caption-rows 2 --caption-steps 300 --save runs/bench/captions
                                          # dense place-by-place captions, first alone (a seeing warm-up)

Prints one JSON object per measurement: first-answer-token accuracy per row kind on fresh
photos of held-out identities (plvmctl.lab.lvlm.measure; "-ref" kinds introduce the person
with a reference portrait instead of a description), with the chance level of each kind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from plvmctl.lab.pocket import profile
from plvmctl.lab import lvlm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--measure-every", type=int, default=600)
    parser.add_argument("--measure-scenes", type=int, default=40)
    parser.add_argument("--reference-share", type=float, default=0.0)
    parser.add_argument("--description", choices=lvlm.DESCRIPTION_STYLES, default="sentence")
    parser.add_argument("--copy-steps", type=int, default=0, help="copy warm-up steps first")
    parser.add_argument("--recognition-only", action="store_true",
                        help="every photo row a recognition question (no scene, about, text or describe rows)")
    parser.add_argument("--text-rows", type=int, default=None,
                        help="text-only rows per step [default: the pocket profile's]")
    parser.add_argument("--position-weight", type=float, default=0.0,
                        help="weight of a per-patch column head in the vision probe (0: none, as committed)")
    parser.add_argument("--caption-rows", type=int, default=0, help="caption rows per photo (lvlm.scene_caption)")
    parser.add_argument("--caption-steps", type=int, default=0, help="first steps with caption rows only")
    parser.add_argument("--recognition-answer", choices=lvlm.RECOGNITION_ANSWERS, default="plain",
                        help="compare: recognition answers check the description person by person first")
    parser.add_argument("--name-share", type=float, default=0.0, help="share of rows with a name token")
    parser.add_argument("--single-person-steps", type=int, default=0, help="first steps with one person a photo")
    parser.add_argument("--recognition-share", type=float, default=None)
    parser.add_argument("--vision-steps", type=int, default=0, help="vision-only probe steps before the LM trains")
    parser.add_argument("--rows-per-scene", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None, help="vision patch size [default: the profile's]")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--save", default=None, help="save the trained backbone to this folder (for bench/looking.py)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = profile("full")
    config = dataclasses.replace(settings.lvlm, steps=args.steps, seed=args.seed,
                                 reference_share=args.reference_share, description=args.description,
                                 copy_steps=args.copy_steps, position_aux_weight=args.position_weight,
                                 caption_rows=args.caption_rows, caption_steps=args.caption_steps,
                                 log_every=max(1, args.steps // 20),
                                 recognition_answer=args.recognition_answer, name_share=args.name_share,
                                 single_person_steps=args.single_person_steps, vision_steps=args.vision_steps)
    if args.rows_per_scene is not None:
        config = dataclasses.replace(config, rows_per_scene=args.rows_per_scene)
    if args.recognition_share is not None:
        config = dataclasses.replace(config, recognition_share=args.recognition_share)
    if args.lr is not None:
        config = dataclasses.replace(config, lr=args.lr)
    sizes = settings.lvlm_sizes if args.patch_size is None else dataclasses.replace(
        settings.lvlm_sizes, patch_size=args.patch_size)
    if args.recognition_only:
        config = dataclasses.replace(config, scene_share=0.0, about_share=0.0, recognition_share=1.0,
                                     text_rows_per_step=0, describe_rows_per_step=0)
    if args.text_rows is not None:
        config = dataclasses.replace(config, text_rows_per_step=args.text_rows)
    vocabulary = lvlm.collect_vocabulary(seed=args.seed, description=args.description)
    model, tokenizer, processor = lvlm.build_pocket_llava(vocabulary, sizes, args.seed)
    started = time.perf_counter()

    def report(step: int) -> None:
        accuracy = lvlm.measure(model, tokenizer, processor, scenes=args.measure_scenes, config=config)
        if config.recognition_answer == "compare":
            accuracy["comparing"] = lvlm.measure_comparisons(model, tokenizer, processor,
                                                             scenes=args.measure_scenes, config=config)
        model.train()
        print(json.dumps({"step": step, "seconds": round(time.perf_counter() - started, 1),
                          "accuracy": {kind: [v["accuracy"], v["chance"]] if "chance" in v else v
                                       for kind, v in accuracy.items()}}),
              flush=True)

    def after_step(step: int) -> None:
        if (step + 1) % args.measure_every == 0 or step + 1 == args.steps:
            report(step + 1)

    lvlm.train_lvlm(model, tokenizer, processor, config, after_step=after_step)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


if __name__ == "__main__":
    main()
