"""MyVLM as a method: train one concept's head and its concept embedding, the model frozen.

What MyVLM (Alaluf et al., ECCV 2024) does, in plvmctl's concept form
---------------------------------------------------------------------
1. A concept head decides whether the concept is in a photo (concept_head.py): a
   linear classifier on frozen image features, trained on the concept's photos against
   negatives (AdamW, lr 1e-3, 500 steps), or, as MyVLM does for people with a face-recognition
   network, the nearest of the positives' own features with a cosine threshold.
2. When the head fires, one concept embedding, a vector in the projector's output space (the
   LM's hidden size), is appended to the photo's visual tokens. It is trained (~100 steps) on
   rows that name the concept, with an L2 penalty on the attention the LM pays to it, so that
   it does not drown the rest of the prompt (paper: λ ≈ 0.0075 for captioning, 10 for VQA).

Here the embedding is the concept's `visual` row; the engine places it right after the image
tokens of every row whose photo fires the head (engine.py). The concept's `word` and `head`
rows (the `<name>` token, read and said) are trained with it, initialised as `init_word`
("person") plus a little noise, as Yo'LLaVA's are; by default it has no context tokens
(k = 0: no "<name> is ..." sentence), so without a photo, or when the head does not fire, a
MyVLM concept is only its name, as in MyVLM.

The head
--------
Features (`features`: `encoder` = the reference encoder's CLS, `vision` = the backbone's vision
tower pooled) of the positives (and, with `flip`, their mirror images) and of the negatives,
L2-normalised. A share `holdout` of the positive photos (at least one when there are two or
more) and of the negatives is held out; the linear head is trained on the rest (centred and
scaled features, folded back into one weight and bias; the positive class weighted by
negatives / positives) on whole photos; the threshold is the one with the best mean of
positive and negative accuracy on the held-out photos (the middle one of equally good
thresholds), each photo scored as the head scores it when asked: with `crops: windows` (the
default) by its best crop, the whole photo or a window (concept_head.py), so a stranger's
window that looks like the concept counts against a threshold. With a single
positive photo nothing can be held out and the threshold is chosen on the training photos
(the concept's metadata says which). A fixed `threshold` skips the choice.

The embedding
-------------
Rows (each with `<name>` in the question):
- `recognition_per_photo` recognition Q&As per positive photo, the embedding injected, a
  "Yes, ..." answer;
- `qa_per_photo` questions per positive photo (a caption question first, then attribute
  questions) that the frozen base model answers about "the person" with the photo attached;
  "the person" in the answer becomes `<name>`; the embedding injected;
- one recognition Q&A per negative photo (at most `negative_rows`, default as many as the
  positive recognition rows), NOT injected (the head would not fire), a "No, ..." answer.
Loss: answer-token cross-entropy + λ (`attention_weight`) × the attention the LM pays to the
embedding: for each injected row, Σ over the later query positions of the attention weight on
the embedding's position, squared, averaged over layers and heads, then over rows. The
attention weights need the eager attention implementation: it is switched on for the run
and restored after. AdamW (`lr` 1e-3), `embedding_steps` steps of `batch_size` rows. The
embedding starts as the mean projected visual token of the positive photos. Vision features
are computed once per photo and fed to LLaVA through `mm_encoder_outputs`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...concept import Concept, ConceptMeta, validate_name
from ...concept_index import photos_key, with_key
from ...data.templates import ATTRIBUTE_QUESTIONS, NEGATIVE_ANSWERS, POSITIVE_ANSWERS, RECOGNITION_QUESTIONS, fill
from ...errors import PlvmError
from ...fileio import sha256_file, write_json_atomic
from ...images import load_image
from ...photo_crops import CROPS, FEATURES, CropFeatures, crop_features
from ...prompt import build_prompt, encode_segments, insert_after_image, split_names
from ...table import ConceptTable
from ...train.common import JsonlLogger, config_digest, draw_loss_curve, photos_digest
from ...train.data import neutral_question, question_plan
from ...train.per_concept import name_answer
from ...train.soft_prompt import initial_rows
from .concept_head import KINDS, ConceptHead

METHOD = "myvlm"
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss.png"
RESULT_FILE = "result.json"
CAPTION_QUESTION = "Describe <sks> in this photo."
IGNORE = -100


@dataclass
class MyvlmConfig:
    """The recipe's `myvlm:` section (`--set myvlm.KEY=VALUE`); defaults are MyVLM's."""

    head: str = "linear"  # linear | nearest (no head trained: nearest positive features)
    features: str = "encoder"  # encoder (reference encoder CLS) | vision (backbone tower, pooled)
    crops: str = "windows"  # windows (the whole photo and a grid of windows, best one) | whole
    head_steps: int = 500
    head_lr: float = 1e-3
    head_weight_decay: float = 0.01
    holdout: float = 0.25  # share of the photos held out to choose the threshold
    threshold: float | None = None  # fixed threshold (a cosine for `nearest`); None: chosen
    flip: bool = True  # mirror images of the positives are positives too (the head only)
    embedding_steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 4
    attention_weight: float = 0.0075  # λ of the attention penalty (paper: 0.0075 captions, 10 VQA)
    num_context: int = 0  # context tokens <name> is <t1>...<tk> (MyVLM: none)
    recognition_per_photo: int = 4
    qa_per_photo: int = 2
    qa_max_new_tokens: int = 32
    negative_rows: int = 0  # "No" rows from negatives (0: as many as positive recognition rows)
    init_word: str = "person"
    init_noise: float = 0.1
    hard_negatives: int = 150  # with --index: nearest neighbours of the positives' mean embedding
    random_negatives: int = 100  # random negatives (from the index or the --negatives folder)
    exclude_threshold: float = 0.95  # cosine above which an index hit is a copy of a positive
    seed: int = 0
    out: str = "runs/myvlm"  # OUT/<name>/ holds log.jsonl, loss.png, result.json
    index: str | None = None  # used by `plvmctl eval --method myvlm` for hard negatives
    negatives_dir: str | None = None  # ditto: local negative photos

    def validate(self) -> None:
        """PlvmError naming the first bad value."""
        if self.head not in KINDS:
            raise PlvmError(f"myvlm.head must be one of {', '.join(KINDS)}, got {self.head!r}")
        if self.crops not in CROPS:
            raise PlvmError(f"myvlm.crops must be one of {', '.join(CROPS)}, got {self.crops!r}")
        if self.features not in FEATURES:
            raise PlvmError(f"myvlm.features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        for key in ("head_steps", "embedding_steps", "batch_size", "qa_max_new_tokens"):
            if getattr(self, key) < 1:
                raise PlvmError(f"myvlm.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("num_context", "recognition_per_photo", "qa_per_photo", "negative_rows",
                    "hard_negatives", "random_negatives"):
            if getattr(self, key) < 0:
                raise PlvmError(f"myvlm.{key} must be 0 or more, got {getattr(self, key)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise PlvmError("myvlm.lr and myvlm.head_lr must be positive")
        if min(self.weight_decay, self.head_weight_decay, self.attention_weight, self.init_noise) < 0:
            raise PlvmError("myvlm.weight_decay, head_weight_decay, attention_weight and init_noise must be >= 0")
        if not 0 <= self.holdout < 1:
            raise PlvmError(f"myvlm.holdout is a share in [0, 1), got {self.holdout}")
        if not -1.0 <= self.exclude_threshold <= 1.0:
            raise PlvmError(f"myvlm.exclude_threshold is a cosine in [-1, 1], got {self.exclude_threshold}")



# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------


def readable_photos(paths: Sequence[Path]) -> tuple[dict[Path, Image.Image], list[str]]:
    """The photos that open ({path: image}, in order) and "path: reason" for those that do not."""
    images: dict[Path, Image.Image] = {}
    skipped: list[str] = []
    for path in dict.fromkeys(Path(p) for p in paths):
        try:
            images[path] = load_image(path)
        except PlvmError as error:
            skipped.append(str(error))
    return images, skipped


def _mirror(image: Image.Image) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


# --------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------


def split_holdout(count: int, share: float, seed: str) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of `count` items: round(share × count) held out, at least
    one when there are two or more items and share > 0, never all of them."""
    held = 0
    if count >= 2 and share > 0:
        held = min(count - 1, max(1, round(share * count)))
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return sorted(order[held:]), sorted(order[:held])


def choose_threshold(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The threshold t (fire when score >= t) with the best mean of positive accuracy
    (score >= t) and negative accuracy (score < t); candidates are midpoints between
    neighbouring scores and one step beyond either end; ties take the middle candidate."""
    if not positive or not negative:
        raise PlvmError("choosing a threshold needs positive and negative scores")
    values = sorted(set(float(v) for v in list(positive) + list(negative)))
    step = (values[-1] - values[0]) or 1.0
    candidates = [values[0] - step] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + step]

    def balanced(t: float) -> float:
        hits = sum(v >= t for v in positive) / len(positive)
        rejections = sum(v < t for v in negative) / len(negative)
        return (hits + rejections) / 2

    scored = [balanced(t) for t in candidates]
    best = max(scored)
    tied = [t for t, s in zip(candidates, scored) if s == best]
    return tied[len(tied) // 2]


def train_linear_head(positive: torch.Tensor, negative: torch.Tensor, *, steps: int, lr: float,
                      weight_decay: float) -> tuple[torch.Tensor, float, list[float]]:
    """(weight [D], bias, losses) of a linear classifier: positives vs negatives.

    The features are centred and scaled (mean feature norm √D) for training; that is folded
    back, so the returned head reads the features as given: score = weight·f + bias.
    """
    features = torch.cat([positive, negative]).float()
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])
    dim = features.shape[1]
    mean = features.mean(0)
    scale = math.sqrt(dim) / float((features - mean).norm(dim=1).mean().clamp(min=1e-8))
    inputs = (features - mean) * scale
    layer = torch.nn.Linear(dim, 1)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(len(negative) / len(positive)))
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(layer(inputs).squeeze(-1), labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    weight = layer.weight.detach()[0] * scale
    bias = float(layer.bias.detach()[0]) - float(weight @ mean)
    return weight, bias, losses


@dataclass
class HeadReport:
    """How the head was made and how it did on the photos it was chosen with."""

    kind: str
    features: str
    threshold: float
    threshold_from: str  # "held-out photos" | "training photos" | "fixed"
    train_positive: int
    train_negative: int
    held_positive: int
    held_negative: int
    accuracy: dict[str, float]  # positive / negative / mean on the held-out (else training) photos
    losses: list[float] = field(default_factory=list)


def _rates(head_scores_pos: torch.Tensor, head_scores_neg: torch.Tensor, threshold: float) -> dict[str, float]:
    nan = float("nan")
    positive = float((head_scores_pos >= threshold).float().mean()) if len(head_scores_pos) else nan
    negative = float((head_scores_neg < threshold).float().mean()) if len(head_scores_neg) else nan
    return {"positive": positive, "negative": negative, "mean": (positive + negative) / 2}


def fit_concept_head(runtime, positives: Sequence[Image.Image], negatives: Sequence[Image.Image],
                     config: MyvlmConfig) -> tuple[ConceptHead, HeadReport]:
    """The concept head of `positives` against `negatives` (see the module docstring)."""
    if not positives:
        raise PlvmError("the concept head needs at least one positive photo")
    if not negatives and config.head == "linear":
        raise PlvmError("a linear concept head needs negative photos (pass --negatives DIR or "
                        "--index INDEX), or use --head nearest with a threshold")
    if not negatives and config.threshold is None:
        raise PlvmError("a nearest-features head without negatives needs a fixed threshold "
                        "(--set myvlm.threshold=COSINE)")
    sides = [list(positives)] + ([[_mirror(image) for image in positives]] if config.flip else [])
    # each photo's crops as the head will see them at ask time (the whole photo first)
    pos_crops = [crop_features(runtime, images, config.features, config.crops) for images in sides]
    neg_crops = crop_features(runtime, list(negatives), config.features, config.crops) if negatives else []
    pos_whole = [torch.stack([photo.whole for photo in side]) for side in pos_crops]  # each [P, D]
    train_p, held_p = split_holdout(len(positives), config.holdout, f"myvlm-positives-{config.seed}")
    train_n, held_n = split_holdout(len(negatives), config.holdout, f"myvlm-negatives-{config.seed}")

    def rows(indices: list[int]) -> torch.Tensor:  # a photo and its mirror image stay together
        return torch.cat([side[indices] for side in pos_whole])

    def positive_photos(indices: list[int]) -> list[CropFeatures]:
        return [side[i] for side in pos_crops for i in indices]

    def negative_photos(indices: list[int]) -> list[CropFeatures]:
        return [neg_crops[i] for i in indices]

    if config.head == "linear":
        # trained on whole photos (a window of a portrait may show only a shoulder; with the
        # negatives' windows as negatives the head learns that any close-up is "no", and on
        # the pocket model fired on 15 % of the positive scenes instead of 35 %); the
        # threshold below sees every crop of the held-out photos, so a stranger's window counts
        train_neg = torch.stack([photo.whole for photo in negative_photos(train_n)])
        weight, bias, losses = train_linear_head(rows(train_p), train_neg, steps=config.head_steps,
                                                 lr=config.head_lr, weight_decay=config.head_weight_decay)
        head = ConceptHead("linear", config.features, 0.0, weight=weight, bias=bias, crops=config.crops)
    else:
        losses = []
        head = ConceptHead("nearest", config.features, 0.0, references=rows(train_p), crops=config.crops)
        held_n = list(range(len(negatives)))  # nothing was fitted to the negatives: all are held out

    def scored(photos: list[CropFeatures]) -> torch.Tensor:  # each photo's best crop
        return head.best(photos)[0]

    if config.threshold is not None:
        threshold, source = float(config.threshold), "fixed"
        scored_pos = scored(positive_photos(held_p or train_p))
        scored_neg = scored(negative_photos(held_n or train_n))
    elif held_p and held_n:
        scored_pos, scored_neg = scored(positive_photos(held_p)), scored(negative_photos(held_n))
        threshold, source = choose_threshold(scored_pos.tolist(), scored_neg.tolist()), "held-out photos"
    else:
        scored_pos = scored(positive_photos(train_p))
        scored_neg = scored(negative_photos(train_n or held_n))
        threshold, source = choose_threshold(scored_pos.tolist(), scored_neg.tolist()), "training photos"
    head.threshold = threshold
    if head.kind == "nearest":  # every positive photo becomes a reference
        head.references = rows(list(range(len(positives))))
    report = HeadReport(head.kind, head.features, threshold, source, len(train_p), len(train_n),
                        len(held_p), len(held_n), _rates(scored_pos, scored_neg, threshold), losses)
    return head, report


# --------------------------------------------------------------------------------------------
# Rows that train the embedding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One training row: a question naming the concept, its answer, the photo, and whether
    the concept embedding is injected after the photo's image tokens."""

    kind: str  # positive | qa | negative
    question: str
    answer: str
    photo: Path | None
    inject: bool


def qa_plan(photos: Sequence[Path], per_photo: int, seed: int) -> list[tuple[Path, str]]:
    """(photo, question template with `<sks>`): the caption question first, then attributes."""
    return question_plan(photos, ATTRIBUTE_QUESTIONS, per_photo, f"myvlm-qa-{seed}", first=[CAPTION_QUESTION])


def build_rows(runtime, name: str, positives: Sequence[Path], negatives: Sequence[Path],
               config: MyvlmConfig, *, progress: bool = False) -> list[Row]:
    """Recognition rows (positives injected, negatives not) and base-model QA rows."""
    from ...engine import AskRequest, Engine

    rng = random.Random(f"myvlm-rows-{config.seed}")
    rows: list[Row] = []
    for photo in positives:
        questions = list(RECOGNITION_QUESTIONS)
        rng.shuffle(questions)
        for number in range(config.recognition_per_photo):
            rows.append(Row("positive", fill(questions[number % len(questions)], name),
                            fill(rng.choice(POSITIVE_ANSWERS), name), photo, True))
    plan = qa_plan(positives, config.qa_per_photo, config.seed)
    if plan:
        requests = [AskRequest(neutral_question(fill(question, name)), photo) for photo, question in plan]
        results = Engine(runtime, {}).ask(requests, max_new_tokens=config.qa_max_new_tokens, progress=progress)
        for (photo, question), result in zip(plan, results):
            if not result.ok:
                raise PlvmError(f"the base model could not answer {question!r} about {photo}: {result.error}")
            answer = name_answer(result.answer or "", name)
            if answer:  # an empty answer teaches nothing
                rows.append(Row("qa", fill(question, name), answer, photo, True))
    wanted = config.negative_rows or len(positives) * config.recognition_per_photo
    chosen = list(negatives) if wanted >= len(negatives) else \
        [negatives[(i * len(negatives)) // wanted] for i in range(wanted)]
    for photo in chosen:
        rows.append(Row("negative", fill(rng.choice(RECOGNITION_QUESTIONS), name),
                        fill(rng.choice(NEGATIVE_ANSWERS), name), photo, False))
    return rows


# --------------------------------------------------------------------------------------------
# The embedding trainer
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def eager_attention(model: torch.nn.Module, wanted: bool = True):
    """Run `model` with the eager attention implementation (it returns attention weights)."""
    previous = model.config._attn_implementation
    if not wanted or previous == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


class EmbeddingTrainer:
    """The trainable tensors of one MyVLM concept (word, head row, k context rows, the concept
    embedding) and a step over rows; the model is frozen and never changes."""

    def __init__(self, runtime, name: str, config: MyvlmConfig, images: dict[Path, Image.Image]) -> None:
        validate_name(name)
        self.runtime = runtime
        self.backbone = runtime.backbone.freeze()
        self.name = name
        self.config = config
        self.images = images
        self.vision: dict[Path, torch.Tensor] = {}
        device = self.backbone.device
        word, head = initial_rows(self.backbone, config.init_word)
        generator = torch.Generator().manual_seed(config.seed)

        def noisy(row: torch.Tensor, count: int) -> torch.Tensor:
            rms = row.pow(2).mean().sqrt()
            return row.unsqueeze(0) + torch.randn((count, row.shape[0]), generator=generator) * config.init_noise * rms

        self.word = torch.nn.Parameter(noisy(word, 1)[0].to(device))
        self.head = torch.nn.Parameter(noisy(head, 1)[0].to(device))
        self.context = torch.nn.Parameter(noisy(word, config.num_context).to(device))
        self.embedding = torch.nn.Parameter(torch.zeros(1, self.backbone.hidden_size, device=device))
        self.optimizer: torch.optim.Optimizer | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.word, self.head, self.context, self.embedding]

    def start_embedding(self, photos: Sequence[Path]) -> None:
        """The embedding starts as the mean projected visual token of `photos`."""
        tokens = torch.cat([self.visual_tokens(photo) for photo in photos]).float()
        with torch.no_grad():
            self.embedding.copy_(tokens.mean(0, keepdim=True))
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=self.config.lr,
                                           weight_decay=self.config.weight_decay)

    @torch.no_grad()
    def visual_tokens(self, photo: Path) -> torch.Tensor:
        """The photo's image tokens as the LM reads them (vision tower + projector), cached."""
        if photo not in self.vision:
            pixels = self.backbone.pixel_values([self.images[photo]])
            output = self.backbone.model.model.get_image_features(pixel_values=pixels)
            self.vision[photo] = output.pooler_output[0].detach()
        return self.vision[photo]

    def table(self) -> ConceptTable:
        concept = Concept(self.name, self.word, self.head, self.context, visual=self.embedding)
        return ConceptTable([concept], self.backbone.vocab_size, device=self.backbone.device,
                            dtype=self.backbone.dtype)

    def concept(self, meta: ConceptMeta, head: ConceptHead) -> Concept:
        """The current tensors and `head` as a Concept (detached copies, float32 on the CPU)."""
        def copy(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.detach().float().cpu().clone()

        meta.extra.update(head.meta())
        return Concept(self.name, copy(self.word), copy(self.head), copy(self.context), meta,
                       visual=copy(self.embedding), parts=head.parts())

    def encode(self, rows: Sequence[Row], table: ConceptTable) -> dict[str, Any]:
        """Right-padded ids, labels on the answers, each row's embedding position (or -1)."""
        backbone = self.backbone
        tokenizer = backbone.tokenizer

        def encode(segments, add_bos=True):
            return encode_segments(segments, tokenizer, slot_id=table.slot_id,
                                   image_token_id=backbone.image_token_id,
                                   num_image_tokens=backbone.num_image_tokens, add_bos=add_bos,
                                   pieces=backbone.prompt_pieces)

        ids, labels, positions = [], [], []
        visual = table.visual_ids(self.name)
        for row in rows:
            segments = build_prompt(row.question, template=self.runtime.template,
                                    has_image=row.photo is not None,
                                    concepts={self.name: self.config.num_context})
            prompt = encode(segments)
            position = -1
            if row.inject:
                prompt = insert_after_image(prompt, backbone.image_token_id, visual)
                position = prompt.index(visual[0])
            answer = encode(split_names(" " + row.answer.strip(), [self.name]), add_bos=False)
            answer.append(backbone.eos_token_id)
            ids.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
            positions.append(position)
        width = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), width), backbone.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(ids), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, (row, label) in enumerate(zip(ids, labels)):
            input_ids[i, :len(row)] = torch.tensor(row)
            label_ids[i, :len(row)] = torch.tensor(label)
            mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "labels": label_ids, "attention_mask": mask, "positions": positions}

    def losses(self, rows: Sequence[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, answer cross-entropy, attention penalty) of `rows` with the current tensors."""
        table = self.table()
        batch = self.encode(rows, table)
        device = self.backbone.device
        weight = self.config.attention_weight
        penalise = weight > 0 and any(p >= 0 for p in batch["positions"])
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"].to(device),
                                  "attention_mask": batch["attention_mask"].to(device), "use_cache": False}
        photos = [row.photo for row in rows if row.photo is not None]
        if photos:
            features = [self.visual_tokens(photo) for photo in photos]
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
        if penalise:
            inputs["output_attentions"] = True
        with table.active(self.backbone.model):
            output = self.backbone.model(**inputs)
        logits = output.logits[:, :-1].float()
        targets = batch["labels"][:, 1:].to(device)
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               ignore_index=IGNORE)
        penalty = ce.new_zeros(())
        if penalise:
            lengths = batch["attention_mask"].sum(1).tolist()
            per_row = []
            for b, position in enumerate(batch["positions"]):
                if position < 0:
                    continue
                # [layers, heads, later queries]: the attention each later token pays the embedding
                paid = torch.stack([layer[b, :, position + 1:lengths[b], position] for layer in output.attentions])
                per_row.append(paid.float().pow(2).sum(-1).mean())
            penalty = torch.stack(per_row).mean()
        return ce + weight * penalty, ce, penalty

    def step(self, rows: Sequence[Row]) -> dict[str, float]:
        """One AdamW step; the losses before it."""
        self.optimizer.zero_grad(set_to_none=True)
        total, ce, penalty = self.losses(rows)
        total.backward()
        self.optimizer.step()
        return {"loss": float(total.detach()), "ce": float(ce.detach()), "attention": float(penalty.detach())}


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


@dataclass
class MyvlmResult:
    """What `train_myvlm` made and measured."""

    concept: Concept
    out: Path
    head: HeadReport
    steps: list[dict[str, float]]  # per embedding step: loss, ce, attention
    seconds: dict[str, float]  # head, rows, embedding, total
    counts: dict[str, Any]
    skipped: list[str]  # unreadable photos, "path: reason"

    def summary(self) -> dict[str, Any]:
        head = asdict(self.head)
        head.pop("losses")
        return {"name": self.concept.name, "out": str(self.out), "head": head,
                "head_first_loss": self.head.losses[0] if self.head.losses else None,
                "head_last_loss": self.head.losses[-1] if self.head.losses else None,
                "first_step": self.steps[0] if self.steps else None,
                "last_step": self.steps[-1] if self.steps else None,
                "seconds": self.seconds, "counts": self.counts, "skipped": self.skipped}



def train_myvlm(runtime, name: str, positives: Sequence[Path], negatives: Sequence[Path],
                config: MyvlmConfig, out_dir: str | os.PathLike, *, progress: bool = False,
                echo: Callable[[str], None] | None = None) -> MyvlmResult:
    """The concept head, then the concept embedding; writes log.jsonl, loss.png, result.json
    into `out_dir`. Unreadable photos are reported (`skipped`, and through `echo`) and left out.

    The returned concept carries ConceptMeta(method="myvlm", base_model=fingerprint).
    """
    config.validate()
    validate_name(name)
    say = echo or (lambda message: None)
    if not positives:
        raise PlvmError(f"MyVLM needs photos of <{name}>, got none")
    started = time.perf_counter()
    positive_images, skipped = readable_photos(positives)
    negative_images, skipped_negatives = readable_photos(negatives)
    skipped += skipped_negatives
    for reason in skipped:
        say(f"skipped unreadable photo: {reason}")
    if not positive_images:
        raise PlvmError(f"MyVLM needs photos of <{name}>: none of the {len(positives)} given could be read")
    good_positives = list(positive_images)
    good_negatives = list(negative_images)

    head, report = fit_concept_head(runtime, list(positive_images.values()),
                                    list(negative_images.values()), config)
    seconds_head = time.perf_counter() - started
    say(f"<{name}>: {report.kind} head on {report.features} features, threshold {report.threshold:.4f} "
        f"(from {report.threshold_from}): accuracy positive {report.accuracy['positive']:.3f}, "
        f"negative {report.accuracy['negative']:.3f}")

    rows_start = time.perf_counter()
    rows = build_rows(runtime, name, good_positives, good_negatives, config, progress=progress)
    seconds_rows = time.perf_counter() - rows_start

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer = EmbeddingTrainer(runtime, name, config, {**positive_images, **negative_images})
    train_start = time.perf_counter()
    trainer.start_embedding(good_positives)
    rng = random.Random(f"myvlm-order-{config.seed}")
    order: list[Row] = []
    steps: list[dict[str, float]] = []
    log_path = out / LOG_FILE
    log_path.unlink(missing_ok=True)
    bar = tqdm(total=config.embedding_steps, desc=f"myvlm <{name}>", unit="step", disable=not progress)
    model = runtime.backbone.model
    with JsonlLogger(log_path) as log, eager_attention(model, config.attention_weight > 0):
        for step in range(1, config.embedding_steps + 1):
            chunk = []
            while len(chunk) < min(config.batch_size, len(rows)):
                if not order:
                    order = list(rows)
                    rng.shuffle(order)
                chunk.append(order.pop())
            losses = trainer.step(chunk)
            steps.append(losses)
            log.log({"kind": "step", "step": step, **losses,
                     "seconds": round(time.perf_counter() - train_start, 3)})
            bar.update(1)
    bar.close()
    seconds_embedding = time.perf_counter() - train_start
    seconds = {"head": seconds_head, "rows": seconds_rows, "embedding": seconds_embedding,
               "total": time.perf_counter() - started}
    counts = {"positive_photos": len(good_positives), "negative_photos": len(good_negatives),
              "skipped_photos": len(skipped), "steps": len(steps),
              **{kind: sum(1 for row in rows if row.kind == kind) for kind in ("positive", "qa", "negative")}}
    meta = ConceptMeta(
        method=METHOD, base_model=runtime.backbone.fingerprint, base_model_name=runtime.backbone.name,
        reference_sha256=sha256_file(good_positives[0]), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        extra={"positives": str(len(good_positives)), "positives_sha256": photos_digest(good_positives),
               "negatives": str(len(good_negatives)), "embedding_steps": str(config.embedding_steps),
               "attention_weight": repr(config.attention_weight),
               "threshold_from": report.threshold_from, "head_accuracy": json.dumps(report.accuracy),
               "seconds": f"{seconds['total']:.6f}", "config_sha256": config_digest(config)},
    )
    concept = trainer.concept(meta, head)
    # its retrieval key: the normalised mean of its photos' normalised CLS vectors
    concept = with_key(concept, photos_key(runtime, list(positive_images.values())),
                       runtime.encoder_fingerprint, len(good_positives), good_positives[0])
    if steps:
        draw_loss_curve(range(1, len(steps) + 1), [s["loss"] for s in steps], out / CURVE_FILE,
                        title=f"MyVLM <{name}> loss")
    result = MyvlmResult(concept, out, report, steps, seconds, counts, skipped)
    write_json_atomic(out / RESULT_FILE, {**result.summary(), "config": asdict(config)})
    return result
