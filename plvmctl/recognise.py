"""Who is in this photo: the concepts of a store found in a photo by retrieval.

A photo is looked at as the concept head looks at it (photo_crops.crop_boxes): the whole view
and square windows of a half and a third of its shorter side, half overlapping, so a person
who fills only part of a scene gets a crop of their own. Each crop's reference-encoder CLS
vector (L2-normalised, the same features as the concepts' retrieval keys) searches the store's
key index (concept_index.py) for its `candidates` nearest keys; each concept's score is its
best crop's cosine, and that crop is where it is (its box). A concept is present when its
score reaches `threshold`; a photo's found concepts are those, best first, at most `top_k`.
No detector is used. With `verify` = N, retrieval only proposes and the model decides about the
photo's N best candidates (`verify`): with `verify_by: each`, one question per candidate ("Is
<c> in this photo?", N model calls per photo); with `verify_by: together`, one question that
holds them all ("Who of <c1>, ..., <cN> is in this photo?", one call per photo).

Settings come from the recipe's `retrieval` section (RetrievalConfig); `calibrate_threshold`
picks the threshold that maximises F1 on labelled (score, present) pairs, e.g. a toy test set
(`plvmctl eval --retrieval` reports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from .answers import RECOGNITION_QUESTION, conclusion, name_list, parse_who, parse_yes_no, who_of_question
from .photo_crops import CROPS, Box, crop_features
from .concept_index import KeyIndex
from .errors import PlvmError

DEFAULT_THRESHOLD = 0.8
VERIFY_BY = ("each", "together")  # retrieval.verify_by


@dataclass
class RetrievalConfig:
    """The recipe's `retrieval` section."""

    threshold: float = DEFAULT_THRESHOLD  # cosine a concept's best crop must reach
    top_k: int = 5  # at most this many found concepts per photo go into a prompt
    candidates: int = 8  # nearest keys fetched per crop
    crops: str = "windows"  # whole | windows (photo_crops.crop_boxes)
    batch_size: int = 16  # photos encoded together
    # 0: found = score >= threshold. N > 0: retrieve, then verify: the model is asked "Is <c> in
    # this photo?" about the photo's N best candidates (whatever their score) and found are
    # those it says yes to (the threshold is then unused)
    verify: int = 0
    # how the N candidates are asked about: each (one "Is <c> in this photo?" per candidate) or
    # together (one "Who of <c1>, ..., <cN> is in this photo?" per photo)
    verify_by: str = "each"

    def validate(self) -> "RetrievalConfig":
        if self.crops not in CROPS:
            raise PlvmError(f"retrieval.crops must be one of {', '.join(CROPS)}, got {self.crops!r}")
        if self.verify < 0:
            raise PlvmError(f"retrieval.verify must be 0 (off) or a number of candidates, got {self.verify}")
        if self.verify_by not in VERIFY_BY:
            raise PlvmError(f"retrieval.verify_by must be one of {', '.join(VERIFY_BY)}, got {self.verify_by!r}")
        for key in ("top_k", "candidates", "batch_size"):
            if getattr(self, key) < 1:
                raise PlvmError(f"retrieval.{key} must be at least 1, got {getattr(self, key)}")
        if not -1.0 <= self.threshold <= 1.0:
            raise PlvmError(f"retrieval.threshold is a cosine in [-1, 1], got {self.threshold}")
        return self


def retrieval_config(recipe, threshold: float | None = None, top_k: int | None = None) -> RetrievalConfig:
    """The recipe's settings with command-line overrides."""
    config = recipe.section("retrieval", RetrievalConfig)
    if threshold is not None:
        config.threshold = threshold
    if top_k is not None:
        config.top_k = top_k
    return config.validate()


@dataclass(frozen=True)
class Found:
    """A concept in a photo: its best crop's cosine and that crop's box (left, top, right, bottom)."""

    name: str
    score: float
    box: Box

    def to_json(self) -> dict:
        return {"name": self.name, "score": round(self.score, 4), "box": list(self.box)}


@dataclass
class Looked:
    """One photo: every candidate concept with its best crop (best first), and those found;
    with verification, the model calls it took and how many of their answers said nothing
    readable (those found nothing)."""

    candidates: list[Found]
    found: list[Found]
    model_calls: int = 0
    unreadable: int = 0


def match(index: KeyIndex, crops: Sequence, config: RetrievalConfig) -> list[Looked]:
    """Search every crop of every photo (photo_crops.CropFeatures) in one call; per photo and
    concept the best crop counts."""
    if not crops:
        return []
    queries = torch.cat([photo.features for photo in crops]).numpy()
    hits = index.search(queries, config.candidates)
    out, start = [], 0
    for photo in crops:
        best: dict[str, Found] = {}
        for row, box in enumerate(photo.boxes):
            for name, score in hits[start + row]:
                if name not in best or score > best[name].score:
                    best[name] = Found(name, score, box)
        start += len(photo.boxes)
        ranked = sorted(best.values(), key=lambda f: (-f.score, f.name))
        present = [f for f in ranked if f.score >= config.threshold][:config.top_k]
        out.append(Looked(ranked, present))
    return out


def look(runtime, index: KeyIndex, images: Sequence[Image.Image], config: RetrievalConfig,
         engine=None) -> list[Looked]:
    """The concepts of `index` in each photo (all crops of a batch encoded together); with
    `config.verify`, checked by `engine` (an Engine that knows the index's concepts)."""
    if index.encoder and index.encoder != runtime.encoder_fingerprint:
        raise PlvmError("the concept index holds keys of another reference encoder than this "
                        "recipe's: run `plvmctl concepts reindex`")
    if config.verify and engine is None:
        raise PlvmError("retrieval.verify asks the model about each candidate: no engine was given")
    out: list[Looked] = []
    for start in range(0, len(images), config.batch_size):
        part = list(images[start:start + config.batch_size])
        looked = match(index, crop_features(runtime, part, "encoder", config.crops), config)
        out += verify(engine, part, looked, config, runtime.recipe.model.reasoning) if config.verify else looked
    return out


def verify(engine, images: Sequence[Image.Image], looked: list[Looked], config: RetrievalConfig,
           reasoning: str = "none") -> list[Looked]:
    """Retrieve, then verify: each photo's `config.verify` best candidates are asked about, one
    by one or all in one question (`config.verify_by`); found are those the model recognises,
    best score first, at most top_k. Retrieval only proposes; the model, which compares each
    person with the concepts, decides. `reasoning` is the recipe's `model.reasoning`: how to
    find the conclusion of an answer that compares first."""
    if config.verify_by == "together":
        return _verify_together(engine, images, looked, config, reasoning)
    return _verify_each(engine, images, looked, config)


def _verify_each(engine, images: Sequence[Image.Image], looked: list[Looked], config: RetrievalConfig) -> list[Looked]:
    """One question per candidate: "Is <name> in this photo?", the recognition question of the
    evaluation, its answers read as the evaluation reads them (a "yes" is found)."""
    from .engine import AskRequest

    asked = [(number, found) for number, result in enumerate(looked)
             for found in result.candidates[:config.verify]]
    answers = engine.ask([AskRequest(RECOGNITION_QUESTION.format(name=found.name), images[number])
                          for number, found in asked]) if asked else []
    yes: dict[int, list[Found]] = {}
    calls = [0] * len(looked)
    unreadable = [0] * len(looked)
    for (number, found), answer in zip(asked, answers):
        if answer.error is not None:
            raise PlvmError(f"verifying <{found.name}>: {answer.error}")
        verdict = parse_yes_no(answer.answer or "")
        calls[number] += 1
        unreadable[number] += verdict is None
        if verdict == "yes":
            yes.setdefault(number, []).append(found)
    return [Looked(result.candidates, yes.get(number, [])[:config.top_k], calls[number], unreadable[number])
            for number, result in enumerate(looked)]


def _verify_together(engine, images: Sequence[Image.Image], looked: list[Looked], config: RetrievalConfig,
                     reasoning: str) -> list[Looked]:
    """One question per photo that holds all its candidates: "Who of <c1>, ..., <cN> is in this
    photo?" (all N concepts in the prompt, every photo of the batch in one generation). Found
    are the names the answer's conclusion says are present (answers.parse_who); an answer that
    says neither names nor "nobody" finds nothing and is counted as unreadable."""
    from .engine import AskRequest

    asked = [(number, result.candidates[:config.verify]) for number, result in enumerate(looked)
             if result.candidates]
    answers = engine.ask([AskRequest(who_of_question([f.name for f in candidates]), images[number])
                          for number, candidates in asked]) if asked else []
    out = [Looked(result.candidates, []) for result in looked]
    for (number, candidates), answer in zip(asked, answers):
        names = [f.name for f in candidates]
        if answer.error is not None:
            raise PlvmError(f"verifying {name_list(names)}: {answer.error}")
        said = parse_who(conclusion(answer.answer or "", reasoning), names)
        found = [f for f in candidates if f.name in (said or ())]
        out[number] = Looked(looked[number].candidates, found[:config.top_k], 1, int(said is None))
    return out


# --------------------------------------------------------------------------------------------
# Calibration and scores


def calibrate_threshold(scores: Sequence[float | None], present: Sequence[bool]) -> dict:
    """The threshold with the best F1 on (score, present) pairs: one pair per (photo, concept),
    the score None where no threshold can make it found (no candidate of the photo, or beyond
    its top K). The threshold is halfway between the last score kept and the next one below it.
    Returns threshold, precision, recall, f1."""
    positives = sum(bool(p) for p in present)
    pairs = sorted(((s, p) for s, p in zip(scores, present) if s is not None), key=lambda pair: -pair[0])
    if positives == 0:
        raise PlvmError("calibrating a threshold needs at least one photo with a known concept in it")
    best = {"threshold": 1.0, "precision": None, "recall": 0.0, "f1": 0.0}
    kept = hits = 0
    for number, (score, is_present) in enumerate(pairs):
        kept += 1
        hits += bool(is_present)
        following = pairs[number + 1][0] if number + 1 < len(pairs) else score - 1e-3
        if following == score:
            continue  # a cut cannot fall between equal scores
        precision, recall = hits / kept, hits / positives
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        if f1 > best["f1"]:
            best = {"threshold": (score + following) / 2, "precision": precision, "recall": recall, "f1": f1}
    return best


def presence_metrics(truth: Sequence[set[str]], found: Sequence[Sequence[str]]) -> dict:
    """Micro precision, recall and F1 of found concept names against the true ones, per photo."""
    true_positive = sum(len(set(f) & t) for t, f in zip(truth, found))
    predicted = sum(len(set(f)) for f in found)
    actual = sum(len(t) for t in truth)
    precision = true_positive / predicted if predicted else None
    recall = true_positive / actual if actual else None
    f1 = (2 * precision * recall / (precision + recall)
          if precision is not None and recall is not None and precision + recall > 0 else 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "true_positive": true_positive,
            "predicted": predicted, "actual": actual, "photos": len(truth)}
