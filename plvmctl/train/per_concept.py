"""The pieces every per-concept training method composes: its photos, its negatives, its
conversations, the epoch loop and the training of a test set's identities a group at a time.

Yo'LLaVA, MC-LLaVA and MyVLM (plvmctl/methods/<name>/trainer.py) train a concept from a few
photos of it and photos of other people; what they share is here, as public functions:

- photos: `list_photos` (a folder's image files), `reference_photos` (an evaluation
  identity's `ref_img*` photos);
- negatives (`gather_negatives`, settings typed by `NegativeSettings`): hard ones (the index's
  nearest neighbours of the mean image embedding of the positives, near-duplicates of the
  positives removed) and random easy ones, or random photos of a folder;
- conversations (`build_conversations`, Yo'LLaVA's data, which MC-LLaVA reuses per concept):
  `recognition_per_photo` recognition Q&As per positive photo ("Is <name> in this photo?"
  phrasings; a "Yes, ..." answer), one "No, ..." Q&A per negative photo, and
  `attribute_per_photo` text-only Q&As per positive photo: the frozen base model answers each
  question about "the person" with the photo attached; for training the question names
  `<name>`, "the person" in the answer becomes `<name>`, and the prompt has NO image, so the
  attributes must live in the tokens. Answers are cached in a JSON file and a rerun does not
  ask again. A base model that reasons before its verdict gets recognition rows in its own
  words instead (`reasoned_recognition_samples`);
- the epoch loop (`train_epochs`): seeded shuffled passes over the rows, `batch_size` a step,
  optional random flips, and after each epoch past `select_after_epoch` a score; the best
  epoch's tensors are kept (ties: the later epoch, as in Yo'LLaVA's code);
- group training for `plvmctl eval` (`train_in_groups`): concepts made a group of identities
  at a time, cached on disk and reused while what made them is unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm import tqdm

from ..answers import (
    DESCRIPTION_MAX_NEW_TOKENS,
    DESCRIPTION_PROMPT,
    clean_description,
    parse_yes_no,
    verdict_start,
)
from ..concept import Concept
from ..data.templates import (
    ATTRIBUTE_QUESTIONS,
    NEGATIVE_ANSWERS,
    POSITIVE_ANSWERS,
    RECOGNITION_QUESTIONS,
    fill,
)
from ..errors import PlvmError
from ..fileio import sha256_file, write_bytes_atomic, write_json_atomic
from ..images import load_image
from ..shards import Process, assign, barrier, current_process, in_process_group
from .common import JsonlLogger, photos_digest
from .data import Sample, neutral_question, question_plan
from .soft_prompt import SoftPromptConfig, SoftPromptTrainer

CONVERSATIONS_FORMAT = "plvmctl.yollava-conversations"
DOWNLOADS_DIR = "downloads"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# "the person" / "this person" in a base-model answer is the concept: it becomes `<name>`.
PERSON_RE = re.compile(r"\b(?:[Tt]he|[Tt]his) person\b")


# --------------------------------------------------------------------------------------------
# Photos and negatives
# --------------------------------------------------------------------------------------------


class NegativeSettings(Protocol):
    """What gathering negatives reads from a method's settings (every per-concept method's
    recipe section has these four)."""

    hard_negatives: int  # nearest neighbours of the positives' mean embedding (with an index)
    random_negatives: int  # easy negatives drawn at random
    exclude_threshold: float  # cosine above which an index hit is a copy of a positive
    seed: int


def list_photos(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder` (by suffix), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlvmError(f"photo folder not found: {folder}")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass
class Negatives:
    """The negative photos of one concept and what could not be used."""

    hard: list[Path] = field(default_factory=list)
    easy: list[Path] = field(default_factory=list)
    missing: int = 0  # index hits with no local file (and no download)
    failed_downloads: list[str] = field(default_factory=list)  # "URL: reason"

    @property
    def photos(self) -> list[Path]:
        """Hard first, then easy, without repeats."""
        return list(dict.fromkeys(self.hard + self.easy))

    def summary(self) -> dict[str, Any]:
        return {"hard": len(self.hard), "easy": len(self.easy), "missing": self.missing,
                "failed_downloads": len(self.failed_downloads)}


def folder_negatives(folder: str | os.PathLike, count: int, *, seed: int,
                     exclude: Sequence[Path] = ()) -> list[Path]:
    """`count` photos of `folder` drawn at random (seeded), files in `exclude` left out."""
    excluded = {Path(p).resolve() for p in exclude}
    pool = [p for p in list_photos(folder) if p.resolve() not in excluded]
    rng = random.Random(f"yollava-easy-{seed}")
    return rng.sample(pool, min(count, len(pool)))


def _local_photo(hit: dict[str, Any], negatives_dir: Path | None, base: Path | None) -> Path | None:
    """The local file of an index hit: its metadata `path`, else `<id>.jpg|png` in --negatives."""
    path = hit.get("path")
    if isinstance(path, str) and path:
        candidate = Path(path)
        if not candidate.is_absolute() and base is not None and not candidate.exists():
            candidate = base / candidate
        if candidate.is_file():
            return candidate
    identifier = hit.get("id")
    if negatives_dir is not None and identifier is not None:
        for suffix in (".jpg", ".png", ".jpeg", ".webp"):
            candidate = negatives_dir / f"{identifier}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def download_photo(url: str, folder: Path, identifier: str, *, timeout: float = 10.0,
                   max_bytes: int = 20 << 20) -> Path:
    """Fetch `url` into `folder/<identifier>.<ext>` (atomic); PlvmError with the reason."""
    if not url.startswith(("http://", "https://")):
        raise PlvmError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers={"User-Agent": "plvmctl"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise PlvmError(f"{url}: {getattr(error, 'reason', error)}") from None
    if len(data) > max_bytes:
        raise PlvmError(f"{url}: larger than {max_bytes >> 20} MiB")
    suffix = ".png" if data[:8] == b"\x89PNG\r\n\x1a\n" else ".jpg"
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", identifier)[:80] or "image"
    path = folder / f"{safe}{suffix}"
    write_bytes_atomic(path, data)
    try:
        load_image(path)
    except PlvmError as error:
        path.unlink(missing_ok=True)
        raise PlvmError(f"{url}: {error}") from None
    return path


def _hit_row(hit: Any) -> dict[str, Any]:
    """An image-index `Hit` as one dict: its metadata (path, url, caption ...) plus `id`."""
    return {**dict(getattr(hit, "metadata", {}) or {}), "id": hit.id}


def gather_negatives(runtime, positives: Sequence[Path], config: NegativeSettings, *,
                     index: str | os.PathLike | None = None,
                     negatives_dir: str | os.PathLike | None = None, download: bool = False,
                     download_dir: Path | None = None,
                     echo: Callable[[str], None] | None = None) -> Negatives:
    """Hard + easy negatives from an index, or random ones from `negatives_dir` alone.

    With an index (built by `plvmctl index build` from the backbone's `embed_images`): the
    positives are embedded the same way, `image_index.hard_negatives` gives the
    `hard_negatives` nearest neighbours of their mean embedding (hits with cosine >=
    `exclude_threshold` to a positive left out as near-duplicates of it) and
    `image_index.random_negatives` `random_negatives` other rows at random (near-duplicates of a
    positive left out there too). Hits are resolved to
    local files by their metadata `path` (image-folder indexes) or by id in `negatives_dir`
    (`<id>.jpg|png`); a hit with neither is skipped and counted, or downloaded from its `url`
    when `download` is on (failures are listed, never fatal).
    Without an index, `hard_negatives + random_negatives` photos are drawn at random from
    `negatives_dir`, so a run has as many negatives either way.
    """
    negatives_folder = Path(negatives_dir) if negatives_dir else None
    if negatives_folder is not None and not negatives_folder.is_dir():
        raise PlvmError(f"--negatives folder not found: {negatives_folder}")
    if index is None:
        if negatives_folder is None:
            raise PlvmError("Yo'LLaVA needs negatives: pass --index INDEX (built by "
                            "`plvmctl index build`) and/or --negatives DIR")
        easy = folder_negatives(negatives_folder, config.random_negatives + config.hard_negatives,
                                seed=config.seed, exclude=positives)
        return Negatives(easy=easy)

    from .. import image_index  # faiss loads only when an index is used

    opened = image_index.open_index(index)
    embeddings = runtime.backbone.embed_images([load_image(p) for p in positives]).cpu().numpy()
    if embeddings.shape[1] != opened.info.dim:
        raise PlvmError(f"index {index} holds {opened.info.dim}-d vectors but this model's image "
                        f"embeddings are {embeddings.shape[1]}-d: build the index with the same "
                        f"model (`plvmctl --recipe R index build`)")
    hard_hits = []
    if config.hard_negatives:
        hard_hits = image_index.hard_negatives(opened, embeddings, config.hard_negatives,
                                               config.exclude_threshold)
    taken = [hit.id for hit in hard_hits]
    count = min(config.random_negatives, opened.info.count - len(taken))
    easy_hits = image_index.random_negatives(opened, max(0, count), seed=config.seed, exclude_ids=taken)
    if easy_hits:  # a random draw may hit a copy of a positive too: leave those out
        vectors = torch.nn.functional.normalize(
            torch.as_tensor(opened.vectors([hit.id for hit in easy_hits]), dtype=torch.float32), dim=-1)
        units = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=-1)
        nearest = (vectors @ units.T).max(dim=1).values
        easy_hits = [hit for hit, cosine in zip(easy_hits, nearest.tolist())
                     if cosine < config.exclude_threshold]
    result = Negatives()
    positive_set = {p.resolve() for p in positives}
    for hits, bucket in ((hard_hits, result.hard), (easy_hits, result.easy)):
        for hit in map(_hit_row, hits):
            photo = _local_photo(hit, negatives_folder, Path(index).parent)
            if photo is None and download and isinstance(hit.get("url"), str):
                try:
                    photo = download_photo(hit["url"], download_dir or Path(DOWNLOADS_DIR), str(hit["id"]))
                except PlvmError as error:
                    result.failed_downloads.append(str(error))
                    continue
            if photo is None:
                result.missing += 1
            elif photo.resolve() not in positive_set:
                bucket.append(photo)
    if echo is not None and (result.missing or result.failed_downloads):
        echo(f"negatives: {result.missing} index hits have no local photo"
             + (f", {len(result.failed_downloads)} downloads failed" if result.failed_downloads else "")
             + ("" if download else " (pass --negatives DIR, or --download to fetch their URLs)"))
    return result



def reference_photos(reference: Path) -> list[Path]:
    """The photos of one evaluation identity: every `ref_img*` beside `reference` (it first)."""
    reference = Path(reference)
    siblings = [p for p in list_photos(reference.parent) if p.name.startswith("ref_img") and p != reference]
    return [reference] + siblings



# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def name_answer(answer: str, name: str) -> str:
    """A base-model answer about "the person" turned into one about `<name>`."""
    return PERSON_RE.sub(f"<{name}>", answer.strip())


def recognition_samples(name: str, positives: Sequence[Path], negatives: Sequence[Path], *,
                        per_photo: int, seed: int) -> list[Sample]:
    """`per_photo` positive Q&As per positive photo (distinct phrasings while they last) and
    one negative Q&A per negative photo, all with `<name>`; deterministic in `seed`."""
    rng = random.Random(f"yollava-recognition-{seed}")
    samples: list[Sample] = []
    for photo in positives:
        questions = list(RECOGNITION_QUESTIONS)
        rng.shuffle(questions)
        for number in range(per_photo):
            question = questions[number % len(questions)]
            answer = rng.choice(POSITIVE_ANSWERS)
            samples.append(Sample(name, "positive", fill(question, name), fill(answer, name), Path(photo)))
    for photo in negatives:
        samples.append(Sample(name, "negative", fill(rng.choice(RECOGNITION_QUESTIONS), name),
                              fill(rng.choice(NEGATIVE_ANSWERS), name), Path(photo)))
    return samples


def reasoned_recognition_samples(runtime, name: str, positives: Sequence[Path], negatives: Sequence[Path],
                                 config: SoftPromptConfig, *, progress: bool = False) -> list[Sample]:
    """Recognition rows for a base model that reasons before its verdict, in its own words.

    The base model describes the first positive photo in one short sentence (as the
    `llava-text` baseline does), then answers each recognition question of
    `recognition_samples` with "<name> is {description}." in its prompt. Rows whose generated
    verdict is right keep what the model said before it as their `reasoning` (the answer stays
    the template's "Yes, ..." / "No, ..."); the others are dropped. Trained on them, the
    concept's tokens take the description's place in the model's own comparison, the way the
    Aligner's tokens do; without them a concept only learns attribute answers and is never
    asked to be compared with a photo.
    """
    from ..engine import AskRequest, Engine

    described = Engine(runtime, {}).ask([AskRequest(DESCRIPTION_PROMPT, image=positives[0])],
                                        max_new_tokens=DESCRIPTION_MAX_NEW_TOKENS)[0]
    description = clean_description(described.answer) if described.ok else ""
    if not description:
        return []
    rows = recognition_samples(name, positives, negatives, per_photo=config.recognition_per_photo,
                               seed=config.seed)
    engine = Engine(runtime, {}, descriptions={name: description})
    said = engine.ask([AskRequest(row.question, image=row.photo) for row in rows],
                      max_new_tokens=config.reasoning_max_new_tokens, progress=progress)
    kept = []
    for row, result in zip(rows, said):
        answer = result.answer if result.ok else None
        if not answer or parse_yes_no(answer) != ("yes" if row.kind == "positive" else "no"):
            continue
        start = verdict_start(answer)
        reasoning = answer[:start].strip().rstrip(".!?;").strip() if start else ""
        kept.append(dataclasses.replace(row, reasoning=reasoning))
    return kept


def attribute_plan(positives: Sequence[Path], per_photo: int, seed: int) -> list[tuple[Path, str]]:
    """(photo, question template with `<sks>`) pairs: `per_photo` distinct questions a photo."""
    return question_plan([Path(photo) for photo in positives], ATTRIBUTE_QUESTIONS, per_photo,
                         f"yollava-attributes-{seed}")


def _read_conversations(path: Path, fingerprint: str) -> dict[str, dict[str, str]]:
    """Cached attribute answers {photo sha256: {question: answer}} made by this base model."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a damaged cache is only asked again
    if not isinstance(data, dict) or data.get("format") != CONVERSATIONS_FORMAT \
            or data.get("base_model") != fingerprint or not isinstance(data.get("answers"), dict):
        return {}
    return {str(k): dict(v) for k, v in data["answers"].items() if isinstance(v, dict)}


@dataclass
class Conversations:
    """The training conversations of one concept."""

    samples: list[Sample]
    asked: int  # attribute questions the base model answered in this call
    reused: int  # attribute answers read from the cache

    def counts(self) -> dict[str, int]:
        kinds = {"positive": 0, "negative": 0, "attribute": 0}
        for sample in self.samples:
            kinds[sample.kind] += 1
        return kinds


def build_conversations(runtime, name: str, positives: Sequence[Path], negatives: Sequence[Path],
                        config: SoftPromptConfig, cache_file: Path | None, *,
                        progress: bool = False) -> Conversations:
    """Recognition and attribute Q&As for `name`; attribute answers cached in `cache_file`."""
    from ..engine import AskRequest, Engine

    fingerprint = runtime.backbone.fingerprint
    answers = _read_conversations(cache_file, fingerprint) if cache_file else {}
    plan = attribute_plan(positives, config.attribute_per_photo, config.seed)
    digests = {photo: sha256_file(photo) for photo in dict.fromkeys(p for p, _ in plan)}
    todo = [(photo, question) for photo, question in plan
            if question not in answers.get(digests[photo], {})]
    reused = len(plan) - len(todo)
    if todo:
        engine = Engine(runtime, {})
        requests = [AskRequest(neutral_question(question), image=photo) for photo, question in todo]
        results = engine.ask(requests, max_new_tokens=config.attribute_max_new_tokens, progress=progress)
        for (photo, question), result in zip(todo, results):
            if not result.ok:
                raise PlvmError(f"the base model could not answer {question!r} about {photo}: {result.error}")
            answers.setdefault(digests[photo], {})[question] = (result.answer or "").strip()
    if config.reasoning_base:
        samples = reasoned_recognition_samples(runtime, name, positives, negatives, config, progress=progress)
    else:
        samples = recognition_samples(name, positives, negatives, per_photo=config.recognition_per_photo,
                                      seed=config.seed)
    for photo, question in plan:
        answer = name_answer(answers[digests[photo]][question], name)
        if answer:  # an empty answer teaches nothing
            samples.append(Sample(name, "attribute", fill(question, name), answer, None))
    if cache_file is not None:
        write_json_atomic(cache_file, {
            "format": CONVERSATIONS_FORMAT, "base_model": fingerprint, "name": name,
            "answers": answers,
            "samples": [{"kind": s.kind, "question": s.question, "answer": s.answer,
                         "photo": None if s.photo is None else str(s.photo),
                         **({"reasoning": s.reasoning} if s.reasoning else {})} for s in samples],
        })
    return Conversations(samples, asked=len(todo), reused=reused)



# --------------------------------------------------------------------------------------------
# The epoch loop
# --------------------------------------------------------------------------------------------


def spread(items: Sequence[Path], count: int) -> list[Path]:
    """`count` items spread evenly over `items` (all of them if there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]


def train_epochs(trainer: SoftPromptTrainer, samples: Sequence[Sample], config: SoftPromptConfig, log_path: Path, *,
                 order_seed: str, label: str, score: Callable[[], tuple[Any, float]], progress: bool = False,
                 on_epoch: Callable[[int, int, Any], None] | None = None) -> tuple[list[float], list[dict], int, Any]:
    """`config.epochs` passes over `samples` in a seeded shuffled order, `batch_size` a step
    (random flips with `config.flip`), one log row per step and per epoch in `log_path`; after
    each epoch past `select_after_epoch`, `score()` → (accuracy, mean) and the best epoch's
    tensors are kept (ties: the later epoch) and restored at the end. `on_epoch(epoch, steps,
    trainer)` after every epoch. Returns (losses, epoch rows, best epoch, its accuracy)."""
    rng = random.Random(order_seed)
    log_path.unlink(missing_ok=True)
    losses: list[float] = []
    epochs: list[dict[str, Any]] = []
    best_epoch, best_accuracy, best_mean, best_state = 0, None, None, None
    first_scored = min(config.select_after_epoch + 1, config.epochs)
    train_start = time.perf_counter()
    steps_per_epoch = -(-len(samples) // config.batch_size)
    bar = tqdm(total=config.epochs * steps_per_epoch, desc=label, unit="step", disable=not progress)
    with JsonlLogger(log_path) as log:
        for epoch in range(1, config.epochs + 1):
            order = list(samples)
            rng.shuffle(order)
            epoch_losses = []
            for start in range(0, len(order), config.batch_size):
                chunk = order[start:start + config.batch_size]
                flips = None
                if config.flip:
                    flips = [rng.random() < 0.5 for s in chunk if s.photo is not None]
                loss = trainer.step(chunk, cached=config.cache_features, flips=flips)
                losses.append(loss)
                epoch_losses.append(loss)
                log.log({"kind": "step", "step": len(losses), "epoch": epoch, "loss": loss,
                         "seconds": round(time.perf_counter() - train_start, 3)})
                bar.update(1)
            row: dict[str, Any] = {"kind": "epoch", "epoch": epoch,
                                   "mean_loss": sum(epoch_losses) / max(1, len(epoch_losses))}
            if epoch >= first_scored:
                accuracy, mean = score()
                row["accuracy"] = accuracy
                if best_mean is None or mean >= best_mean:
                    best_epoch, best_accuracy, best_mean, best_state = epoch, accuracy, mean, trainer.snapshot()
            epochs.append(row)
            log.log(row)
            if on_epoch is not None:
                on_epoch(epoch, len(losses), trainer)
    bar.close()
    if best_state is not None:
        trainer.restore(best_state)
    return losses, epochs, best_epoch, best_accuracy



# --------------------------------------------------------------------------------------------
# A test set's identities, a group at a time (plvmctl eval)
# --------------------------------------------------------------------------------------------


@dataclass
class TrainedConcepts:
    """What a per-concept training method made for the test identities."""

    concepts: dict[str, Any]
    unavailable: dict[str, str]
    seconds: list[float]
    folder: Path

    @property
    def seconds_per_concept(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None


TrainGroup = Callable[[list[str], dict[str, list[Path]], dict[str, list[Path]], Path],
                      tuple[dict[str, Concept], dict[str, float]]]


def train_in_groups(runtime, references: Sequence[tuple[str, Path]], folder: Path, settings: NegativeSettings,
                    train_group: TrainGroup, *, settings_digest: str, negatives_index: str | None,
                    negatives_folder: Path | None, negatives_digest: str, group_size: int = 1,
                    label: str = "train concepts", progress: bool = False) -> TrainedConcepts:
    """Concepts of the (name, reference photo) `references`, trained `group_size` identities at
    a time (in their order) by `train_group(names, positives, negatives, run folder)` →
    ({name: concept}, {name: seconds}), `positives` and `negatives` mapping each name to its
    photos; cached in `folder/NAME.concept` (the run folders beside them).

    Positives are the reference photo and any other `ref_img*` beside it (`reference_photos`);
    negatives are gathered (`gather_negatives`, with `settings`) from `negatives_index` and/or
    `negatives_folder`, the pool whose digest is `negatives_digest`. A group is reused from the
    cache when every member is there, made for this model, these positives, these settings
    (`settings_digest`) and this negative pool and, for a concept that records it
    (`trained_with`), with the same group; else the whole group is trained again. A member
    whose photos cannot be read, or a group whose training fails, is reported in `unavailable`.
    """
    made = TrainedConcepts({}, {}, [], folder)
    references = list(references)
    groups = [references[start:start + group_size] for start in range(0, len(references), group_size)]
    # eval under accelerate launch / torchrun (a process group joined): groups spread over the ranks
    process = current_process() if in_process_group() else Process()
    mine = assign([len(group) for group in groups], process.world_size)[process.rank]
    outcome: dict[int, tuple[dict[str, Concept], list[float], dict[str, str]]] = {}

    def make(number: int, train: bool):
        return _make_group(runtime, groups[number], folder, settings, train_group if train else None,
                           settings_digest=settings_digest, negatives_index=negatives_index,
                           negatives_folder=negatives_folder, negatives_digest=negatives_digest,
                           group_size=group_size)

    bar = tqdm(total=sum(len(groups[number]) for number in mine), desc=label, unit="concept",
               disable=not progress)
    for number in mine:
        outcome[number] = make(number, train=True)
        bar.update(len(groups[number]))
    bar.close()
    if len(mine) < len(groups):  # the other ranks' groups, from the cache they wrote
        barrier()
        for number in range(len(groups)):
            if number not in outcome:
                outcome[number] = make(number, train=False)
    for number in range(len(groups)):  # in group order, whoever made them
        concepts, seconds, unavailable = outcome[number]
        made.concepts.update(concepts)
        made.seconds.extend(seconds)
        made.unavailable.update(unavailable)
    return made


def _make_group(runtime, group: Sequence[tuple[str, Path]], folder: Path, settings: NegativeSettings,
                train_group: TrainGroup | None, *, settings_digest: str, negatives_index: str | None,
                negatives_folder: Path | None, negatives_digest: str, group_size: int):
    """One group of `train_in_groups`: its concepts from the cache, or trained and cached
    (`train_group` None: another rank trained them; a member not in the cache is unavailable).
    Returns ({name: concept}, seconds in member order, {name: why unavailable})."""
    concepts_made: dict[str, Concept] = {}
    seconds_made: list[float] = []
    unavailable: dict[str, str] = {}
    positives: dict[str, list] = {}
    for name, reference in group:
        try:
            positives[name] = reference_photos(reference)
        except PlvmError as error:
            unavailable[name] = f"concept could not be made: {error}"
    names = list(positives)
    cached: dict[str, Concept] = {}
    for name in names:
        path = folder / f"{name}.concept"
        try:
            concept = Concept.load(path) if path.is_file() else None
        except PlvmError:
            concept = None  # a damaged cache entry is only trained again
        extra = concept.meta.extra if concept is not None else {}
        if concept is not None and concept.meta.base_model == runtime.backbone.fingerprint \
                and extra.get("positives_sha256") == photos_digest(positives[name]) \
                and extra.get("config_sha256") == settings_digest \
                and extra.get("negatives_sha256") == negatives_digest \
                and extra.get("trained_with", ",".join(names)) == ",".join(names):
            cached[name] = concept.renamed(name)
    if names and len(cached) == len(names):
        for name in names:
            concepts_made[name] = cached[name]
            seconds_made.append(float(cached[name].meta.extra.get("seconds", "nan")))
        return concepts_made, seconds_made, unavailable
    if train_group is None:
        for name in names:
            unavailable[name] = "concept could not be made (by another rank: see its output)"
        return concepts_made, seconds_made, unavailable
    try:
        negatives = {name: gather_negatives(runtime, positives[name], settings, index=negatives_index,
                                            negatives_dir=negatives_folder).photos for name in names}
        run = folder if len(names) == 1 and group_size == 1 else folder / f"group-{names[0]}-{len(names)}"
        concepts, seconds = train_group(names, positives, negatives, run) if names else ({}, {})
    except PlvmError as error:
        for name in names:
            unavailable[name] = f"concept could not be made: {error}"
        return concepts_made, seconds_made, unavailable
    for name in names:
        concepts[name].meta.extra["negatives_sha256"] = negatives_digest  # reused only with this pool
        concepts[name].save(folder / f"{name}.concept")
        concepts_made[name] = concepts[name]
        seconds_made.append(seconds[name])
    return concepts_made, seconds_made, unavailable
