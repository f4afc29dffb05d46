"""Where does a "compare" recognition answer go wrong? Read, copy, compare, verdict.

A pocket base LVLM trained with `recognition_answer="compare"` answers "Is <name> in this
photo?" by checking the description against everyone in the photo before its verdict:
"left red hair red same dark skin tan different long style long same mismatch ... . No, ...".
On fresh photos of held-out people, `lvlm.measure_comparisons` generates those answers and
scores each part against the truth: the value read from the photo (per trait), the described
value copied from the prompt, the same/different word against the words written, and the
final Yes/No (positive and negative apart).

    python bench/comparing.py                                          # the committed pocket model
    python bench/comparing.py --backbone runs/bench/compare            # a saved bench/pretrain.py run

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from plvmctl.lab import lvlm
from plvmctl.lab.pocket import ASSETS
from plvmctl.tiny import clip_image_processor


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
    config = lvlm.LvlmTrainConfig(description="keyvalue", name_share=args.name_share)
    print(json.dumps(lvlm.measure_comparisons(model, tokenizer, processor, scenes=args.scenes, seed=args.seed,
                                              config=config), indent=1))


if __name__ == "__main__":
    main()
