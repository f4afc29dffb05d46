"""What a pocket base LVLM's image tokens hold, next to what its LM reads from them.

Measured on fresh photos of held-out identities:

* ``probe``: a linear probe trained on the FROZEN projected image features (the LM's image
  tokens), averaged over each third of the photo, predicts what the person there looks like.
  This is what the features hold.
* ``position``: a linear probe on single patch features predicts the patch's column (chance
  1 / columns): whether the image tokens say where they are, which questions about "the
  person on the left" need.
* ``questions``: the LM's first-answer-token accuracy on the toy world's generic scene
  questions, grouped by template (colours and positions masked), among the answer's value
  set (`lvlm.measure`'s rule). This is what the LM reads from them.

    python bench/looking.py                                  # the committed pocket backbone
    python bench/looking.py --backbone DIR --photos 150      # any saved pocket backbone

Prints one JSON object: {"probe": {trait: [accuracy, chance]}, "position": [accuracy, chance],
"questions": {template: [accuracy, count]}, "the person X": {"alone" | "with others": {accuracy,
chance, count}}}: questions about "the person on the left" etc. when that person is alone in the
photo (nothing to find) or has company (the LM must find the right one).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from plvmctl.lab import toy
from plvmctl.tiny import clip_image_processor
from plvmctl.lab import lvlm

COMMITTED = Path(__file__).resolve().parents[1] / "plvmctl" / "assets" / "pocket" / "backbone"
_MASK = re.compile(r"\b(" + "|".join(sorted({*toy.HAIR_COLOURS, *toy.SHIRT_COLOURS, *toy.BACKGROUND_COLOURS},
                                            key=len, reverse=True))
                   + r"|on the left|on the right|in the middle)\b")


@torch.no_grad()
def image_features(model, processor, images) -> torch.Tensor:
    """The projected image features [N, P, H] (what the LM's image tokens are)."""
    chunks = []
    for start in range(0, len(images), 64):
        chunks.append(lvlm.image_tokens(model, lvlm.pixel_values(processor, images[start:start + 64])))
    return torch.cat(chunks)


def photos(pool, count: int, seed: int, size: int):
    rng = random.Random(f"plvmctl-bench-looking-{seed}")
    images, infos = [], []
    for _ in range(count):
        image, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=size)
        images.append(image)
        infos.append(info)
    return images, infos


def probe_accuracy(model, processor, size: int, photos_count: int, steps: int = 400) -> dict[str, list[float]]:
    """Per-trait accuracy of a linear probe on region-averaged frozen features (held-out photos)."""
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    train_images, train_infos = photos(toy.training_identities(), photos_count * 5, 0, size)
    test_images, test_infos = photos(toy.heldout_identities(), photos_count, 1, size)
    train_x = image_features(model, processor, train_images)
    test_x = image_features(model, processor, test_images)
    torch.manual_seed(0)
    probe = lvlm.VisionProbe(train_x.shape[-1], grid)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        batch = rng.sample(range(len(train_infos)), min(128, len(train_infos)))
        loss = probe.loss(train_x[batch], [train_infos[i] for i in batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    regions = torch.einsum("rp,nph->nrh", probe.pool, test_x)
    report = {}
    with torch.no_grad():
        for name, values in lvlm.PROBE_TRAITS.items():
            predicted = probe.heads[name](regions).argmax(-1)
            hits = []
            for n, info in enumerate(test_infos):
                for r, position in enumerate(toy.POSITIONS):
                    person = info.person_at(position)
                    if person is not None:
                        hits.append(int(int(predicted[n, r]) == values.index(lvlm.probe_value(person, name))))
            report[name] = [round(sum(hits) / len(hits), 3), round(1 / len(values), 3)]
    return report


def position_accuracy(model, processor, size: int, photos_count: int, steps: int = 600) -> list[float]:
    """Accuracy of a linear probe that reads each patch's column from that patch's feature."""
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    train_x = image_features(model, processor, photos(toy.training_identities(), photos_count, 3, size)[0])
    test_x = image_features(model, processor, photos(toy.heldout_identities(), photos_count, 4, size)[0])
    mean, std = train_x.mean(dim=(0, 1)), train_x.std(dim=(0, 1)) + 1e-6
    columns = torch.arange(grid).repeat(grid)  # patches are row-major

    def flat(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((x - mean) / std).reshape(-1, x.shape[-1]), columns.repeat(x.shape[0])

    (x, y), (test, truth) = flat(train_x), flat(test_x)
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[-1], grid)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return [round(float((head(test).argmax(-1) == truth).float().mean()), 3), round(1 / grid, 3)]


@torch.no_grad()
def question_accuracy(model, tokenizer, processor, size: int, photos_count: int):
    """First-answer-token accuracy (`lvlm.first_answer_hits`) on held-out photos: per scene
    question template, and for questions about "the person X" split by whether that person
    is alone in the photo. Returns ({template: [accuracy, count]}, {"alone" | "with others":
    {accuracy, chance, count}})."""
    rng = random.Random("plvmctl-bench-looking-questions")
    images, infos = photos(toy.heldout_identities(), photos_count, 2, size)
    rows = [lvlm.Row("scene", question, answer, n, options=lvlm._open_options(answer))
            for n, info in enumerate(infos) for question, answer in toy.scene_qa(info, rng)]
    model.eval()
    scored = lvlm.first_answer_hits(model, tokenizer, rows, lvlm.pixel_values(processor, images), 64)
    hits: dict[str, list[int]] = collections.defaultdict(list)
    crowd: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for row, (hit, _) in zip(rows, scored):
        hits[_MASK.sub("X", row.question)].append(int(hit))
        if "the person " in row.question:
            crowd["alone" if len(infos[row.image].people) == 1 else "with others"].append((int(hit), row.chance))
    templates = {template: [round(sum(h) / len(h), 3), len(h)] for template, h in sorted(hits.items())}
    people = {key: {"accuracy": round(sum(h for h, _ in pairs) / len(pairs), 3),
                    "chance": round(sum(c for _, c in pairs) / len(pairs), 3), "count": len(pairs)}
              for key, pairs in sorted(crowd.items())}
    return templates, people


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=str(COMMITTED), help="a saved pocket backbone folder")
    parser.add_argument("--photos", type=int, default=150, help="held-out photos per measurement")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = LlavaForConditionalGeneration.from_pretrained(args.backbone).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.backbone)
    size = model.config.vision_config.image_size
    processor = clip_image_processor(size)
    templates, people = question_accuracy(model, tokenizer, processor, size, args.photos)
    print(json.dumps({"backbone": args.backbone,
                      "probe": probe_accuracy(model, processor, size, args.photos),
                      "position": position_accuracy(model, processor, size, args.photos),
                      "questions": templates, "the person X": people}, indent=1))


if __name__ == "__main__":
    main()
