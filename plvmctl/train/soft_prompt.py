"""The trainable soft prompt of per-concept methods: `<name>`'s word and head rows and k context rows.

Yo'LLaVA and MC-LLaVA both train, per concept, the three tensors of a `Concept` with the model
frozen: `word` (the input embedding of `<name>`), `head` (its output-head row) and `context`
(k latent tokens), read through the prompt `<name> is <t1>...<tk>.`. `SoftPromptTrainer` holds
those tensors for N concepts, stacked (word [N, H], head [N, H], context [N, k, H]), and takes
AdamW steps on the answer-token cross-entropy of a batch that may mix them; a method gives it
its start tensors (`initial_rows` + `noisy_rows`: a generic word plus noise, or MC-LLaVA's
k-means centroids) and reads the trained concepts back.

Why this is peft's TrainableTokens without a vocabulary resize
--------------------------------------------------------------
peft's `TrainableTokens` leaves the embedding and head matrices frozen and substitutes
trainable values for the listed rows. The `ConceptTable` does exactly that for ids above the
vocabulary: the embedding hook returns the concept rows where the ids are virtual
(`torch.where`, real rows untouched) and the head hook appends the concept's head row as one
more logit column. The gradient reaching a concept tensor is therefore the gradient an
extended matrix would give its row: the sum over the positions holding that id (input side),
and hidden-state x (softmax - target) on that column (output side). The tensors are plain
`nn.Parameter`s outside the model; no model parameter has `requires_grad`, no gradient mask is
needed, no row is "restored after every step", and because the ids are virtual the tokenizer
and the matrices are never resized. The concepts of several runs can therefore share one
question (the original Yo'LLaVA reuses `<token0>` and cannot load two concepts).

Vision features
---------------
The vision features (vision tower + projector output) of every training photo are computed
once (`cache_features`, keyed by path and flip) and fed to LLaVA through its
`mm_encoder_outputs` argument, so a step runs only the language model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from PIL import Image
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..answers import parse_yes_no
from ..concept import Concept, ConceptMeta, validate_name
from ..data.templates import RECOGNITION_QUESTIONS, fill
from ..errors import PlvmError
from ..images import load_image
from .aligner import weighted_answer_loss
from .batches import encode_batch, first_token_id
from .data import Sample

FeatureCache = dict  # (photo path, flipped) -> the photo's vision features [N, H]


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class SoftPromptConfig:
    """The settings of a soft-prompt method (a method's recipe section is a subclass that names
    its `SECTION` and changes defaults); the defaults are Yo'LLaVA's."""

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
    out: str = "runs/per-concept"  # OUT/<name>/ holds conversations, log, curve, result
    index: str | None = None  # used by `plvmctl eval --method METHOD` for hard negatives
    negatives_dir: str | None = None  # ditto: local negative photos

    SECTION = "per_concept"  # the recipe section, named in messages (a subclass says its own)

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
# Start tensors and vision features
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



def photo_image(photo: Path, flipped: bool) -> Image.Image:
    """The photo as the model sees it in training: read, mirrored when `flipped`."""
    image = load_image(photo)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else image


@torch.no_grad()
def cache_features(backbone, features: FeatureCache, photos: Sequence[Path], *, flips: Sequence[bool] = (False,),
                   chunk: int = 16, progress: bool = False) -> int:
    """Compute into `features` the vision features (tower + projector output, [N, H] each, as
    the model computes them) of every (photo, side) not there yet; returns how many."""
    todo = [(str(p), f) for p in dict.fromkeys(Path(p) for p in photos) for f in flips
            if (str(p), f) not in features]
    bar = tqdm(total=len(todo), desc="vision features", unit="img", disable=not progress or not todo)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        computed = backbone.image_features([photo_image(Path(p), f) for p, f in part])
        for key, photo_features in zip(part, computed):
            features[key] = photo_features
        bar.update(len(part))
    bar.close()
    return len(todo)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


class SoftPromptTrainer:
    """The trainable tensors of N concepts (word [N, H], head [N, H], context [N, k, H]) and a
    step over a batch that may mix them.

    `start` gives the tensors to begin from (float32, CPU); they become `nn.Parameter`s on the
    model's device. The model is frozen and never changes. `features` is the vision-feature
    cache to use (a method that read photos before, for its start, passes its own); `parts`
    maps a name to the extra tensors its concept carries (MC-LLaVA's prototypes); `method`
    names the method in a concept's default metadata.
    """

    def __init__(self, runtime, names: Sequence[str], config: SoftPromptConfig,
                 start: tuple[torch.Tensor, torch.Tensor, torch.Tensor], *, method: str,
                 features: FeatureCache | None = None,
                 parts: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> None:
        for name in names:
            validate_name(name)
        config.validate()
        self.runtime = runtime
        self.backbone = runtime.backbone
        self.backbone.freeze()
        self.names = list(names)
        self.name = self.names[0]
        self.config = config
        self.method = method
        self.features: FeatureCache = {} if features is None else features
        self.parts = {name: dict(tensors) for name, tensors in (parts or {}).items()}
        device = self.backbone.device
        word, head, context = start
        self.word = torch.nn.Parameter(word.to(device))
        self.head = torch.nn.Parameter(head.to(device))
        self.context = torch.nn.Parameter(context.to(device))
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        prefix = runtime.template.answer_prefix
        self._yes_no = (first_token_id(self.backbone, prefix + "Yes"), first_token_id(self.backbone, prefix + "No"))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.word, self.head, self.context]

    def current(self, name: str) -> Concept:
        """The concept `name` with the live tensors (gradients flow through it)."""
        number = self.names.index(name)
        return Concept(name, self.word[number], self.head[number], self.context[number])

    def concept(self, meta: ConceptMeta | None = None, name: str | None = None) -> Concept:
        """Concept `name` (default: the first) now, as detached float32 copies on the CPU, with
        its parts."""
        name = name or self.name
        live = self.current(name)
        parts = {key: value.float().cpu().clone() for key, value in self.parts.get(name, {}).items()}
        return Concept(name, live.word.detach().float().cpu().clone(), live.head.detach().float().cpu().clone(),
                       live.context.detach().float().cpu().clone(), meta or ConceptMeta(method=self.method),
                       parts=parts)

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {"word": self.word.detach().clone(), "head": self.head.detach().clone(),
                "context": self.context.detach().clone()}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.word.copy_(state["word"])
            self.head.copy_(state["head"])
            self.context.copy_(state["context"])

    def cache_features(self, photos: Sequence[Path], *, flips: Sequence[bool] = (False,),
                       chunk: int = 16, progress: bool = False) -> int:
        """`cache_features` into this trainer's cache; returns how many were computed."""
        return cache_features(self.backbone, self.features, photos, flips=flips, chunk=chunk, progress=progress)

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
                images = [photo_image(p, f) for p, f in zip(batch.photos, sides)]
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


