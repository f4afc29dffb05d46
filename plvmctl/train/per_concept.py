"""Yo'LLaVA as a baseline: train one concept's soft prompt on its photos, per concept.

What Yo'LLaVA (arXiv 2406.09400) trains, in plvmctl's concept form
--------------------------------------------------------------------
Yo'LLaVA adds `<sks>` and 16 latent tokens `<token0>`...`<token15>` to the vocabulary and
trains only their input-embedding rows (17) and output-head rows (17), with the prompt
`<sks> is <token0>...<token15>.`. Here the same rows are the three tensors of a `Concept`:

    word     [H]     input embedding of `<name>`          (Yo'LLaVA: embedding row of <sks>)
    context  [k, H]  input embeddings of the k latents    (embedding rows of <token0..15>)
    head     [H]     output-head row of `<name>`          (lm_head row of <sks>)

and the prompt is the one every plvmctl concept uses: `<name> is <t1>...<tk>.`.

Only the word's head row is trained, not the 16 latent tokens' head rows. The latent tokens
never appear in an answer, so their head rows are never a target: their only gradient comes
through the softmax normaliser and just pushes their logits down. The concept table already
gives context ids the lowest logit (they can never be generated), which is where that
training would take them, so nothing the model can say changes.

Why this is peft's TrainableTokens without a vocabulary resize
--------------------------------------------------------------
peft's `TrainableTokens` leaves the embedding and head matrices frozen and substitutes
trainable values for the listed rows. The `ConceptTable` does exactly that for ids above the
vocabulary: the embedding hook returns the concept rows where the ids are virtual
(`torch.where`, real rows untouched) and the head hook appends the concept's head row as one
more logit column. The gradient reaching a concept tensor is therefore the gradient an
extended matrix would give its row: the sum over the positions holding that id (input side),
and hidden-state x (softmax - target) on that column (output side). The 17 + 1 tensors are
plain `nn.Parameter`s outside the model; no model parameter has `requires_grad`, no gradient
mask is needed, no row is "restored after every step", and because the ids are virtual the
tokenizer and the matrices are never resized. The concepts of several Yo'LLaVA runs can
therefore share one question (the original reuses `<token0>` and cannot load two concepts).

Initialisation
--------------
word and every context row start as the input embedding of a generic word (`init_word`,
"person"; the mean of its pieces when the tokenizer splits it, the mean of all rows if it is
unknown), head as that word's head row, each plus Gaussian noise of `init_noise` times the
row's RMS (different noise per row, from the run's seed), so the 17 rows start as "a person"
but are not identical.

Data (per concept, cached in OUT/conversations.json)
----------------------------------------------------
- positives: the 4-10 photos of the concept, `recognition_per_photo` (15) recognition Q&As each
  ("Is <name> in this photo?" phrasings; a "Yes, ..." answer);
- negatives: hard ones (the index's nearest neighbours of the mean CLIP embedding of the
  positives, near-duplicates of the positives removed) and random easy ones; one Q&A each
  with a "No, ..." answer;
- attributes: `attribute_per_photo` (10) text-only Q&As per positive photo. The frozen base
  model answers each question about "the person" with the photo attached; for training the
  question names `<name>`, "the person" in the answer becomes `<name>`, and the prompt has NO
  image, so the attributes must live in the tokens. Answers are kept in the JSON and a rerun
  does not ask again.

Training
--------
Answer-token cross-entropy (`weighted_answer_loss` from the PLVM trainer with every weight 1
by default: Yo'LLaVA has no Yes/No weighting), AdamW lr 1e-3, `epochs` (15) passes over all
conversations in a seeded shuffled order, `batch_size` (4) conversations a step. The vision
features (CLIP tower + projector output) of every training photo are computed once and fed to
LLaVA through its `mm_encoder_outputs` argument, so a step runs only the language model.
Random horizontal flips are optional (`flip`; the flipped photo's features are cached too).
After each epoch past the first `select_after_epoch` (4), the concept scores Yes against No as
the first answer token for the positives and as many negatives; the epoch with the best mean
of the two accuracies is kept (ties: the later epoch, as in Yo'LLaVA's code). When there are
no more epochs than that, the last epoch is scored and kept.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..answers import (
    DESCRIPTION_MAX_NEW_TOKENS,
    DESCRIPTION_PROMPT,
    clean_description,
    parse_yes_no,
    verdict_start,
)
from ..concept import Concept, ConceptMeta, validate_name
from ..concept_index import photos_key, with_key
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
from .aligner import encode_batch, first_token_id, weighted_answer_loss
from .common import JsonlLogger, config_digest, draw_loss_curve, photos_digest
from .data import Sample, neutral_question, question_plan

METHOD = "yollava"
CONVERSATIONS_FILE = "conversations.json"
CONVERSATIONS_FORMAT = "plvmctl.yollava-conversations"
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss.png"
RESULT_FILE = "result.json"
DOWNLOADS_DIR = "downloads"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# "the person" / "this person" in a base-model answer is the concept: it becomes `<name>`.
PERSON_RE = re.compile(r"\b(?:[Tt]he|[Tt]his) person\b")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class YollavaConfig:
    """The recipe's `yollava:` section (`--set yollava.KEY=VALUE`); defaults are Yo'LLaVA's."""

    num_context: int = 16  # latent tokens <t1>...<tk>
    epochs: int = 15
    lr: float = 1e-3
    weight_decay: float = 0.01  # as in Yo'LLaVA's train.py (AdamW, betas 0.9/0.999)
    batch_size: int = 4  # conversations a step (Yo'LLaVA: 1); the loss averages their answer tokens
    yes_no_weight: float = 1.0  # 1 = plain answer cross-entropy (Yo'LLaVA); PLVM uses 20
    recognition_per_photo: int = 15
    attribute_per_photo: int = 10
    hard_negatives: int = 150  # nearest neighbours of the positives' mean embedding
    random_negatives: int = 100  # easy negatives drawn at random
    exclude_threshold: float = 0.95  # cosine above which a neighbour is a near-duplicate
    init_word: str = "person"
    init_noise: float = 0.1  # noise std as a fraction of the initial row's RMS
    select_after_epoch: int = 4  # best-epoch selection scores the epochs after this many
    selection_negatives: int = 0  # negatives scored for selection (0: as many as positives)
    cache_features: bool = True
    flip: bool = False  # random horizontal flip of photos (features of both sides cached)
    attribute_max_new_tokens: int = 32
    # A base model that compares before its verdict ("left red hair red same ... match. Yes,
    # ..."; the pocket model) is not given plain "Yes"/"No" recognition conversations: they
    # would teach the concept to skip the comparison it needs. Its recognition rows carry the
    # base model's own reasoning instead (`reasoned_recognition_samples`), and epochs are
    # scored by the verdict of generated answers (at most `reasoning_max_new_tokens`), as
    # `plvmctl eval` reads them.
    reasoning_base: bool = False
    reasoning_max_new_tokens: int = 64
    seed: int = 0
    out: str = "runs/yollava"  # OUT/<name>/ holds conversations, log, curve, result
    index: str | None = None  # used by `plvmctl eval --method yollava` for hard negatives
    negatives_dir: str | None = None  # ditto: local negative photos

    SECTION = "yollava"  # the recipe section, named in messages (a subclass says its own)

    def validate(self) -> None:
        """PlvmError naming the first bad value."""
        section = self.SECTION
        positive_ints = ("num_context", "epochs", "batch_size", "attribute_max_new_tokens", "reasoning_max_new_tokens")
        for key in positive_ints:
            if getattr(self, key) < 1:
                raise PlvmError(f"{section}.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("recognition_per_photo", "attribute_per_photo", "hard_negatives",
                    "random_negatives", "select_after_epoch", "selection_negatives"):
            if getattr(self, key) < 0:
                raise PlvmError(f"{section}.{key} must be 0 or more, got {getattr(self, key)}")
        if self.lr <= 0:
            raise PlvmError(f"{section}.lr must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.init_noise < 0 or self.yes_no_weight <= 0:
            raise PlvmError(f"{section}.weight_decay and init_noise must be >= 0, yes_no_weight > 0")
        if not -1.0 <= self.exclude_threshold <= 1.0:
            raise PlvmError(f"{section}.exclude_threshold is a cosine in [-1, 1], got {self.exclude_threshold}")


# --------------------------------------------------------------------------------------------
# Photos and negatives
# --------------------------------------------------------------------------------------------


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
    """A retrieval `Hit` as one dict: its metadata (path, url, caption ...) plus `id`."""
    return {**dict(getattr(hit, "metadata", {}) or {}), "id": hit.id}


def gather_negatives(runtime, positives: Sequence[Path], config: YollavaConfig, *,
                     index: str | os.PathLike | None = None,
                     negatives_dir: str | os.PathLike | None = None, download: bool = False,
                     download_dir: Path | None = None,
                     echo: Callable[[str], None] | None = None) -> Negatives:
    """Hard + easy negatives from an index, or random ones from `negatives_dir` alone.

    With an index (built by `plvmctl index build` from the backbone's `embed_images`): the
    positives are embedded the same way, `retrieval.hard_negatives` gives the
    `hard_negatives` nearest neighbours of their mean embedding (hits with cosine >=
    `exclude_threshold` to a positive left out as near-duplicates of it) and
    `retrieval.random_negatives` `random_negatives` other rows at random (near-duplicates of a
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

    from .. import retrieval

    opened = retrieval.open_index(index)
    embeddings = runtime.backbone.embed_images([load_image(p) for p in positives]).cpu().numpy()
    if embeddings.shape[1] != opened.info.dim:
        raise PlvmError(f"index {index} holds {opened.info.dim}-d vectors but this model's image "
                        f"embeddings are {embeddings.shape[1]}-d: build the index with the same "
                        f"model (`plvmctl --recipe R index build`)")
    hard_hits = []
    if config.hard_negatives:
        hard_hits = retrieval.hard_negatives(opened, embeddings, config.hard_negatives,
                                             config.exclude_threshold)
    taken = [hit.id for hit in hard_hits]
    count = min(config.random_negatives, opened.info.count - len(taken))
    easy_hits = retrieval.random_negatives(opened, max(0, count), seed=config.seed, exclude_ids=taken)
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
                                 config: YollavaConfig, *, progress: bool = False) -> list[Sample]:
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
                        config: YollavaConfig, cache_file: Path | None, *,
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
# The trainer
# --------------------------------------------------------------------------------------------


def noisy_rows(row: torch.Tensor, count: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`count` copies of `row` [H], each plus Gaussian noise of `noise` times the row's RMS."""
    rms = row.pow(2).mean().sqrt()
    return row.unsqueeze(0) + torch.randn((count, row.shape[0]), generator=generator) * noise * rms


def initial_rows(backbone, word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding, head row) of `word`: the mean over its pieces, float32 on CPU.

    Falls back to the mean of all rows when the tokenizer knows none of it.
    """
    embedding = backbone.model.get_input_embeddings().weight.detach().float()
    head = backbone.model.get_output_embeddings().weight.detach().float()
    tokenizer = backbone.tokenizer
    # no leading space: sentencepiece tokenizers add their own ("▁person"), and a bare "▁"
    # piece would only dilute the mean
    ids = [i for i in tokenizer(word.strip(), add_special_tokens=False)["input_ids"]
           if i != tokenizer.unk_token_id and i < embedding.shape[0]]
    if not ids:
        return embedding.mean(0).cpu(), head.mean(0).cpu()
    return embedding[ids].mean(0).cpu(), head[ids].mean(0).cpu()


class YollavaTrainer:
    """The trainable concept tensors of one Yo'LLaVA concept and a step over a batch.

    `word`, `head` and `context` are `nn.Parameter`s (float32, on the model's device); the
    model is frozen and never changes. Features of photos are cached by (path, flipped).
    """

    def __init__(self, runtime, name: str, config: YollavaConfig) -> None:
        validate_name(name)
        config.validate()
        self.runtime = runtime
        self.backbone = runtime.backbone
        self.backbone.freeze()
        self.name = name
        self.config = config
        device = self.backbone.device
        self.features: dict[tuple[str, bool], torch.Tensor] = {}
        word, head, context = self.initial_tensors()
        self.word = torch.nn.Parameter(word.to(device))
        self.head = torch.nn.Parameter(head.to(device))
        self.context = torch.nn.Parameter(context.to(device))
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        prefix = runtime.template.answer_prefix
        self._yes_no = (first_token_id(self.backbone, prefix + "Yes"), first_token_id(self.backbone, prefix + "No"))

    def initial_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(word [H], head [H], context [k, H]) to start from: `init_word`'s rows plus noise."""
        word, head = initial_rows(self.backbone, self.config.init_word)
        generator = torch.Generator().manual_seed(self.config.seed)
        return (noisy_rows(word, 1, self.config.init_noise, generator)[0],
                noisy_rows(head, 1, self.config.init_noise, generator)[0],
                noisy_rows(word, self.config.num_context, self.config.init_noise, generator))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.word, self.head, self.context]

    def current(self, name: str) -> Concept:
        """The concept `name` with the live tensors (gradients flow through it)."""
        return Concept(name, self.word, self.head, self.context)

    def concept(self, meta: ConceptMeta | None = None) -> Concept:
        """The current tensors as a Concept (detached copies, float32 on the CPU)."""
        return Concept(self.name, self.word.detach().float().cpu().clone(),
                       self.head.detach().float().cpu().clone(),
                       self.context.detach().float().cpu().clone(), meta or ConceptMeta(method=METHOD))

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"word": self.word.detach().clone(), "head": self.head.detach().clone(),
                "context": self.context.detach().clone()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.word.copy_(state["word"])
            self.head.copy_(state["head"])
            self.context.copy_(state["context"])

    # -- vision features ------------------------------------------------------------------
    @staticmethod
    def _image(photo: Path, flipped: bool):
        image = load_image(photo)
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image

    @torch.no_grad()
    def _compute_features(self, images: list) -> list[torch.Tensor]:
        """Vision tower + projector output of each image ([N, H] each), as the model computes it."""
        return self.backbone.image_features(images)

    def cache_features(self, photos: Sequence[Path], *, flips: Sequence[bool] = (False,),
                       chunk: int = 16, progress: bool = False) -> int:
        """Compute the features of every (photo, side) not cached yet; returns how many."""
        todo = [(str(p), f) for p in dict.fromkeys(Path(p) for p in photos) for f in flips
                if (str(p), f) not in self.features]
        bar = tqdm(total=len(todo), desc="vision features", unit="img", disable=not progress or not todo)
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            computed = self._compute_features([self._image(Path(p), f) for p, f in part])
            for key, features in zip(part, computed):
                self.features[key] = features
            bar.update(len(part))
        bar.close()
        return len(todo)

    # -- forward ----------------------------------------------------------------------------
    def _table(self, names: Sequence[str] | None = None):
        """The concept table of `names` (a batch's, in its order), with the live tensors."""
        from ..table import ConceptTable

        concepts = [self.current(name) for name in (names or [self.name])]
        return ConceptTable(concepts, self.backbone.vocab_size, device=self.backbone.device,
                            dtype=self.backbone.dtype)

    def logits(self, samples: Sequence[Sample], *, cached: bool = True,
               flips: Sequence[bool] | None = None, with_answers: bool = True):
        """(EncodedBatch, logits [B, T, V + 1 + k]) of `samples` with the current tensors.

        `cached` feeds the cached vision features (computed on first need) through LLaVA's
        `mm_encoder_outputs`; otherwise pixel values go through the vision tower as usual.
        `flips`, one per photo row, mirrors those photos.
        """
        batch = encode_batch(samples, self.backbone, self.runtime.template, self.config.num_context,
                             yes_no_weight=self.config.yes_no_weight, with_answers=with_answers)
        device = self.backbone.device
        inputs: dict[str, Any] = {"input_ids": batch.input_ids.to(device),
                                  "attention_mask": batch.attention_mask.to(device),
                                  "use_cache": False}
        if batch.photos:
            sides = list(flips) if flips is not None else [False] * len(batch.photos)
            if cached:
                missing = [(p, f) for p, f in zip(batch.photos, sides) if (str(p), f) not in self.features]
                for photo, side in missing:
                    self.cache_features([photo], flips=(side,))
                features = [self.features[(str(p), f)] for p, f in zip(batch.photos, sides)]
                inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
            else:
                images = [self._image(p, f) for p, f in zip(batch.photos, sides)]
                inputs.update(self.backbone.image_inputs(images))
        with self._table(batch.names).active(self.backbone.model):
            logits = self.backbone.model(**inputs).logits
        return batch, logits

    def loss(self, samples: Sequence[Sample], *, cached: bool = True,
             flips: Sequence[bool] | None = None) -> torch.Tensor:
        """Mean answer-token cross-entropy of `samples` (Yes/No token weighted by yes_no_weight)."""
        batch, logits = self.logits(samples, cached=cached, flips=flips)
        device = logits.device
        return weighted_answer_loss(logits[:, :-1], batch.labels[:, 1:].to(device),
                                    batch.weights[:, 1:].to(device))

    def step(self, samples: Sequence[Sample], *, cached: bool = True,
             flips: Sequence[bool] | None = None) -> float:
        """One AdamW step on `samples`; returns the loss before the step."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(samples, cached=cached, flips=flips)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def recognition_accuracy(self, positives: Sequence[Path], negatives: Sequence[Path], *,
                             cached: bool = True, name: str | None = None) -> dict[str, float]:
        """Yes-vs-No as the first answer token to "Is <name> in this photo?" (the verdict of
        the generated answer with `reasoning_base`): accuracy on `positives`, on `negatives`
        and their mean (NaN parts when a list is empty). `name`: which concept (default: this
        trainer's)."""
        name = name or self.name
        question = fill(RECOGNITION_QUESTIONS[0], name)
        if self.config.reasoning_base:
            return self._generated_accuracy(question, positives, negatives, name)
        rows = [Sample(name, "positive", question, "", Path(p)) for p in positives]
        rows += [Sample(name, "negative", question, "", Path(p)) for p in negatives]
        yes, no = self._yes_no
        correct = {"positive": 0, "negative": 0}
        total = {"positive": 0, "negative": 0}
        size = max(1, self.config.batch_size)
        for start in range(0, len(rows), size):
            chunk = rows[start:start + size]
            batch, logits = self.logits(chunk, cached=cached, with_answers=False)
            for row, sample in enumerate(chunk):
                last = logits[row, batch.prompt_lengths[row] - 1].float()
                says_yes = bool(last[yes] > last[no])
                total[sample.kind] += 1
                correct[sample.kind] += int(says_yes == (sample.kind == "positive"))
        nan = float("nan")
        positive = correct["positive"] / total["positive"] if total["positive"] else nan
        negative = correct["negative"] / total["negative"] if total["negative"] else nan
        return {"positive": positive, "negative": negative, "mean": (positive + negative) / 2}


    @torch.no_grad()
    def _generated_accuracy(self, question: str, positives: Sequence[Path],
                            negatives: Sequence[Path], name: str) -> dict[str, float]:
        from ..engine import AskRequest, Engine

        photos = [Path(p) for p in list(positives) + list(negatives)]
        live = self.current(name)
        concept = Concept(name, live.word.detach(), live.head.detach(), live.context.detach())
        results = Engine(self.runtime, {name: concept}).ask(
            [AskRequest(question, photo) for photo in photos], batch_size=max(1, self.config.batch_size),
            max_new_tokens=self.config.reasoning_max_new_tokens)
        said = [parse_yes_no(result.answer) for result in results]
        nan = float("nan")
        positive = sum(s == "yes" for s in said[:len(positives)]) / len(positives) if positives else nan
        negative = sum(s == "no" for s in said[len(positives):]) / len(negatives) if negatives else nan
        return {"positive": positive, "negative": negative, "mean": (positive + negative) / 2}


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


@dataclass
class YollavaResult:
    """What `train_yollava` made and measured."""

    concept: Concept
    out: Path
    losses: list[float]  # every step's loss
    epochs: list[dict[str, Any]]  # per epoch: mean loss, and accuracy when scored
    best_epoch: int
    best_accuracy: dict[str, float] | None
    seconds: dict[str, float]  # conversations, features, training, total
    counts: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"name": self.concept.name, "out": str(self.out), "best_epoch": self.best_epoch,
                "best_accuracy": self.best_accuracy, "epochs": self.epochs,
                "seconds": self.seconds, "counts": self.counts,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def _spread(items: Sequence[Path], count: int) -> list[Path]:
    """`count` items spread evenly over `items` (all of them if there are fewer)."""
    if count >= len(items):
        return list(items)
    return [items[(i * len(items)) // count] for i in range(count)]




def train_epochs(trainer: "YollavaTrainer", samples: Sequence[Sample], config: YollavaConfig, log_path: Path, *,
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


def train_yollava(runtime, name: str, positives: Sequence[Path], negatives: Sequence[Path],
                  config: YollavaConfig, out_dir: str | os.PathLike, *, progress: bool = False,
                  echo: Callable[[str], None] | None = None) -> YollavaResult:
    """Build the conversations, train the concept, keep the best epoch; writes into `out_dir`
    conversations.json, log.jsonl (one row per step and per epoch), loss.png, result.json.

    The returned concept carries ConceptMeta(method="yollava", base_model=fingerprint).
    """
    config.validate()
    validate_name(name)
    positives = [Path(p) for p in positives]
    negatives = [Path(p) for p in negatives]
    if not positives:
        raise PlvmError(f"Yo'LLaVA needs positive photos of <{name}> (4-10 recommended), got none")
    if not negatives:
        raise PlvmError(f"Yo'LLaVA needs negative photos for <{name}>, got none")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda message: None)
    started = time.perf_counter()

    conversations = build_conversations(runtime, name, positives, negatives, config,
                                        out / CONVERSATIONS_FILE, progress=progress)
    samples = conversations.samples
    seconds_conversations = time.perf_counter() - started
    say(f"<{name}>: {len(samples)} conversations {conversations.counts()} "
        f"({conversations.asked} attribute answers asked, {conversations.reused} reused)")

    trainer = YollavaTrainer(runtime, name, config)
    sides = (False, True) if config.flip else (False,)
    feature_start = time.perf_counter()
    if config.cache_features:
        trainer.cache_features(positives + negatives, flips=sides, progress=progress)
    seconds_features = time.perf_counter() - feature_start

    selection_negatives = _spread(negatives, config.selection_negatives or len(positives))

    def score() -> tuple[dict[str, float], float]:
        accuracy = trainer.recognition_accuracy(positives, selection_negatives, cached=config.cache_features)
        return accuracy, accuracy["mean"]

    train_start = time.perf_counter()
    losses, epochs, best_epoch, best_accuracy = train_epochs(
        trainer, samples, config, out / LOG_FILE, order_seed=f"yollava-order-{config.seed}",
        label=f"yollava <{name}>", score=score, progress=progress)
    seconds_training = time.perf_counter() - train_start
    seconds = {"conversations": seconds_conversations, "features": seconds_features,
               "training": seconds_training, "total": time.perf_counter() - started}
    counts = {**conversations.counts(), "positive_photos": len(positives),
              "negative_photos": len(negatives), "steps": len(losses)}
    meta = ConceptMeta(
        method=METHOD, base_model=runtime.backbone.fingerprint, base_model_name=runtime.backbone.name,
        reference_sha256=sha256_file(positives[0]), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        extra={"positives": str(len(positives)), "positives_sha256": photos_digest(positives),
               "negatives": str(len(negatives)), "epochs": str(config.epochs),
               "best_epoch": str(best_epoch), "train_accuracy": json.dumps(best_accuracy),
               "seconds": f"{seconds['total']:.6f}", "init_word": config.init_word,
               "config_sha256": config_digest(config)},
    )
    concept = trainer.concept(meta)
    # its retrieval key: the normalised mean of its photos' normalised CLS vectors
    concept = with_key(concept, photos_key(runtime, [load_image(p) for p in positives]),
                       runtime.encoder_fingerprint, len(positives), positives[0])
    if losses:
        draw_loss_curve(range(1, len(losses) + 1), losses, out / CURVE_FILE,
                        title=f"Yo'LLaVA <{name}> loss")
    result = YollavaResult(concept, out, losses, epochs, best_epoch, best_accuracy, seconds, counts)
    write_json_atomic(out / RESULT_FILE, {**result.summary(), "config": asdict(config)})
    return result


def reference_photos(reference: Path) -> list[Path]:
    """The photos of one evaluation identity: every `ref_img*` beside `reference` (it first)."""
    reference = Path(reference)
    siblings = [p for p in list_photos(reference.parent) if p.name.startswith("ref_img") and p != reference]
    return [reference] + siblings

