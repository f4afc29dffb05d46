"""Study: where each trait of a reference portrait is lost on the way to the base LM.

PLVM reads a reference photo through two frozen-or-trained stages before the base LM sees it:
the reference encoder (tokens [1+N, D], CLS first) and the Aligner (a word, a head and k
context vectors in the LM's embedding space). For every trait of the toy world this script
fits a linear probe (multinomial logistic regression, standardised features) on the output of
each stage for portraits of training-part identities, and reports its accuracy on portraits of
held-out identities, next to the majority class:

- `encoder_cls`: the encoder's CLS token;
- `encoder_tokens`: CLS and the mean of the patch tokens, side by side;
- `encoder_all`: every token, flattened (what the Aligner is given);
- `aligner`: the Aligner's word, head and context vectors, flattened (what the LM is given).

A trait the encoder reads but the Aligner does not carry is lost in the Aligner's training;
one the encoder does not read is lost in the portrait or the encoder.

`photo_tower` does the same for the base LVLM's own vision: the projected visual tokens the
LM reads (every slot, flattened) of one-person photos of the training size (96 px), probed
for the person's traits and for what changes from photo to photo (shirt colour, expression),
the traits the visual MCQ asks about. The text MCQ of
`make results` (docs/results.md, per question) is the last stage: what the LM answers.

    OMP_NUM_THREADS=1 python bench/trait_reading.py > docs/bench/trait_reading.json   # ~2 min

`--recipe`/`--set` choose the encoder and Aligner (default: the committed pocket model);
`--portrait-size` renders the portraits at another size (the encoder's processor resizes
them to its own input size).
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from plvmctl.lab import toy
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime


def portraits(identities, seed: str, size: int):
    rng = random.Random(seed)
    return [toy.render_portrait(identity, rng, size=size) for identity in identities]


@torch.no_grad()
def stage_features(runtime, images, batch: int = 64) -> dict[str, torch.Tensor]:
    """Each stage's features [M, F] for `images`."""
    rows: dict[str, list[torch.Tensor]] = {"encoder_cls": [], "encoder_tokens": [], "encoder_all": [],
                                           "aligner": []}
    for start in range(0, len(images), batch):
        tokens = runtime.encoder.encode(images[start:start + batch]).float()  # [B, 1+N, D]
        rows["encoder_cls"].append(tokens[:, 0])
        rows["encoder_tokens"].append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))
        rows["encoder_all"].append(tokens.flatten(1))
        output = runtime.aligner(tokens.to(runtime.device, runtime.dtype))
        rows["aligner"].append(torch.cat([output.word.float(), output.head.float(),
                                          output.context.float().flatten(1)], dim=-1))
    return {name: torch.cat(parts) for name, parts in rows.items()}


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   test_y: torch.Tensor, classes: int, *, steps: int = 300,
                   weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression fitted with L-BFGS."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimiser = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(train_x), train_y)
        loss = loss + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_y).float().mean())


PHOTO_TRAITS = {"shirt": tuple(toy.SHIRT_COLOURS), "expression": toy.EXPRESSIONS}


@torch.no_grad()
def photo_features(runtime, identities, seed: str, size: int = 96, batch: int = 64):
    """(features [M, slots*H], {trait: values}) of one-person photos of `identities`."""
    rng = random.Random(seed)
    rows, truth = [], {trait: [] for trait in PHOTO_TRAITS}
    images = []
    for identity in identities:
        image, info = toy.random_scene(identity, rng, [identity], n_people=1, size=size)
        images.append(image)
        truth["shirt"].append(info.people[0].shirt)
        truth["expression"].append(info.people[0].expression)
    for start in range(0, len(images), batch):
        rows.extend(feature.float().flatten() for feature in runtime.backbone.image_features(images[start:start + batch]))
    return torch.stack(rows), truth


def portrait_probes(runtime, *, train: int = 3000, test: int = 600, seed: int = 0,
                    portrait_size: int = 64, photos: bool = True) -> dict:
    """{"stages": {stage: {trait: held-out probe accuracy}}, "majority": {trait: ...}}: the
    portrait stages (`stage_features`) and, with `photos`, `photo_tower`; `train` training-part
    and `test` held-out people drawn by `seed`."""
    rng = random.Random(f"trait-reading-{seed}")
    fit = rng.sample(list(toy.training_identities()), train)
    held = rng.sample(list(toy.heldout_identities()), test)
    labels = {}  # trait -> (values, train labels, test labels)
    for trait, values in toy.TRAITS.items():
        labels[trait] = (values, [getattr(i, trait) for i in fit], [getattr(i, trait) for i in held])
    features = {}  # stage -> (train features, test features, its traits)
    if photos:
        train_photos, train_truth = photo_features(runtime, fit, f"photo-fit-{seed}")
        test_photos, test_truth = photo_features(runtime, held, f"photo-held-{seed}")
        for trait, values in PHOTO_TRAITS.items():
            labels[trait] = (values, train_truth[trait], test_truth[trait])
        features["photo_tower"] = (train_photos, test_photos, list(labels))
    train_portraits = stage_features(runtime, portraits(fit, f"fit-{seed}", portrait_size))
    test_portraits = stage_features(runtime, portraits(held, f"held-{seed}", portrait_size))
    for stage in train_portraits:
        features[stage] = (train_portraits[stage], test_portraits[stage], list(toy.TRAITS))

    result: dict = {"stages": {}, "majority": {}}
    encoded = {}
    for trait, (values, train_values, test_values) in labels.items():
        index = {value: i for i, value in enumerate(values)}
        train_y = torch.tensor([index[value] for value in train_values])
        test_y = torch.tensor([index[value] for value in test_values])
        encoded[trait] = (len(values), train_y, test_y)
        majority = int(torch.bincount(train_y, minlength=len(values)).argmax())
        result["majority"][trait] = round(float((test_y == majority).float().mean()), 4)
    for stage, (train_x, test_x, traits) in features.items():
        for trait in traits:
            classes, train_y, test_y = encoded[trait]
            result["stages"].setdefault(stage, {})[trait] = round(
                probe_accuracy(train_x, train_y, test_x, test_y, classes), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="pocket")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--train", type=int, default=3000, help="training-part portraits to fit on")
    parser.add_argument("--test", type=int, default=600, help="held-out portraits to score")
    parser.add_argument("--portrait-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    runtime = load_runtime(load_recipe(args.recipe, args.overrides), device="cpu")
    result = portrait_probes(runtime, train=args.train, test=args.test, seed=args.seed,
                             portrait_size=args.portrait_size)
    result.update({
        "command": "python bench/trait_reading.py " + " ".join(
            [f"--recipe {args.recipe}"] + [f"--set {o}" for o in args.overrides]
            + [f"--train {args.train}", f"--test {args.test}", f"--portrait-size {args.portrait_size}",
               f"--seed {args.seed}"]),
        "portraits": {"fit": args.train, "held_out": args.test, "size": args.portrait_size},
        "seconds": round(time.perf_counter() - started, 1),
    })
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
