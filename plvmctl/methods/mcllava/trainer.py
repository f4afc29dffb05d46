"""MC-LLaVA's trainer: the soft prompts of several concepts trained together, k-means started.

What MC-LLaVA (arXiv 2411.11706) changes against Yo'LLaVA, in plvmctl's concept form
------------------------------------------------------------------------------------
Every concept is still `<name>` + k context tokens (word, head, context: plvmctl/concept.py)
and only those tensors learn; the model is frozen. MC-LLaVA differs in three ways, all here:

1. **Joint training.** The N concepts of one run share every step. A row's prompt names all
   the concepts the row involves (their sentences `<a> is <a1>…<ak>. <b> is <b1>…<bk>.`), so
   the tokens learn to tell the concepts apart:
   - one-concept rows (Yo'LLaVA's recognition and attribute conversations, the same templates:
     `build_conversations`); a photo of another concept is a negative of this one, and that row
     names both concepts (the one asked about and the one shown); a share
     (`distractor_share`) of the other rows gets one more concept's sentence as a distractor;
   - several-concept rows: for each photo, `joint_per_photo` questions about a pair of
     concepts ("Are <a> and <b> both in this photo?", "Which of <a> and <b> is in this photo?",
     data/templates.py). A photo found in several concept folders (the same bytes) shows those
     concepts together.
2. **k-means initialisation** (`kmeans`, on by default). The concept's photos go through the
   vision tower and projector once (the features are cached for training anyway); their patch
   tokens, masked to the concept, are clustered into k groups (k-means++ then Lloyd, seeded).
   The centroids, rescaled to the mean norm of the model's input-embedding rows (visual tokens
   are far larger: 57 against 1.0 on the pocket model), are the k context tokens; `<name>`
   starts at their mean, rescaled the same way; the head row starts as Yo'LLaVA's
   (`init_word`). The mask: `PHOTOS/masks/<photo stem>.png` when given (white = the concept),
   else the similarity map (`mask: similarity`): a patch is kept when it is unlike every patch
   of the negatives (the other concepts' photos and up to 32 negatives), the `mask_keep` share
   of each photo's patches least like them; `mask: none` keeps every patch.
3. **A personalized visual prompt at ask time** (plvmctl/methods/mcllava/hook.py). The unscaled
   centroids are stored in the concept (`mcllava.prototypes` [k, H]) with a cosine threshold
   (`mcllava.threshold`): the middle between the median best-patch score of the concept's
   photos and of its negatives, unless `location_threshold` fixes it.

Training is Yo'LLaVA's loop (`train.soft_prompt.SoftPromptTrainer` stepped by
`train.per_concept.train_epochs`: cached vision features, answer cross-entropy,
AdamW 1e-3, `epochs` 15, best epoch by the mean over concepts of the yes/no accuracy on the
training photos), with the N concepts' tensors stacked: word [N, H], head [N, H],
context [N, k, H].
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ...concept import Concept, ConceptMeta, validate_name
from ...concept_index import photos_key, with_key
from ...data.templates import BOTH_NO, BOTH_QUESTIONS, BOTH_YES, WHICH_ANSWERS, WHICH_QUESTIONS
from ...errors import PlvmError
from ...fileio import sha256_file, write_json_atomic
from ...images import load_image
from ...train.common import config_digest, draw_loss_curve, photos_digest
from ...train.data import Sample
from ...train.per_concept import build_conversations, spread, train_epochs
from ...train.soft_prompt import (SoftPromptConfig, SoftPromptTrainer, cache_features, initial_rows,
                                  noisy_rows)

METHOD = "mcllava"
PROTOTYPES = "mcllava.prototypes"  # part [k, H]: the k-means centroids of the concept's visual tokens
THRESHOLD = "mcllava.threshold"  # part []: the cosine above which the concept is located
MASKS_DIR = "masks"  # PHOTOS/masks/<photo stem>.png: white where the concept is
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss.png"
RESULT_FILE = "result.json"
MASK_NEGATIVES = 32  # negatives' photos the similarity mask compares against
MASKS = ("similarity", "none")
LOCATIONS = ("words", "mark", "off")
GRIDS = ("3x3", "columns")


@dataclass
class McllavaConfig(SoftPromptConfig):
    """The recipe's `mcllava:` section (`--set mcllava.KEY=VALUE`); the soft-prompt settings
    (Yo'LLaVA's) plus MC-LLaVA's. Defaults are the paper's where it gives one (k 16, AdamW 1e-3, 15 epochs)."""

    SECTION = "mcllava"

    hard_negatives: int = 50  # MC-LLaVA needs fewer negatives than Yo'LLaVA's 150 + 100
    random_negatives: int = 50
    recognition_per_photo: int = 10
    joint_per_photo: int = 4  # several-concept questions per photo (none with one concept)
    distractor_share: float = 0.5  # one-concept rows that get another concept's sentence too
    kmeans: bool = True  # context tokens start at k-means centroids of the visual tokens
    kmeans_iterations: int = 25
    mask: str = "similarity"  # similarity | none (PHOTOS/masks/<stem>.png always wins)
    mask_keep: float = 0.5  # share of a photo's patches the similarity mask keeps
    location: str = "words"  # at ask time: words | mark | off (plvmctl/methods/mcllava/hook.py)
    location_grid: str = "3x3"  # words: 3x3 ("at the top left") | columns ("on the left")
    location_threshold: float | None = None  # cosine; None: the one calibrated at training
    group_size: int = 4  # `eval --method mcllava`: identities trained together
    out: str = "runs/mcllava"

    def validate(self) -> None:
        super().validate()
        for key, allowed in (("mask", MASKS), ("location", LOCATIONS), ("location_grid", GRIDS)):
            if getattr(self, key) not in allowed:
                raise PlvmError(f"mcllava.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not 0.0 < self.mask_keep <= 1.0 or not 0.0 <= self.distractor_share <= 1.0:
            raise PlvmError("mcllava.mask_keep must be in (0, 1] and distractor_share in [0, 1]")
        if self.kmeans_iterations < 1 or self.group_size < 1 or self.joint_per_photo < 0:
            raise PlvmError("mcllava.kmeans_iterations and group_size must be at least 1, "
                            "joint_per_photo 0 or more")
        if self.location_threshold is not None and not -1.0 <= self.location_threshold <= 1.0:
            raise PlvmError(f"mcllava.location_threshold is a cosine in [-1, 1], got {self.location_threshold}")


ASK_TIME_KEYS = ("location", "location_grid", "location_threshold")


def training_digest(config: McllavaConfig) -> str:
    """`config_digest` of the settings that change a trained concept (not the ask-time ones)."""
    defaults = McllavaConfig()
    return config_digest(dataclasses.replace(config, **{key: getattr(defaults, key) for key in ASK_TIME_KEYS}))


# --------------------------------------------------------------------------------------------
# The concepts of one run
# --------------------------------------------------------------------------------------------


def check_concepts(photos: Mapping[str, Sequence[Path]]) -> dict[str, list[Path]]:
    """Names validated, at least one photo each; PlvmError naming the first bad one."""
    if not photos:
        raise PlvmError("MC-LLaVA needs at least one concept (--concept NAME=PHOTOS_DIR)")
    checked = {}
    for name, paths in photos.items():
        validate_name(name)
        if not paths:
            raise PlvmError(f"no photos of <{name}> (.jpg, .png, ...)")
        checked[name] = [Path(p) for p in paths]
    return checked


def parse_concept_options(values: Sequence[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs of `--concept`, in order; PlvmError for a bad one or a repeated name."""
    pairs, seen = [], set()
    for value in values:
        name, sep, folder = value.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise PlvmError(f"--concept {value!r}: expected NAME=PHOTOS_DIR")
        validate_name(name)
        if name in seen:
            raise PlvmError(f"--concept: <{name}> is given twice (each concept once)")
        seen.add(name)
        pairs.append((name, folder))
    return pairs


def who_is_shown(photos: Mapping[str, Sequence[Path]]) -> dict[str, set[str]]:
    """Photo sha256 → the concepts it shows: every concept whose folder holds those bytes."""
    shown: dict[str, set[str]] = {}
    for name, paths in photos.items():
        for path in paths:
            shown.setdefault(sha256_file(path), set()).add(name)
    return shown


# --------------------------------------------------------------------------------------------
# k-means initialisation
# --------------------------------------------------------------------------------------------


def kmeans(points: torch.Tensor, k: int, *, iterations: int = 25, seed: int = 0) -> torch.Tensor:
    """k centroids [k, H] of `points` [M, H] (k-means++ seeding, then Lloyd). With fewer
    distinct points than k, some centroids repeat (the caller's noise tells them apart)."""
    points = points.float()
    if points.shape[0] == 0:
        raise PlvmError("k-means needs at least one visual token")
    generator = torch.Generator().manual_seed(seed)
    first = int(torch.randint(points.shape[0], (1,), generator=generator))
    centres = [points[first]]
    for _ in range(1, k):
        distance = torch.cdist(points, torch.stack(centres)).min(dim=1).values.pow(2)
        if float(distance.sum()) <= 0:
            pick = int(torch.randint(points.shape[0], (1,), generator=generator))
        else:
            pick = int(torch.multinomial(distance, 1, generator=generator))
        centres.append(points[pick])
    centres = torch.stack(centres)
    for _ in range(iterations):
        assignment = torch.cdist(points, centres).argmin(dim=1)
        moved = centres.clone()
        for cluster in range(k):
            members = points[assignment == cluster]
            if members.shape[0]:
                moved[cluster] = members.mean(dim=0)
        if torch.allclose(moved, centres):
            break
        centres = moved
    return centres


def mean_embedding_norm(backbone) -> float:
    """The mean L2 norm of the model's input-embedding rows (the text vocabulary)."""
    embedding = backbone.model.get_input_embeddings().weight.detach().float()
    return float(embedding[:backbone.vocab_size].norm(dim=-1).mean())


def rescaled(rows: torch.Tensor, norm: float) -> torch.Tensor:
    """`rows` [.., H] each scaled to L2 norm `norm`."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12) * norm


def square_side(count: int) -> int | None:
    side = int(round(count ** 0.5))
    return side if side * side == count else None


def mask_file_patches(photo: Path, count: int, preprocess: str) -> torch.Tensor | None:
    """The patches [count] bool that `PHOTOS/masks/<stem>.png` marks (white = the concept),
    brought to the square the model sees (`pad`: centred on black, `crop`: centre-cropped);
    None when there is no mask file or the patches are not a square grid."""
    path = photo.parent / MASKS_DIR / f"{photo.stem}.png"
    side = square_side(count)
    if side is None or not path.is_file():
        return None
    mask = load_image(path).convert("L")
    width, height = mask.size
    edge = max(width, height) if preprocess != "crop" else min(width, height)
    square = Image.new("L", (edge, edge), 0)
    square.paste(mask, ((edge - width) // 2, (edge - height) // 2))
    cells = square.resize((side, side), Image.Resampling.BOX)
    kept = torch.from_numpy(np.asarray(cells, dtype=np.float32).reshape(-1)) > 127
    return kept if bool(kept.any()) else None


def distinctive_patches(features: torch.Tensor, negatives: torch.Tensor | None, keep: float) -> torch.Tensor:
    """[n] bool: the `keep` share of `features` [n, H] least like any row of `negatives` [m, H]
    (cosine), at least one; every patch when there are no negatives."""
    count = features.shape[0]
    if negatives is None or negatives.shape[0] == 0 or keep >= 1.0:
        return torch.ones(count, dtype=torch.bool)
    units = torch.nn.functional.normalize(features.float(), dim=-1)
    others = torch.nn.functional.normalize(negatives.float(), dim=-1)
    likeness = (units @ others.T).max(dim=1).values
    kept = torch.zeros(count, dtype=torch.bool)
    kept[likeness.argsort()[:max(1, round(keep * count))]] = True
    return kept


def best_patch_scores(prototypes: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[n]: for each patch of `features` [n, H], its best cosine with a prototype [k, H]."""
    units = torch.nn.functional.normalize(features.float(), dim=-1)
    centres = torch.nn.functional.normalize(prototypes.float().to(units.device), dim=-1)
    return (units @ centres.T).max(dim=1).values


def calibrated_threshold(prototypes: torch.Tensor, positives: Sequence[torch.Tensor],
                         negatives: Sequence[torch.Tensor]) -> float:
    """The middle between the median best-patch score of the positives' photos and of the
    negatives' (the positives' median minus a tenth when there are no negatives)."""
    def best(photos: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([best_patch_scores(prototypes, f).max() for f in photos])

    high = float(best(positives).median())
    if not negatives:
        return high - 0.1
    return (high + float(best(negatives).median())) / 2


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def joint_samples(runtime, photos: Mapping[str, Sequence[Path]], negatives: Mapping[str, Sequence[Path]],
                  config: McllavaConfig, out: Path | None, *, progress: bool = False) -> list[Sample]:
    """Every training row of a joint run (see the module docstring), deterministic in the seed.

    Each concept's one-concept rows are Yo'LLaVA's (`build_conversations`, its attribute
    answers cached in `out/conversations-NAME.json`) with the other concepts' photos among its
    negatives; rows whose photo shows other concepts name them too (`Sample.also`).
    """
    names = list(photos)
    rng = random.Random(f"mcllava-rows-{config.seed}")
    shown = who_is_shown(photos)
    digest = {path: sha256_file(path) for paths in photos.values() for path in paths}
    samples: list[Sample] = []
    for name in names:
        others = [p for other in names if other != name for p in photos[other]
                  if name not in shown[digest[p]]]
        own_negatives = list(dict.fromkeys(list(others) + [Path(p) for p in negatives.get(name, ())]))
        cache = None if out is None else out / f"conversations-{name}.json"
        for sample in build_conversations(runtime, name, photos[name], own_negatives, config, cache,
                                          progress=progress).samples:
            in_photo = () if sample.photo is None else \
                tuple(n for n in names if n != name and n in shown.get(digest.get(sample.photo, ""), ()))
            also = in_photo
            if not also and len(names) > 1 and rng.random() < config.distractor_share:
                also = (rng.choice([n for n in names if n != name]),)
            samples.append(dataclasses.replace(sample, also=also))
    if len(names) < 2:
        return samples
    for name in names:
        for photo in photos[name]:
            present = shown[digest[photo]]
            for _ in range(config.joint_per_photo):
                other = rng.choice([n for n in names if n != name])
                pair = (name, other) if rng.random() < 0.5 else (other, name)
                if other in present:  # both in the photo
                    question, answer, kind = rng.choice(BOTH_QUESTIONS), rng.choice(BOTH_YES), "positive"
                elif config.reasoning_base or rng.random() < 0.5:
                    question, answer, kind = rng.choice(WHICH_QUESTIONS), rng.choice(WHICH_ANSWERS), "attribute"
                else:
                    question, answer, kind = rng.choice(BOTH_QUESTIONS), rng.choice(BOTH_NO), "negative"
                if config.reasoning_base and kind != "attribute":
                    continue  # a reasoning base gets no bare yes/no verdicts (SoftPromptConfig.reasoning_base)
                filled = {"a": pair[0], "b": pair[1], "shown": name}
                samples.append(Sample(name, kind, question.format(**filled), answer.format(**filled),
                                      Path(photo), also=(other,)))
    return samples


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class McllavaTrainer:
    """The soft prompts of N concepts trained together (`prompts`, a `SoftPromptTrainer`:
    word [N, H], head [N, H], context [N, k, H]) and their k-means start.

    `photos` maps each name to its photos (the k-means start reads their visual tokens);
    `mask_negatives` are photos whose patches the similarity mask compares against. The vision
    features read for the start are the ones training uses (`features`).
    """

    def __init__(self, runtime, photos: Mapping[str, Sequence[Path]], config: McllavaConfig,
                 mask_negatives: Sequence[Path] = ()) -> None:
        self.names = list(photos)
        config.validate()
        self.runtime = runtime
        self.backbone = runtime.backbone
        self.backbone.freeze()
        self.config = config
        self.photos = {name: [Path(p) for p in paths] for name, paths in photos.items()}
        self.mask_negatives = [Path(p) for p in mask_negatives]
        self.features: dict[tuple[str, bool], torch.Tensor] = {}
        self.prototypes: dict[str, torch.Tensor] = {}
        start = self.initial_tensors()
        self.prompts = SoftPromptTrainer(runtime, self.names, config, start, method=METHOD, features=self.features,
                                         parts={name: {PROTOTYPES: self.prototypes[name]} for name in self.names})

    # -- the start --------------------------------------------------------------------------
    def visual_tokens(self, name: str) -> torch.Tensor:
        """The concept's projected visual tokens [M, H], masked to the concept (float32, CPU)."""
        config = self.config
        own = {sha256_file(p) for p in self.photos[name]}
        against = [p for other in self.names if other != name for p in self.photos[other]
                   if sha256_file(p) not in own]
        against += spread(self.mask_negatives, MASK_NEGATIVES)
        cache_features(self.backbone, self.features, self.photos[name] + against)
        negative_rows = (torch.cat([self.features[(str(p), False)].float().cpu() for p in against])
                         if against and config.mask == "similarity" else None)
        preprocess = self.runtime.backbone.image_preprocess
        tokens = []
        for photo in self.photos[name]:
            features = self.features[(str(photo), False)].float().cpu()
            kept = mask_file_patches(photo, features.shape[0], preprocess)
            if kept is None:
                kept = distinctive_patches(features, negative_rows, config.mask_keep) \
                    if config.mask == "similarity" else torch.ones(features.shape[0], dtype=torch.bool)
            tokens.append(features[kept])
        return torch.cat(tokens)

    def initial_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stacked start tensors. With `kmeans`, context = the centroids rescaled to the mean
        embedding norm and word = their mean, rescaled; otherwise Yo'LLaVA's `init_word` start.
        The unscaled centroids are kept as the concepts' prototypes either way."""
        config = self.config
        norm = mean_embedding_norm(self.backbone)
        word_row, head_row = initial_rows(self.backbone, config.init_word)
        words, heads, contexts = [], [], []
        for number, name in enumerate(self.names):
            generator = torch.Generator().manual_seed(config.seed * 1009 + number)
            centroids = kmeans(self.visual_tokens(name), config.num_context,
                               iterations=config.kmeans_iterations, seed=config.seed + number)
            self.prototypes[name] = centroids
            heads.append(noisy_rows(head_row, 1, config.init_noise, generator)[0])
            if config.kmeans:
                context = rescaled(centroids, norm)
                # repeated centroids (fewer tokens than k) get the noise that tells them apart
                context = context + torch.randn(context.shape, generator=generator) * 1e-3 * norm
                words.append(rescaled(centroids.mean(dim=0), norm))
                contexts.append(context)
            else:
                words.append(noisy_rows(word_row, 1, config.init_noise, generator)[0])
                contexts.append(noisy_rows(word_row, config.num_context, config.init_noise, generator))
        return torch.stack(words), torch.stack(heads), torch.stack(contexts)

    # -- the concepts -----------------------------------------------------------------------
    def concept(self, meta: ConceptMeta | None = None, name: str | None = None) -> Concept:
        """Concept `name` now (detached float32 copies on the CPU) with its prototypes."""
        return self.prompts.concept(meta, name)

    def threshold(self, name: str, negatives: Sequence[Path]) -> float:
        """The location threshold of `name` (calibrated_threshold on its photos and `negatives`)."""
        if self.config.location_threshold is not None:
            return float(self.config.location_threshold)
        cache_features(self.backbone, self.features, list(self.photos[name]) + list(negatives))
        features = lambda photos: [self.features[(str(p), False)] for p in photos]  # noqa: E731
        return calibrated_threshold(self.prototypes[name], features(self.photos[name]), features(negatives))


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


@dataclass
class McllavaResult:
    """What `train_mcllava` made and measured."""

    concepts: dict[str, Concept]
    out: Path
    losses: list[float]
    epochs: list[dict[str, Any]]
    best_epoch: int
    best_accuracy: dict[str, dict[str, float]] | None  # per concept
    seconds: dict[str, float]  # rows, features, training, total
    counts: dict[str, Any]

    @property
    def seconds_per_concept(self) -> float:
        return self.seconds["total"] / max(1, len(self.concepts))

    def summary(self) -> dict[str, Any]:
        return {"names": list(self.concepts), "out": str(self.out), "best_epoch": self.best_epoch,
                "best_accuracy": self.best_accuracy, "epochs": self.epochs, "seconds": self.seconds,
                "seconds_per_concept": self.seconds_per_concept, "counts": self.counts,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def _mean_accuracy(accuracy: Mapping[str, Mapping[str, float]]) -> float:
    values = [row["mean"] for row in accuracy.values() if row["mean"] == row["mean"]]
    return sum(values) / len(values) if values else float("nan")


def train_mcllava(runtime, photos: Mapping[str, Sequence[Path]], negatives: Mapping[str, Sequence[Path]],
                  config: McllavaConfig, out_dir: str | Path, *, progress: bool = False,
                  echo: Callable[[str], None] | None = None,
                  on_epoch: Callable[[int, int, McllavaTrainer], None] | None = None) -> McllavaResult:
    """Train the concepts of `photos` together; keep the epoch with the best mean accuracy.

    `negatives` maps a name to its outside negatives (the other concepts' photos are its
    negatives anyway). Writes into `out_dir`: conversations-NAME.json, log.jsonl, loss.png,
    result.json. Each concept carries ConceptMeta(method="mcllava"), its prototypes and its
    location threshold. `on_epoch(epoch, steps so far, trainer)` is called after each epoch
    (benchmarks).
    """
    config.validate()
    photos = check_concepts(photos)
    negatives = {name: [Path(p) for p in negatives.get(name, ())] for name in photos}
    if len(photos) == 1 and not negatives[next(iter(photos))]:
        raise PlvmError("MC-LLaVA with one concept needs negatives: pass --negatives DIR or --index "
                        "INDEX (with several concepts, each one's photos are the others' negatives)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda message: None)
    names = list(photos)
    started = time.perf_counter()
    samples = joint_samples(runtime, photos, negatives, config, out, progress=progress)
    seconds_rows = time.perf_counter() - started
    kinds: dict[str, int] = {}
    for sample in samples:
        kinds[sample.kind] = kinds.get(sample.kind, 0) + 1
    say(f"{', '.join(f'<{n}>' for n in names)}: {len(samples)} rows {kinds} "
        f"({sum(bool(s.also) for s in samples)} name several concepts)")

    feature_start = time.perf_counter()
    shown = who_is_shown(photos)
    everything = list(dict.fromkeys(p for paths in photos.values() for p in paths))
    outside = list(dict.fromkeys(p for paths in negatives.values() for p in paths))
    trainer = McllavaTrainer(runtime, photos, config, mask_negatives=outside)
    if config.cache_features:
        trainer.prompts.cache_features(everything + outside, progress=progress)
    seconds_features = time.perf_counter() - feature_start

    def not_showing(name: str) -> list[Path]:
        return [p for p in everything if name not in shown[sha256_file(p)]] + negatives[name]

    selection = {name: spread(not_showing(name), config.selection_negatives or len(photos[name]))
                 for name in names}

    def score() -> tuple[dict[str, dict[str, float]], float]:
        accuracy = {name: trainer.prompts.recognition_accuracy(photos[name], selection[name], name=name,
                                                       cached=config.cache_features) for name in names}
        return accuracy, _mean_accuracy(accuracy)

    train_start = time.perf_counter()
    losses, epochs, best_epoch, best_accuracy = train_epochs(
        trainer.prompts, samples, config, out / LOG_FILE, order_seed=f"mcllava-order-{config.seed}",
        label=f"mcllava {len(names)} concepts", score=score, progress=progress,
        on_epoch=None if on_epoch is None else lambda epoch, steps, _: on_epoch(epoch, steps, trainer))
    seconds_training = time.perf_counter() - train_start
    thresholds = {name: trainer.threshold(name, not_showing(name)) for name in names}
    seconds = {"rows": seconds_rows, "features": seconds_features, "training": seconds_training,
               "total": time.perf_counter() - started}
    counts = {**kinds, "rows": len(samples), "steps": len(losses),
              "photos": {name: len(paths) for name, paths in photos.items()},
              "negatives": {name: len(paths) for name, paths in negatives.items()}}
    concepts = {}
    for name in names:
        meta = ConceptMeta(
            method=METHOD, base_model=runtime.backbone.fingerprint, base_model_name=runtime.backbone.name,
            reference_sha256=sha256_file(photos[name][0]), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            extra={"positives": str(len(photos[name])), "positives_sha256": photos_digest(photos[name]),
                   "negatives": str(len(negatives[name])), "trained_with": ",".join(names),
                   "epochs": str(config.epochs), "best_epoch": str(best_epoch), "kmeans": str(config.kmeans),
                   "train_accuracy": json.dumps((best_accuracy or {}).get(name)),
                   "seconds": f"{seconds['total'] / len(names):.6f}", "config_sha256": training_digest(config)})
        concept = trainer.concept(meta, name=name)
        concept.parts[THRESHOLD] = torch.tensor(thresholds[name], dtype=torch.float64)
        concepts[name] = with_key(concept, photos_key(runtime, [load_image(p) for p in photos[name]]),
                                  runtime.encoder_fingerprint, len(photos[name]), photos[name][0])
    if losses:
        draw_loss_curve(range(1, len(losses) + 1), losses, out / CURVE_FILE,
                        title=f"MC-LLaVA {', '.join(names)} loss")
    result = McllavaResult(concepts, out, losses, epochs, best_epoch, best_accuracy, seconds, counts)
    write_json_atomic(out / RESULT_FILE, {**result.summary(), "thresholds": thresholds, "config": asdict(config)})
    return result
