"""Training data for the Aligner: the manifest, the PLVM sampler, and `data attributes`.

The manifest is JSONL, one identity a line, paths relative to the manifest's folder:

    {"name": "avril", "reference": "images/avril/ref.png",
     "queries": ["images/avril/q0.png", ...],
     "attributes": [{"question": "What colour is <sks>'s hair?", "answer": "Blonde."}, ...]}

Optional, "references": further reference photos of the identity (["images/avril/ref2.png",
...]). With `train.max_references` > 1 a concept is made from the primary reference alone or
from 2 to that many of the identity's reference photos, drawn per micro-batch
(`PlvmSampler.references_for`), as `encode a.jpg b.jpg` makes one from several.

Optional, for a base model that compares before its verdict (`train.recognition_answer:
compare`, the pocket model): "traits", the identity's traits as key word -> value word
({"hair": "red", "skin": "tan", ...}), and "people", per query photo everyone in it as
[{"place": "left", "traits": {...}}, ...]; recognition answers then say the comparison
(`templates.comparison`) before the verdict. Other keys are allowed and kept when the file is
rewritten. Attribute questions use `<sks>`
for the identity (they may use `<name>` too); `data attributes` fills missing answers by asking
the frozen base model about the reference photo.

The sampler follows PLVM: recognition : attribute questions = `recognition_share` (1 : 1 by
default); among recognition questions a share `positive_share` (0.6) are positives (a query
photo of the same identity), the rest negatives (a query photo of ANOTHER identity, random or
among the most similar references by reference-encoder CLS cosine). Attribute samples carry no
photo. Sample number `i` depends only on (seed, i), so a resumed run sees exactly the samples
the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..concept import validate_name
from ..data.templates import (
    ATTRIBUTE_QUESTIONS,
    NEGATIVE_ANSWERS,
    PLACEHOLDER,
    POSITIVE_ANSWERS,
    RECOGNITION_QUESTIONS,
    comparison,
    fill,
)
from ..errors import PlvmError
from ..fileio import write_text_atomic
from ..prompt import NAME_RE, mentioned_names

KINDS = ("positive", "negative", "attribute")
NEGATIVE_MODES = ("random", "hard")
HARD_POOL = 3  # hard negatives are drawn among this many most similar identities
PRIMARY_ALONE_SHARE = 0.5  # with several references, draws that make the concept of the primary alone


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


@dataclass
class Identity:
    """One person of the manifest, paths resolved, missing photos dropped."""

    name: str
    reference: Path
    queries: list[Path]
    attributes: list[tuple[str, str]]  # (question, answer), `<sks>` or `<name>` for the person
    line: int = 0  # where it is in the manifest (1-based), for messages
    traits: dict[str, str] = field(default_factory=dict)  # key word -> value word ("hair": "red")
    # per query photo (aligned with `queries`), everyone in it: (place, traits), or None if unknown
    people: list[list[tuple[str, dict[str, str]]] | None] = field(default_factory=list)
    references: list[Path] = field(default_factory=list)  # further reference photos ("references")
    # questions about the person in one of their photos ("visual"): (photo, question, answer)
    visual: list[tuple[Path, str, str]] = field(default_factory=list)
    description: str = ""  # a written description ("description"), as the base model reads one


@dataclass
class Manifest:
    """The usable identities of a manifest, and what was skipped and why."""

    path: Path
    identities: list[Identity]
    problems: list[str] = field(default_factory=list)

    def by_name(self) -> dict[str, Identity]:
        return {identity.name: identity for identity in self.identities}


def read_manifest_rows(path: str | os.PathLike) -> list[tuple[int, str, dict[str, Any] | None]]:
    """(line number, raw line, parsed object or None for blank lines), every line of the file.

    A line that is not a JSON object is a PlvmError naming its line number.
    """
    path = Path(path)
    if not path.exists():
        raise PlvmError(f"manifest not found: {path}")
    if not path.is_file():
        raise PlvmError(f"manifest is not a file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PlvmError(f"cannot read manifest {path}: {error}") from None
    rows: list[tuple[int, str, dict[str, Any] | None]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            rows.append((number, line, None))
            continue
        try:
            row = json.loads(line)
        except ValueError as error:
            raise PlvmError(f"{path} line {number}: not valid JSON ({error.args[0]})") from None
        if not isinstance(row, dict):
            raise PlvmError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, line, row))
    return rows


def _list_field(value: Any, key: str, where: str, problems: list[str]) -> list:
    """A row's optional list field: [] when absent, or (reported) when it is not a list."""
    if value is None:
        return []
    if not isinstance(value, list):
        problems.append(f"{where}: '{key}' is not a list; ignored")
        return []
    return value


def _parse_attributes(value: Any, name: str, where: str,
                      problems: list[str]) -> list[tuple[str, str]]:
    """The answered attribute Q&As of one row; unanswered or malformed items are skipped.

    A Q&A may name the person as `<sks>` or `<name>`; one that names anybody else is skipped.
    """
    pairs = []
    for item in _list_field(value, "attributes", where, problems):
        if not (isinstance(item, dict) and isinstance(item.get("question"), str)
                and isinstance(item.get("answer"), str) and item["answer"].strip()):
            continue
        question, answer = item["question"], item["answer"].strip()
        others = set(mentioned_names(question + " " + answer)) - {name, PLACEHOLDER.strip("<>")}
        if others:
            problems.append(f"{where}: <{name}>: attribute question {question!r} names "
                            f"<{sorted(others)[0]}>; skipped")
            continue
        pairs.append((question, answer))
    return pairs


def _parse_visual(value: Any, name: str, folder: Path, where: str,
                  problems: list[str]) -> list[tuple[Path, str, str]]:
    """The row's "visual" questions ([{"image", "question", "answer"}]) whose photo exists;
    like attributes, one that names anybody else is skipped."""
    rows = []
    for item in _list_field(value, "visual", where, problems):
        if not (isinstance(item, dict) and isinstance(item.get("image"), str)):
            continue
        pairs = _parse_attributes([item], name, where, problems)
        if not pairs:
            continue
        if not (folder / item["image"]).is_file():
            problems.append(f"{where}: <{name}>: visual question's photo {item['image']!r} not found; skipped")
            continue
        rows.append((folder / item["image"], *pairs[0]))
    return rows


def _parse_people(value: Any) -> list[tuple[str, dict[str, str]]] | None:
    """A query photo's "people" entry ([{"place": "left", "traits": {...}}, ...]), or None."""
    if not isinstance(value, list):
        return None
    people = []
    for person in value:
        if not (isinstance(person, dict) and isinstance(person.get("place"), str)
                and isinstance(person.get("traits"), dict)):
            return None
        people.append((person["place"], {str(k): str(v) for k, v in person["traits"].items()}))
    return people


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read the manifest; identities or photos that cannot be used are skipped and reported.

    Errors that stop: a missing or unreadable file, a line that is not a JSON object.
    Skipped with a message in `Manifest.problems`: an identity without a valid name, with a
    missing reference photo or a repeated name; a query photo that does not exist.
    """
    path = Path(path)
    folder = path.parent
    identities: list[Identity] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, _, row in read_manifest_rows(path):
        if row is None:
            continue
        where = f"{path.name} line {number}"
        name = row.get("name")
        try:
            validate_name(name if isinstance(name, str) else "")
        except PlvmError as error:
            problems.append(f"{where}: skipped: {error}")
            continue
        if name in seen:
            problems.append(f"{where}: skipped: name {name!r} already used on line {seen[name]}")
            continue
        reference = row.get("reference")
        if not isinstance(reference, str) or not (folder / reference).is_file():
            problems.append(f"{where}: skipped <{name}>: reference photo {reference!r} not found")
            continue
        queries, people = [], []
        raw_queries = row.get("queries") or []
        if not isinstance(raw_queries, list):
            problems.append(f"{where}: <{name}>: 'queries' is not a list; no query photos used")
            raw_queries = []
        raw_people = row.get("people")
        if raw_people is not None and not (isinstance(raw_people, list) and len(raw_people) == len(raw_queries)):
            problems.append(f"{where}: <{name}>: 'people' is not a list aligned with 'queries'; ignored")
            raw_people = None
        for number_in_row, query in enumerate(raw_queries):
            if isinstance(query, str) and (folder / query).is_file():
                queries.append(folder / query)
                people.append(_parse_people(raw_people[number_in_row] if raw_people else None))
            else:
                problems.append(f"{where}: <{name}>: query photo {query!r} not found; skipped")
        attributes = _parse_attributes(row.get("attributes"), name, where, problems)
        if not queries and not attributes:
            problems.append(f"{where}: skipped <{name}>: no query photo and no answered attribute")
            continue
        seen[name] = number
        traits = row.get("traits")
        traits = {str(k): str(v) for k, v in traits.items()} if isinstance(traits, dict) else {}
        further = row.get("references") or []
        if not isinstance(further, list):
            problems.append(f"{where}: <{name}>: 'references' is not a list; no further reference used")
            further = []
        kept = []
        for photo in further:
            if isinstance(photo, str) and (folder / photo).is_file():
                kept.append(folder / photo)
            else:
                problems.append(f"{where}: <{name}>: reference photo {photo!r} not found; skipped")
        visual = _parse_visual(row.get("visual"), name, folder, where, problems)
        description = row.get("description")
        if description is not None and not isinstance(description, str):
            problems.append(f"{where}: <{name}>: 'description' is not a string; ignored")
            description = None
        identities.append(Identity(name, folder / reference, queries, attributes, number, traits, people, kept,
                                   visual, (description or "").strip()))
    return Manifest(path, identities, problems)


def split_identities(identities: Sequence[Identity], count: int,
                     seed: int) -> tuple[list[Identity], list[Identity]]:
    """(training, held-out): `count` identities held out, chosen by `seed`, manifest order kept."""
    if count < 0:
        raise PlvmError(f"val_identities must be 0 or more, got {count}")
    if count == 0:
        return list(identities), []
    if count >= len(identities):
        raise PlvmError(f"val_identities={count} leaves no identity to train on "
                        f"(the manifest has {len(identities)} usable identities)")
    names = sorted(identity.name for identity in identities)
    random.Random(f"plvmctl-val-{seed}").shuffle(names)
    held = set(names[:count])
    return ([i for i in identities if i.name not in held], [i for i in identities if i.name in held])


# --------------------------------------------------------------------------------------------
# Samples and the sampler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One training example: the concept of `name` is in the prompt.

    `question` and `answer` mention the person as `<name>`; `photo` is the query photo shown
    with the question (None for text-only attribute samples; a visual question about the person
    is an attribute sample with its photo).
    """

    name: str
    kind: str  # positive | negative | attribute
    question: str
    answer: str
    photo: Path | None
    reasoning: str = ""  # said before the answer ("left red hair red same ... match"); the answer is the verdict
    also: tuple[str, ...] = ()  # further concepts in the prompt (their sentences after `name`'s; MC-LLaVA)


def _with_name(text: str, name: str) -> str:
    """`<sks>` (the templates' placeholder) becomes `<name>`."""
    return fill(text, name) if PLACEHOLDER in text else text


class PlvmSampler:
    """PLVM's mix of recognition and attribute questions, deterministic in (seed, index).

    Identities are visited in a fresh seeded permutation every epoch (every identity once per
    epoch), then the kind is drawn: recognition with probability `recognition_share`, positive
    among those with probability `positive_share`. A kind an identity cannot have (no query
    photo, no attribute, nobody else to be a negative) falls back to one it can have.
    `hard_neighbours` maps a name to the other names ordered by similarity (for "hard").
    `max_references` > 1: each concept of a micro-batch is made from up to that many of its
    identity's reference photos (`references_for`).
    """

    def __init__(self, identities: Sequence[Identity], *, seed: int = 0,
                 positive_share: float = 0.6, recognition_share: float = 0.5,
                 negatives: str = "random",
                 hard_neighbours: dict[str, list[str]] | None = None,
                 compare_keys: Sequence[str] = (), max_references: int = 1,
                 also_share: float = 0.0, visual_share: float = 0.0) -> None:
        if not identities:
            raise PlvmError("the sampler needs at least one identity")
        if not 0.0 <= positive_share <= 1.0:
            raise PlvmError(f"positive_share must be between 0 and 1, got {positive_share}")
        if not 0.0 <= recognition_share <= 1.0:
            raise PlvmError(f"recognition_share must be between 0 and 1, got {recognition_share}")
        if negatives not in NEGATIVE_MODES:
            raise PlvmError(f"negatives must be one of {', '.join(NEGATIVE_MODES)}, got {negatives!r}")
        if negatives == "hard" and hard_neighbours is None:
            raise PlvmError("hard negatives need the similarity ranking (hard_neighbours)")
        if compare_keys:
            check_comparable(identities, compare_keys)
        if max_references < 1:
            raise PlvmError(f"max_references must be 1 or more, got {max_references}")
        if not 0.0 <= also_share <= 1.0:
            raise PlvmError(f"also_share must be between 0 and 1, got {also_share}")
        if not 0.0 <= visual_share <= 1.0:
            raise PlvmError(f"visual_share must be between 0 and 1, got {visual_share}")
        self.visual_share = visual_share
        self.max_references = max_references
        self.also_share = also_share
        self.compare_keys = tuple(compare_keys)
        self.identities = list(identities)
        self.seed = seed
        self.positive_share = positive_share
        self.recognition_share = recognition_share
        self.negatives = negatives
        self.hard_neighbours = hard_neighbours or {}
        self._by_name = {identity.name: identity for identity in self.identities}
        self._with_photos = [i.name for i in self.identities if i.queries]
        self._owner = {photo: i.name for i in self.identities for photo in i.queries}  # query photo -> subject

    def state_dict(self) -> dict[str, Any]:
        """What decides the samples: checked on resume so a changed setup is noticed."""
        state = {"seed": self.seed, "positive_share": self.positive_share,
                 "recognition_share": self.recognition_share, "negatives": self.negatives,
                 "names": [identity.name for identity in self.identities]}
        if self.compare_keys:
            state["compare_keys"] = list(self.compare_keys)
        if self.max_references > 1:
            state["max_references"] = self.max_references
        if self.also_share > 0:
            state["also_share"] = self.also_share
        if self.visual_share > 0:
            state["visual_share"] = self.visual_share
        return state

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise PlvmError if `state` (from a checkpoint) would draw other samples."""
        mine = self.state_dict()
        for key, value in mine.items():
            if state.get(key) != value:
                what = "the identities" if key == "names" else key
                raise PlvmError(f"cannot resume: {what} changed since the checkpoint "
                                f"(manifest or train settings differ)")

    def _identity_at(self, index: int) -> Identity:
        count = len(self.identities)
        epoch, position = divmod(index, count)
        order = list(range(count))
        random.Random(f"plvmctl-epoch-{self.seed}-{epoch}").shuffle(order)
        return self.identities[order[position]]

    def _negative_pool(self, name: str) -> list[str]:
        others = [n for n in self._with_photos if n != name]
        if self.negatives == "hard" and others:
            ranked = [n for n in self.hard_neighbours.get(name, []) if n in others]
            return ranked[:HARD_POOL] or others
        return others

    def sample(self, index: int) -> Sample:
        """Sample number `index` (any non-negative integer); with `visual_share`, that share of
        the attribute samples asked about a photo instead (`_visual`); with `also_share`, that
        share of them with other concepts in the prompt too (`_with_others`)."""
        sample = self._sample(index)
        if self.visual_share > 0 and sample.kind == "attribute":
            sample = self._visual(sample, index)
        return self._with_others(sample, index) if self.also_share > 0 else sample

    def _visual(self, sample: Sample, index: int) -> Sample:
        """In a share `visual_share` of the draws (a random stream of its own), one of the
        person's visual questions with its photo in place of the text-only attribute question."""
        rng = random.Random(f"plvmctl-visual-{self.seed}-{index}")
        visual = self._by_name[sample.name].visual
        if rng.random() >= self.visual_share or not visual:
            return sample
        photo, question, answer = visual[rng.randrange(len(visual))]
        return dataclasses.replace(sample, question=_with_name(question, sample.name),
                                   answer=_with_name(answer, sample.name), photo=photo)

    def _with_others(self, sample: Sample, index: int) -> Sample:
        """`sample` with 1 or 2 other identities' concepts after its own, in a share
        `also_share` of the draws (from a random stream of its own, so every sample is otherwise
        the one drawn without). The question and answer stay about `sample.name`; half the
        negatives have the person in the photo among the others, the hardest distractor (a
        model that reads the nearest sentence says yes)."""
        rng = random.Random(f"plvmctl-also-{self.seed}-{index}")
        if rng.random() >= self.also_share or len(self.identities) < 2:
            return sample
        others: list[str] = []
        if sample.kind == "negative" and rng.random() < 0.5:
            others.append(self._owner[sample.photo])
        wanted = min(rng.randint(1, 2), len(self.identities) - 1)
        while len(others) < wanted:
            name = self.identities[rng.randrange(len(self.identities))].name
            if name != sample.name and name not in others:
                others.append(name)
        rng.shuffle(others)
        return dataclasses.replace(sample, also=tuple(others))

    def _sample(self, index: int) -> Sample:
        identity = self._identity_at(index)
        rng = random.Random(f"plvmctl-sample-{self.seed}-{index}")
        negatives = self._negative_pool(identity.name)
        can = {"positive": bool(identity.queries), "negative": bool(negatives),
               "attribute": bool(identity.attributes)}
        recognition = rng.random() < self.recognition_share
        positive = rng.random() < self.positive_share
        if recognition and not (can["positive"] or can["negative"]):
            recognition = False
        if not recognition and not can["attribute"]:
            recognition = True
        if recognition:
            if positive and not can["positive"]:
                positive = False
            if not positive and not can["negative"]:
                positive = True
        name = identity.name
        if not recognition:
            question, answer = identity.attributes[rng.randrange(len(identity.attributes))]
            return Sample(name, "attribute", _with_name(question, name), _with_name(answer, name), None)
        question = fill(rng.choice(RECOGNITION_QUESTIONS), name)
        if positive:
            number = rng.randrange(len(identity.queries))
            return Sample(name, "positive", question, fill(rng.choice(POSITIVE_ANSWERS), name),
                          identity.queries[number], self._reasoning(identity, identity, number))
        other = self._by_name[negatives[rng.randrange(len(negatives))]]
        number = rng.randrange(len(other.queries))
        return Sample(name, "negative", question, fill(rng.choice(NEGATIVE_ANSWERS), name),
                      other.queries[number], self._reasoning(identity, other, number))

    def _reasoning(self, identity: Identity, owner: Identity, number: int) -> str:
        """The comparison said before the verdict ("compare" answers), or nothing."""
        if not self.compare_keys:
            return ""
        return comparison(identity.traits, owner.people[number], self.compare_keys)[0]

    def references_for(self, name: str, step: int, micro: int) -> tuple[Path, ...]:
        """The reference photos `name`'s concept is made from in micro-batch `micro` of step
        `step`. With `max_references` > 1 and further photos: in a share PRIMARY_ALONE_SHARE
        of the draws the primary reference alone (what one-photo concepts need), otherwise n of
        the identity's photos (the primary and its further ones) at random, n drawn uniformly
        from 2 to the smaller of `max_references` and how many it has. A single further photo
        is never drawn: one crowd photo alone cannot say who the subject is, and training on it
        cost one clean photo 10 points of validation recognition (the card of the first try).
        Depends only on (seed, name, step, micro), so every rank of a multi-process run draws
        the same."""
        identity = self._by_name[name]
        photos = [identity.reference, *identity.references]
        if self.max_references == 1 or len(photos) == 1:
            return (identity.reference,)
        rng = random.Random(f"plvmctl-references-{self.seed}-{name}-{step}-{micro}")
        if rng.random() < PRIMARY_ALONE_SHARE:
            return (identity.reference,)
        count = rng.randint(2, min(self.max_references, len(photos)))
        return tuple(rng.sample(photos, count))

    def micro_batch(self, step: int, micro: int, *, batch_size: int, grad_accum: int,
                    rank: int = 0, world_size: int = 1) -> list[Sample]:
        """The `batch_size` samples of micro-batch `micro` of optimizer step `step` on `rank`."""
        first = ((step * grad_accum + micro) * world_size + rank) * batch_size
        return [self.sample(first + row) for row in range(batch_size)]


def hard_neighbours(names: Sequence[str], cls: torch.Tensor) -> dict[str, list[str]]:
    """For each name, the other names by decreasing cosine of their reference CLS tokens.

    `cls` is [n, D], one row per name in `names` order.
    """
    unit = torch.nn.functional.normalize(cls.float(), dim=-1)
    similarity = unit @ unit.T  # [n, n]
    ranking: dict[str, list[str]] = {}
    for row, name in enumerate(names):
        order = torch.argsort(similarity[row], descending=True, stable=True).tolist()
        ranking[name] = [names[j] for j in order if j != row]
    return ranking


def validation_samples(held_out: Sequence[Identity], everyone: Sequence[Identity], *,
                       seed: int, photos_per_identity: int = 5,
                       compare_keys: Sequence[str] = ()) -> list[Sample]:
    """Recognition checks for held-out identities: "Is <name> in this photo?".

    Up to `photos_per_identity` positives per identity (its own query photos) and as many
    negatives (query photos of other identities, any of the manifest), chosen by `seed`.
    With `compare_keys` each sample carries the comparison a "compare" answer says first.
    """
    rng = random.Random(f"plvmctl-val-samples-{seed}")
    question = RECOGNITION_QUESTIONS[0]
    samples: list[Sample] = []

    def reasoning(identity: Identity, owner: Identity, number: int) -> str:
        return comparison(identity.traits, owner.people[number], compare_keys)[0] if compare_keys else ""

    for identity in held_out:
        name = identity.name
        count = min(len(identity.queries), photos_per_identity)
        others = [(other, number) for other in everyone if other.name != name
                  for number in range(len(other.queries))]
        negatives = rng.sample(others, min(len(others), max(1, count))) if others else []
        for number in range(count):
            samples.append(Sample(name, "positive", fill(question, name), fill(POSITIVE_ANSWERS[0], name),
                                  identity.queries[number], reasoning(identity, identity, number)))
        for other, number in negatives:
            samples.append(Sample(name, "negative", fill(question, name), fill(NEGATIVE_ANSWERS[0], name),
                                  other.queries[number], reasoning(identity, other, number)))
    return samples


def check_comparable(identities: Sequence[Identity], keys: Sequence[str]) -> None:
    """PlvmError unless every identity has `keys` among its traits and every query photo says
    who is in it with those keys (what "compare" recognition answers are written from)."""
    for identity in identities:
        missing = [key for key in keys if key not in identity.traits]
        if missing:
            raise PlvmError(f"compare answers need the traits {', '.join(keys)} of every identity: "
                            f"<{identity.name}> (manifest line {identity.line}) lacks {', '.join(missing)}")
        for photo, people in zip(identity.queries, identity.people):
            if people is None or any(key not in traits for _, traits in people for key in keys):
                raise PlvmError(f"compare answers need 'people' with the traits {', '.join(keys)} for "
                                f"every query photo: {photo.name} of <{identity.name}> "
                                f"(manifest line {identity.line}) has none")


# --------------------------------------------------------------------------------------------
# `data attributes`: the base model writes the attribute answers
# --------------------------------------------------------------------------------------------


def question_plan(photos: Sequence[Any], questions: Sequence[str], per_photo: int, seed_text: str,
                  first: Sequence[str] = ()) -> list[tuple[Any, str]]:
    """(photo, question) pairs to have the base model answer: per photo `per_photo` questions,
    `first` ones then `questions` in a fresh order (cycling when there are fewer), deterministic
    in `seed_text` (the trainer's name and seed)."""
    rng = random.Random(seed_text)
    plan = []
    for photo in photos:
        shuffled = list(questions)
        rng.shuffle(shuffled)
        ordered = [*first, *shuffled]
        plan += [(photo, ordered[i % len(ordered)]) for i in range(per_photo)]
    return plan


def neutral_question(question: str) -> str:
    """The question about "the person" instead of `<sks>`/`<name>` (the base model knows no names)."""
    def replace(match) -> str:
        if match.group(1) == "image":
            return match.group(0)
        start = match.start() == 0 or question[:match.start()].rstrip().endswith((".", "?", "!", ":"))
        return "The person" if start else "the person"

    return NAME_RE.sub(replace, question)


def _pending_questions(row: dict[str, Any]) -> list[str] | None:
    """The attribute questions of `row` that still need an answer (None: nothing to do)."""
    items = row.get("attributes")
    if not items:
        return list(ATTRIBUTE_QUESTIONS)
    if not isinstance(items, list):
        return None
    pending = [item["question"] for item in items
               if isinstance(item, dict) and isinstance(item.get("question"), str)
               and not isinstance(item.get("answer"), str)]
    return pending or None


@dataclass
class AttributeReport:
    """What `fill_attributes` did."""

    answered: int = 0  # identities that got answers in this run
    already: int = 0  # identities that had all their answers
    failed: list[str] = field(default_factory=list)  # one line per identity left unanswered


def fill_attributes(runtime, manifest_path: str | os.PathLike, *, identities_per_write: int = 8,
                    batch_size: int | None = None, max_new_tokens: int | None = None,
                    progress: bool = False,
                    on_write: Callable[[int], None] | None = None) -> AttributeReport:
    """Ask the frozen base model each attribute question about each reference photo.

    Identities whose attributes are all answered are skipped. The questions go through
    `Engine(runtime, {})` with "the person" in place of the name and the reference photo as
    the image. The manifest is rewritten atomically after every `identities_per_write`
    identities (other keys and untouched lines kept as they were), so a stopped run resumes
    where it was. `on_write(answered_so_far)` is called after each write (tests use it).
    """
    from ..engine import AskRequest, Engine

    path = Path(manifest_path)
    rows = read_manifest_rows(path)
    lines = [line for _, line, _ in rows]
    report = AttributeReport()
    todo: list[tuple[int, dict[str, Any], list[str]]] = []
    for position, (number, _, row) in enumerate(rows):
        if row is None:
            continue
        pending = _pending_questions(row)
        if pending is None:
            report.already += 1
            continue
        reference = row.get("reference")
        if not isinstance(reference, str) or not (path.parent / reference).is_file():
            report.failed.append(f"line {number}: reference photo {reference!r} not found")
            continue
        todo.append((position, row, pending))
    if not todo:
        return report
    engine = Engine(runtime, {})
    for start in range(0, len(todo), identities_per_write):
        chunk = todo[start:start + identities_per_write]
        requests, owners = [], []
        for position, row, pending in chunk:
            image = path.parent / row["reference"]
            for question in pending:
                requests.append(AskRequest(neutral_question(question), image=image))
                owners.append((position, question))
        results = engine.ask(requests, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             progress=progress)
        answers: dict[int, dict[str, str]] = {}
        errors: dict[int, str] = {}
        for (position, question), result in zip(owners, results):
            if result.ok:
                answers.setdefault(position, {})[question] = (result.answer or "").strip()
            else:
                errors.setdefault(position, result.error or "failed")
        for position, row, pending in chunk:
            if position in errors:
                report.failed.append(f"line {rows[position][0]}: {errors[position]}")
                continue
            got = answers.get(position, {})
            items = row.get("attributes") or []
            if not items:
                row["attributes"] = [{"question": q, "answer": got[q]} for q in pending]
            else:
                for item in items:
                    if isinstance(item, dict) and item.get("question") in got \
                            and not isinstance(item.get("answer"), str):
                        item["answer"] = got[item["question"]]
            lines[position] = json.dumps(row)
            report.answered += 1
        write_text_atomic(path, "".join(line + "\n" for line in lines))
        if on_write is not None:
            on_write(report.answered)
    return report


def warn(message: str) -> None:
    """One warning line on stderr."""
    print(f"warning: {message}", file=sys.stderr)
