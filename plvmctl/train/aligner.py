"""Train the PLVM Aligner with the weighted Yes/No loss (PLVM, Eq. 2).

Only the Aligner learns. For each training example the identity's reference photo goes
through the frozen reference encoder (once per photo, cached), the Aligner turns those tokens
into a concept (word, head, context) WITH gradients, and the frozen LLaVA reads

    <system> <name> is <t1>…<tk>. USER: [<image>\\n]{question} ASSISTANT: {answer}</s>

through a `ConceptTable` (virtual ids, hooks: nothing in the model changes). The loss is the
cross-entropy of the answer tokens only, the Yes/No token of recognition answers weighted by
w (`yes_no_weight`, 20 by default), all other answer tokens by 1, normalised by the sum of
weights over the (accumulated) batch: L = Σ w_i·CE_i / Σ w_i (`weighted_answer_loss`).
The rows (prompt, answer, labels, weights) come from `batches.encode_batch`, which the
per-concept trainers share.

The loop is a plain `for` over optimizer steps: AdamW, gradient accumulation, optional
linear warm-up and cosine decay, gradient clipping, bf16 autocast on CUDA only. Every
`checkpoint_every` steps (and at the end, and on Ctrl-C) OUT/checkpoint is written atomically
(Aligner folder + optimizer + scheduler + step + RNG + sampler state); `resume=True`
continues the same run exactly. OUT/log.jsonl gets one row per step (step, loss, lr,
seconds), OUT/loss.png the curve, OUT/aligner the final Aligner (set `aligner.path` to it).

Validation (held-out identities, `val_identities`) compares the logits of "Yes" and "No" as
the FIRST answer token after "Is <name> in this photo?" for each held-out identity with its
own photos (positives) and other identities' photos (negatives): accuracy on each and their
mean. It is one forward pass per batch, no generation.

Several GPUs: `accelerate launch -m plvmctl --recipe R train aligner ...`. When accelerate is
installed and the process was started with WORLD_SIZE > 1, the Aligner and the optimizer are
wrapped by `accelerate.Accelerator` (DDP: gradients averaged over processes); there is no
DataLoader to wrap because the sampler itself gives each rank its own samples (sample index
= ((step·accum + micro)·world + rank)·batch + row), so N processes of `batch_size` b see the
samples one process of batch size N·b sees. Eq. 2 is normalised by the weights of the whole
global batch (summed over the ranks) and the logged loss is the global batch's, so the loss
curve is one process's with the same global batch, within float tolerance
(tests/test_scaling_out.py). Only rank 0 writes files; a checkpoint resumes under either
process count (give the global batch the same size).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..aligner import Aligner, AlignerConfig, load_aligner, save_aligner
from ..answers import parse_yes_no
from ..concept import Concept
from ..data.templates import RECOGNITION_ANSWER_STYLES
from ..errors import PlvmError
from ..fileio import sha256_file, write_bytes_atomic, write_json_atomic
from ..images import load_image
from ..references import mean_outputs
from ..table import ConceptTable
from .batches import IGNORE, EncodedBatch, encode_batch, first_token_id, photo_image
from .common import (
    CHECKPOINT_MODULE,
    SCHEDULES,
    InterruptFlag,
    JsonlLogger,
    TrainingInterrupted,
    capture_rng_state,
    draw_loss_curve,
    find_checkpoint,
    load_checkpoint,
    make_scheduler,
    read_jsonl,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    truncate_log,
)
from .data import (
    NEGATIVE_MODES,
    Identity,
    PlvmSampler,
    Sample,
    hard_neighbours,
    read_manifest,
    split_identities,
    validation_samples,
)

LOG_FILE = "log.jsonl"
CURVE_FILE = "loss.png"
ALIGNER_DIR = "aligner"
RUN_FILE = "run.json"
CACHE_FILE = "reference_tokens.safetensors"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """The recipe's `train:` section (every value has a default; the CLI options override)."""

    lr: float = 1e-4
    batch_size: int = 2
    grad_accum: int = 1
    steps: int = 1000
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    weight_decay: float = 0.0
    seed: int = 0
    yes_no_weight: float = 20.0  # w of Eq. 2 on the Yes/No token of recognition answers
    # weight of every answer token of an attribute sample (1: Eq. 2 as published). A compared
    # recognition answer holds ~25 tokens and w; an attribute answer ~3, so with 1 the traits
    # that recognition does not compare get a few % of the loss (bench/aligner_attributes.py)
    attribute_weight: float = 1.0
    # "compare": recognition answers check the identity's traits against everyone in the photo
    # first ("left red hair red same ... match. Yes, ..."), as a base model trained to reason so
    # answers (the pocket model); the manifest then needs "traits" and "people". w lands on the
    # verdict's first token wherever it stands, and validation generates and reads the verdict.
    recognition_answer: str = "plain"
    compare_keys: list = field(default_factory=lambda: ["hair", "skin", "style"])
    compare_max_new_tokens: int = 64  # validation's answer length for "compare" answers
    positive_share: float = 0.6  # p: share of positives among recognition samples
    recognition_share: float = 0.5  # recognition : attribute = 1 : 1
    negatives: str = "random"  # random | hard (most similar references by encoder CLS cosine)
    # >1: each concept is made from its primary reference or from 2..N of its identity's
    # reference photos (the manifest's "references", PlvmSampler.references_for), combined as
    # `encode a.jpg b.jpg` combines them (references.mean_outputs)
    max_references: int = 1
    # share of samples whose prompt holds 1-2 other training concepts' sentences after their
    # own (distractors: a negative's may be the person in the photo), so that concepts learn to
    # work side by side, as `ask` puts every concept a question names in one prompt
    also_share: float = 0.0
    # share of attribute samples that ask one of the person's visual questions (the manifest's
    # "visual": a photo of them, a question, its answer) instead, with that photo
    visual_share: float = 0.0
    # >0: also pull each concept's first context rows toward the input embeddings of its
    # identity's written description (the manifest's "description", as the base model reads it
    # in "<name> is {description}."), weighted by this (`description_loss`): the concept then
    # states every trait the description holds, not only those the answers ask about
    description_weight: float = 0.0
    checkpoint_every: int = 100  # 0: only at the end and on Ctrl-C
    validate_every: int = 0  # 0: only at the end (when val_identities > 0)
    val_identities: int = 0  # identities held out of training for validation
    val_photos: int = 5  # positives (and as many negatives) per held-out identity
    log_every: int = 1  # a log.jsonl row every N steps
    overfit_batches: int = 0  # debugging: >0 cycles through only the first N batches
    cache_references: bool = True  # keep the reference encoder's outputs in OUT/cache too
    aligner_sizes: dict = field(default_factory=dict)  # AlignerConfig fields for a new Aligner
    data: str | None = None  # manifest path
    out: str | None = None  # output folder

    def validate(self) -> None:
        """Raise PlvmError naming the first impossible value."""
        positive = {"lr": self.lr, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "steps": self.steps, "yes_no_weight": self.yes_no_weight,
                    "attribute_weight": self.attribute_weight,
                    "log_every": self.log_every, "max_references": self.max_references}
        for key, value in positive.items():
            if value <= 0:
                raise PlvmError(f"train.{key} must be positive, got {value}")
        not_negative = {"warmup_steps": self.warmup_steps, "grad_clip": self.grad_clip,
                        "description_weight": self.description_weight,
                        "weight_decay": self.weight_decay, "checkpoint_every": self.checkpoint_every,
                        "validate_every": self.validate_every, "val_identities": self.val_identities,
                        "val_photos": self.val_photos, "overfit_batches": self.overfit_batches}
        for key, value in not_negative.items():
            if value < 0:
                raise PlvmError(f"train.{key} must be 0 or more, got {value}")
        for key in ("positive_share", "recognition_share", "also_share", "visual_share"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise PlvmError(f"train.{key} must be between 0 and 1, got {value}")
        if self.schedule not in SCHEDULES:
            raise PlvmError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.negatives not in NEGATIVE_MODES:
            raise PlvmError(f"train.negatives must be one of {', '.join(NEGATIVE_MODES)}, "
                            f"got {self.negatives!r}")
        if self.recognition_answer not in RECOGNITION_ANSWER_STYLES:
            raise PlvmError(f"train.recognition_answer must be one of {', '.join(RECOGNITION_ANSWER_STYLES)}, "
                            f"got {self.recognition_answer!r}")
        if self.recognition_answer == "compare" and not self.compare_keys:
            raise PlvmError("train.recognition_answer compare needs train.compare_keys (the traits to compare)")
        fixed = {"layout", "encoder_dim", "lm_dim", "num_context", "encoder", "base_model"}
        known = set(AlignerConfig.__dataclass_fields__) - fixed
        unknown = sorted(set(self.aligner_sizes) - known)
        if unknown:
            raise PlvmError(f"train.aligner_sizes: unknown key {unknown[0]!r} "
                            f"(known: {', '.join(sorted(known))})")


@dataclass
class TrainResult:
    """What a finished `train_aligner` call leaves behind."""

    out: Path
    aligner_path: Path
    steps: int  # optimizer steps done in total (resumed runs included)
    start_step: int  # where this call started (0, or the checkpoint's step)
    losses: list[float]  # loss of every step, from step 0
    validation: dict[str, float] | None = None


# --------------------------------------------------------------------------------------------
# Eq. 2
# --------------------------------------------------------------------------------------------


def weighted_answer_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *,
                         reduction: str = "mean") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PLVM's Eq. 2: L = Σ_i w_i·CE_i / Σ_i w_i over the answer tokens of the batch.

    logits [B, T, V], labels [B, T], weights [B, T], ALREADY ALIGNED: `logits[:, t]` is the
    prediction of `labels[:, t]` (shift before calling). Labels equal to -100 (prompt, padding)
    are ignored whatever their weight. `reduction="sum"` returns (Σ w·CE, Σ w) so that
    gradient-accumulation steps can share one normaliser.
    """
    if logits.shape[:-1] != labels.shape or labels.shape != weights.shape:
        raise ValueError(f"shapes differ: logits {tuple(logits.shape)}, labels "
                         f"{tuple(labels.shape)}, weights {tuple(weights.shape)}")
    vocab = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view(labels.shape)  # [B, T]
    w = torch.where(labels != IGNORE, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
    total = (w * ce).sum()
    norm = w.sum()
    if reduction == "sum":
        return total, norm
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / norm.clamp(min=torch.finfo(torch.float32).tiny)


# --------------------------------------------------------------------------------------------
# Reference tokens (computed once per photo)
# --------------------------------------------------------------------------------------------


class ReferenceTokens:
    """The frozen reference encoder's tokens per reference photo, computed once.

    Kept in memory (CPU); with `cache_file` also on disk as safetensors keyed by the photo's
    sha256, tagged with the encoder's name so another encoder never reuses them.
    """

    def __init__(self, encoder, cache_file: Path | None = None, batch_size: int = 16) -> None:
        self.encoder = encoder
        self.cache_file = cache_file
        self.batch_size = batch_size
        self.tokens: dict[str, torch.Tensor] = {}  # name -> [1+N, D] (its primary reference)
        self.photos: dict[Path, torch.Tensor] = {}  # every encoded photo -> [1+N, D]

    def _load_disk(self) -> dict[str, torch.Tensor]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(self.cache_file), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            if metadata.get("encoder") != self.encoder.name:
                return {}
            return load_file(str(self.cache_file))
        except Exception:  # a damaged cache is only recomputed
            return {}

    def _save_disk(self, stored: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        write_bytes_atomic(self.cache_file, save({k: v.contiguous() for k, v in stored.items()},
                                                 metadata={"encoder": self.encoder.name}))

    def prepare(self, identities: Sequence[Identity], progress: bool = False, further: bool = False) -> None:
        """Encode every identity's reference photo, and with `further` its further ones too
        (disk cache first)."""
        stored = self._load_disk()
        photos = [photo for identity in identities
                  for photo in (identity.reference, *(identity.references if further else ()))]
        digests = {photo: sha256_file(photo) for photo in photos}
        missing = list(dict.fromkeys(photo for photo in photos if digests[photo] not in stored))
        bar = tqdm(total=len(missing), desc="reference photos", unit="img",
                   disable=not progress or not missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            encoded = self.encoder.encode([load_image(photo) for photo in chunk]).detach().cpu()  # [b, 1+N, D]
            for photo, tokens in zip(chunk, encoded):
                stored[digests[photo]] = tokens.clone()
            bar.update(len(chunk))
        bar.close()
        if missing and self.cache_file is not None:
            self._save_disk(stored)
        for photo in photos:
            self.photos[photo] = stored[digests[photo]]
        for identity in identities:
            self.tokens[identity.name] = self.photos[identity.reference]

    def stack(self, names: Sequence[str], device: torch.device) -> torch.Tensor:
        """[n, 1+N, D] float32 tokens of `names`, on `device`."""
        return torch.stack([self.tokens[name] for name in names]).to(device, torch.float32)


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------


def new_aligner(runtime, config: TrainConfig) -> Aligner:
    """The Aligner to train, float32 on the runtime's device.

    From `aligner.path` when the recipe names one (fine-tuning), else a fresh one seeded with
    `config.seed`: paper sizes, or the tiny sizes for the tiny model, `train.aligner_sizes`
    overriding either.
    """
    from ..runtime import TINY_ALIGNER_SIZES

    section = runtime.recipe.aligner
    if section.path:
        return load_aligner(runtime.aligner_id, device=runtime.device, dtype=torch.float32)
    sizes = dict(TINY_ALIGNER_SIZES) if runtime.recipe.model.source == "tiny" else {}
    sizes.update(config.aligner_sizes)
    aligner_config = AlignerConfig(
        layout=section.layout, encoder_dim=runtime.encoder.hidden_size,
        lm_dim=runtime.backbone.hidden_size, num_context=section.num_context,
        encoder=runtime.encoder.name, base_model=runtime.backbone.name, **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        aligner = Aligner(aligner_config)
    return aligner.to(device=runtime.device, dtype=torch.float32)


def freeze(runtime) -> None:
    """Backbone and reference encoder: eval mode, no gradients (only the Aligner learns)."""
    runtime.backbone.freeze()
    runtime.encoder.model.eval()
    runtime.encoder.model.requires_grad_(False)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on other devices."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_concepts(aligner: torch.nn.Module, names: Sequence[str], references: ReferenceTokens, device, *,
                   reference_sets: dict[str, Sequence[Path]] | None = None) -> list[Concept]:
    """The concepts of `names` from the Aligner, with gradients: each from its primary
    reference, or, for a name in `reference_sets`, from those photos combined as a concept of
    several photos is (`references.mean_outputs`). One Aligner pass for all photos."""
    if not reference_sets:
        with _autocast(device):
            output = aligner(references.stack(names, device))
        return [Concept(name, output.word[i], output.head[i], output.context[i]) for i, name in enumerate(names)]
    sets = [tuple(reference_sets.get(name, ())) or (None,) for name in names]
    tokens = torch.stack([references.tokens[name] if photo is None else references.photos[photo]
                          for name, chosen in zip(names, sets) for photo in chosen]).to(device, torch.float32)
    with _autocast(device):
        output = aligner(tokens)
    concepts, start = [], 0
    for name, chosen in zip(names, sets):
        rows = slice(start, start + len(chosen))
        start += len(chosen)
        if len(chosen) == 1:
            concepts.append(Concept(name, output.word[rows][0], output.head[rows][0], output.context[rows][0]))
        else:
            concepts.append(Concept(name, *mean_outputs(output.word[rows], output.head[rows], output.context[rows])))
    return concepts


def concept_logits(aligner: torch.nn.Module, batch: EncodedBatch, references: ReferenceTokens,
                   backbone, *, image_cache: dict[Path, Any] | None = None,
                   reference_sets: dict[str, Sequence[Path]] | None = None,
                   concepts: Sequence[Concept] | None = None) -> torch.Tensor:
    """Run Aligner → ConceptTable → frozen LLaVA on `batch`; logits [B, T, total_ids].

    Gradients flow from the logits into the Aligner (through the concept rows). Only the rows
    that have a photo contribute pixel values (LLaVA scatters image features in row order).
    `reference_sets`: the photos each concept is made from, where more than its primary
    reference (`batch_concepts`). `concepts`: the batch's concepts, already made.
    """
    device = backbone.device
    model = backbone.model
    if concepts is None:
        concepts = batch_concepts(aligner, batch.names, references, device, reference_sets=reference_sets)
    table = ConceptTable(concepts, backbone.vocab_size, device=device, dtype=backbone.dtype)
    inputs: dict[str, Any] = {"input_ids": batch.input_ids.to(device),
                              "attention_mask": batch.attention_mask.to(device),
                              "use_cache": False}
    if batch.photos:
        inputs.update(backbone.image_inputs([photo_image(photo, image_cache) for photo in batch.photos]))
    with _autocast(device), table.active(model):
        logits = model(**inputs).logits  # [B, T, total_ids]
    return logits


def description_targets(backbone, identities: Sequence[Identity], num_context: int) -> dict[str, torch.Tensor]:
    """{name: the input embeddings [n, H] of the first n <= k tokens of its description}, as
    the description reads after "<name> is" (detached: a target, not a parameter)."""
    missing = [identity.name for identity in identities if not identity.description]
    if missing:
        raise PlvmError(f"train.description_weight needs a written description for every identity "
                        f"(the manifest's \"description\"); <{missing[0]}> has none")
    table = backbone.model.get_input_embeddings().weight
    targets = {}
    for identity in identities:
        ids = backbone.tokenizer(" " + identity.description.strip(), add_special_tokens=False).input_ids
        targets[identity.name] = table[torch.tensor(ids[:num_context], device=table.device)].detach().float()
    return targets


def description_loss(concepts: Sequence[Concept], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over `concepts` of ||context[:n] - target||^2 / ||target||^2 (the description's
    n token embeddings, `description_targets`): 0 when the concept's first n context rows are
    its description, word for word."""
    terms = []
    for concept in concepts:
        target = targets[concept.name].to(concept.context.device)
        rows = concept.context[:len(target)].float()
        terms.append((rows - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-8))
    return torch.stack(terms).mean()


def batch_loss(aligner: torch.nn.Module, batch: EncodedBatch, references: ReferenceTokens,
               backbone, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·CE, Σ w) of one batch: Eq. 2 before normalisation."""
    logits = concept_logits(aligner, batch, references, backbone, **kwargs)
    device = logits.device
    return weighted_answer_loss(logits[:, :-1], batch.labels[:, 1:].to(device),
                                batch.weights[:, 1:].to(device), reduction="sum")


@torch.no_grad()
def validate_recognition(aligner: torch.nn.Module, samples: Sequence[Sample],
                         references: ReferenceTokens, runtime, *, batch_size: int = 8,
                         image_cache: dict[Path, Any] | None = None,
                         max_new_tokens: int = 64) -> dict[str, float]:
    """Recognition accuracy by comparing the "Yes" and "No" logits as the first answer token,
    or, for samples whose answer reasons first, by generating the answer (at most
    `max_new_tokens`) and reading its verdict as the evaluation does.

    Returns positive / negative accuracy and their mean (each NaN if there is no such sample).
    """
    backbone = runtime.backbone
    if any(sample.reasoning for sample in samples):
        return _validate_by_generating(aligner, samples, references, runtime, batch_size=batch_size,
                                       max_new_tokens=max_new_tokens)
    prefix = runtime.template.answer_prefix
    yes_id, no_id = first_token_id(backbone, prefix + "Yes"), first_token_id(backbone, prefix + "No")
    was_training = aligner.training
    aligner.eval()
    num_context = _unwrap(aligner).config.num_context
    correct = {"positive": 0, "negative": 0}
    total = {"positive": 0, "negative": 0}
    try:
        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            batch = encode_batch(chunk, backbone, runtime.template, num_context,
                                 yes_no_weight=1.0, with_answers=False, image_cache=image_cache)
            logits = concept_logits(aligner, batch, references, backbone, image_cache=image_cache)
            for row, sample in enumerate(chunk):
                last = logits[row, batch.prompt_lengths[row] - 1].float()
                says_yes = bool(last[yes_id] > last[no_id])
                total[sample.kind] += 1
                correct[sample.kind] += int(says_yes == (sample.kind == "positive"))
    finally:
        aligner.train(was_training)
    return _recognition_rates(correct, total)


@torch.no_grad()
def _validate_by_generating(aligner: torch.nn.Module, samples: Sequence[Sample], references: ReferenceTokens,
                            runtime, *, batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """`validate_recognition` for answers that reason before the verdict: the Aligner's concepts
    go through the engine (greedy answers), parsed as `plvmctl eval` parses them."""
    from ..engine import AskRequest, Engine

    was_training = aligner.training
    aligner.eval()
    try:
        names = list(dict.fromkeys(sample.name for sample in samples))
        concepts = {}
        for start in range(0, len(names), batch_size):
            chunk = names[start:start + batch_size]
            output = _unwrap(aligner)(references.stack(chunk, runtime.backbone.device))
            for i, name in enumerate(chunk):
                concepts[name] = Concept(name, output.word[i].float(), output.head[i].float(),
                                         output.context[i].float())
        results = Engine(runtime, concepts).ask([AskRequest(s.question, s.photo) for s in samples],
                                                batch_size=batch_size, max_new_tokens=max_new_tokens)
    finally:
        aligner.train(was_training)
    correct = {"positive": 0, "negative": 0}
    total = {"positive": 0, "negative": 0}
    for sample, result in zip(samples, results):
        total[sample.kind] += 1
        correct[sample.kind] += int(parse_yes_no(result.answer) == ("yes" if sample.kind == "positive" else "no"))
    return _recognition_rates(correct, total)


def _recognition_rates(correct: dict[str, int], total: dict[str, int]) -> dict[str, float]:
    """Accuracy on positives, on negatives and their mean (NaN parts where there is none)."""
    nan = float("nan")
    positive = correct["positive"] / total["positive"] if total["positive"] else nan
    negative = correct["negative"] / total["negative"] if total["negative"] else nan
    return {"val_positive": positive, "val_negative": negative, "val_mean": (positive + negative) / 2}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The Aligner inside a DDP wrapper (or the module itself)."""
    return getattr(module, "module", module)


# --------------------------------------------------------------------------------------------
# Multi-GPU (thin)
# --------------------------------------------------------------------------------------------


def _global_names(sampler: PlvmSampler, step: int, micro: int, config: TrainConfig,
                  world: int) -> list[str] | None:
    """The concepts of micro-batch `micro` over all ranks, in one process's table order (None
    with one process): a row's loss depends on every concept of its table (their head rows
    share its softmax), so each rank builds the global batch's table."""
    if world == 1:
        return None
    samples = [sample for rank in range(world)
               for sample in sampler.micro_batch(step, micro, batch_size=config.batch_size,
                                                 grad_accum=config.grad_accum, rank=rank, world_size=world)]
    return list(dict.fromkeys(name for sample in samples for name in (sample.name, *sample.also)))


def _reference_sets(sampler: PlvmSampler, batch: EncodedBatch, step: int,
                    micro: int) -> dict[str, tuple[Path, ...]] | None:
    """The photos each concept of the micro-batch is made from (None: primary references only)."""
    if sampler.max_references == 1:
        return None
    return {name: sampler.references_for(name, step, micro) for name in batch.names}


def _summed(accelerator, value: float, device) -> float:
    """`value` summed over all ranks."""
    return float(accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=device), reduction="sum"))


def maybe_accelerator():
    """An `accelerate.Accelerator` when launched by `accelerate launch` with WORLD_SIZE > 1.

    Create it BEFORE loading the runtime: it selects this process's GPU, which "cuda" then
    means. Returns None in a single process (the path the tests run).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    try:
        from accelerate import Accelerator
    except ImportError:
        raise PlvmError("WORLD_SIZE > 1 but accelerate is not installed: pip install accelerate") from None
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # CPU: gloo (for smoke tests)
    if accelerator.num_processes != world:
        raise PlvmError(f"WORLD_SIZE={world} but accelerate set up {accelerator.num_processes} "
                        f"process(es): launch with `accelerate launch` or `torchrun`")
    return accelerator


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def resolve_paths(runtime, config: TrainConfig) -> tuple[Path, Path]:
    """(manifest, out) from the config (recipe-relative data paths resolved)."""
    from ..runtime import resolve_recipe_path

    if not config.data:
        raise PlvmError("no training data: pass --data MANIFEST or set train.data in the recipe")
    if not config.out:
        raise PlvmError("no output folder: pass --out DIR or set train.out in the recipe")
    return Path(resolve_recipe_path(runtime.recipe, config.data)), Path(config.out)


def _changed_settings(before: dict[str, Any], now: dict[str, Any]) -> str:
    """`key old -> new` for the settings that differ (bookkeeping ones ignored)."""
    ignored = {"steps", "checkpoint_every", "validate_every", "log_every", "data", "out"}
    return ", ".join(f"{key} {before.get(key)!r} -> {value!r}" for key, value in now.items()
                     if key not in ignored and key in before and before[key] != value)


def train_aligner(runtime, config: TrainConfig, *, resume: bool = False, progress: bool = False,
                  echo: Callable[[str], None] | None = None,
                  on_step: Callable[[int, float], None] | None = None,
                  accelerator: Any = None) -> TrainResult:
    """Train an Aligner on the manifest `config.data`, writing into `config.out`.

    `resume` continues from OUT/checkpoint (the same samples, optimizer and RNG state as if
    never stopped). `on_step(step, loss)` is called after every completed step (tests use it
    to simulate Ctrl-C). Ctrl-C saves a checkpoint and raises `TrainingInterrupted`.
    """
    config.validate()
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    main = rank == 0

    def say(message: str) -> None:
        if echo is not None and main:
            echo(message)

    manifest_path, out = resolve_paths(runtime, config)
    if out.exists() and not out.is_dir():
        raise PlvmError(f"--out {out} exists and is not a folder")
    checkpoint = find_checkpoint(out)
    if resume and checkpoint is None:
        raise PlvmError(f"--resume: no checkpoint in {out}")
    if not resume and checkpoint is not None:
        raise PlvmError(f"{out} already holds a training run: pass --resume to continue it, or "
                        f"choose another --out")

    manifest = read_manifest(manifest_path)
    for problem in manifest.problems:
        say(f"warning: {problem}")
    if not manifest.identities:
        raise PlvmError(f"{manifest_path}: no usable identity")
    train_ids, val_ids = split_identities(manifest.identities, config.val_identities, config.seed)
    unanswered = [i.name for i in train_ids if not i.attributes]
    if unanswered and config.recognition_share < 1.0:
        say(f"warning: {len(unanswered)} identities have no attribute answers (they get "
            f"recognition samples only): run `plvmctl data attributes {manifest_path}` first")

    freeze(runtime)
    backbone = runtime.backbone
    device = backbone.device

    seed_everything(config.seed)
    aligner = new_aligner(runtime, config)
    aligner.requires_grad_(True)
    aligner.train()
    num_context = aligner.config.num_context

    references = ReferenceTokens(runtime.encoder,
                                 out / "cache" / CACHE_FILE if config.cache_references and main else None)
    references.prepare(manifest.identities, progress=progress and main, further=config.max_references > 1)
    ranking = None
    if config.negatives == "hard":
        names = [identity.name for identity in train_ids]
        ranking = hard_neighbours(names, references.stack(names, torch.device("cpu"))[:, 0])
    compare_keys = list(config.compare_keys) if config.recognition_answer == "compare" else []
    sampler = PlvmSampler(train_ids, seed=config.seed, positive_share=config.positive_share,
                          recognition_share=config.recognition_share, negatives=config.negatives,
                          hard_neighbours=ranking, compare_keys=compare_keys,
                          max_references=config.max_references, also_share=config.also_share,
                          visual_share=config.visual_share)
    described = description_targets(backbone, train_ids, num_context) if config.description_weight > 0 else {}
    val_samples = validation_samples(val_ids, manifest.identities, seed=config.seed,
                                     photos_per_identity=config.val_photos,
                                     compare_keys=compare_keys) if val_ids else []

    optimizer = torch.optim.AdamW(aligner.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps=config.steps,
                               warmup_steps=config.warmup_steps, schedule=config.schedule)
    start_step, losses, seconds_before = 0, [], 0.0
    if checkpoint is not None:
        state, tensors = load_checkpoint(checkpoint)
        sampler.check_state(state.get("sampler", {}))
        saved = load_aligner(checkpoint / CHECKPOINT_MODULE, device=device, dtype=torch.float32)
        if saved.config != aligner.config:
            raise PlvmError(f"cannot resume: the checkpoint's Aligner ({checkpoint}) has another "
                            f"configuration than this recipe's")
        aligner.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(tensors["optimizer"])
        scheduler.load_state_dict(tensors["scheduler"])
        restore_rng_state(tensors["rng"])
        changed = _changed_settings(state.get("config", {}), asdict(config))
        if changed:
            say(f"warning: resuming with changed settings: {changed}")
        start_step = int(state["step"])
        losses = [float(x) for x in state.get("losses", [])][:start_step]
        seconds_before = float(state.get("seconds", 0.0))
        if main:
            truncate_log(out / LOG_FILE, lambda row: int(row.get("step", -1)) < start_step)
        say(f"resuming {out} at step {start_step} of {config.steps}")

    trained = aligner
    if accelerator is not None:
        aligner, optimizer = accelerator.prepare(aligner, optimizer)
    backward = accelerator.backward if accelerator is not None else (lambda loss: loss.backward())

    def checkpoint_state(step_count: int, seconds: float) -> dict[str, Any]:
        return {"step": step_count, "losses": losses, "seconds": seconds,
                "sampler": sampler.state_dict(), "config": asdict(config),
                "manifest": str(manifest_path), "recipe": runtime.recipe.name}

    def save(step_count: int, rng: dict[str, Any], seconds: float) -> Path | None:
        path = None
        if main:
            path = save_checkpoint(out, module=_unwrap(aligner), optimizer=optimizer,
                                   scheduler=scheduler, rng=rng,
                                   state=checkpoint_state(step_count, seconds),
                                   save_module=save_aligner)
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return path

    image_cache: dict[Path, Any] = {}
    validation: dict[str, float] | None = None
    completed = start_step
    updating = False  # True while the parameters are being changed (no checkpoint then)
    rng_state = capture_rng_state()
    started = time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - started

    out.mkdir(parents=True, exist_ok=True)
    logger = JsonlLogger(out / LOG_FILE) if main else None
    bar = tqdm(total=config.steps, initial=start_step, desc="train aligner", unit="step",
               disable=not progress or not main)
    try:
        with InterruptFlag() as interrupt:
            for step in range(start_step, config.steps):
                optimizer.zero_grad(set_to_none=True)
                data_step = step % config.overfit_batches if config.overfit_batches else step
                batches = [encode_batch(sampler.micro_batch(data_step, micro, batch_size=config.batch_size,
                                                            grad_accum=config.grad_accum,
                                                            rank=rank, world_size=world),
                                        backbone, runtime.template, num_context,
                                        yes_no_weight=config.yes_no_weight,
                                        attribute_weight=config.attribute_weight, image_cache=image_cache,
                                        names=_global_names(sampler, data_step, micro, config, world))
                           for micro in range(config.grad_accum)]
                weight_total = sum(float(b.weights[:, 1:].sum()) for b in batches)
                if accelerator is not None:  # Eq. 2 over the global batch: all ranks' weights
                    weight_total = _summed(accelerator, weight_total, device)
                step_loss = 0.0
                for micro, batch in enumerate(batches):
                    last = micro == len(batches) - 1
                    sync = contextlib.nullcontext() if accelerator is None or last \
                        else accelerator.no_sync(aligner)
                    with sync:
                        concepts = batch_concepts(aligner, batch.names, references, device,
                                                  reference_sets=_reference_sets(sampler, batch, data_step, micro))
                        total, _ = batch_loss(aligner, batch, references, backbone,
                                              image_cache=image_cache, concepts=concepts)
                        loss = total / weight_total
                        if described:  # a mean per micro-batch and rank: /(micro-batches × ranks)
                            loss = loss + config.description_weight * description_loss(concepts, described) \
                                / (len(batches) * world)
                        backward(loss * world)  # DDP averages over the ranks: ×world sums them
                    step_loss += float(loss.detach())
                if accelerator is not None:  # the global batch's loss, what one process logs
                    step_loss = _summed(accelerator, step_loss, device)
                if config.grad_clip > 0:
                    if accelerator is not None:
                        accelerator.clip_grad_norm_(aligner.parameters(), config.grad_clip)
                    else:
                        torch.nn.utils.clip_grad_norm_(aligner.parameters(), config.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                updating = True
                optimizer.step()
                scheduler.step()
                completed = step + 1
                rng_state = capture_rng_state()
                updating = False
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if logger is not None and (step % config.log_every == 0 or completed == config.steps):
                    logger.log({"step": step, "loss": step_loss, "lr": lr,
                                "seconds": round(elapsed(), 3)})
                if config.checkpoint_every and completed % config.checkpoint_every == 0 \
                        and completed < config.steps:
                    save(completed, rng_state, elapsed())
                if val_samples and config.validate_every and completed % config.validate_every == 0 \
                        and completed < config.steps and main:
                    validation = validate_recognition(aligner, val_samples, references, runtime,
                                                      batch_size=2 * config.batch_size,
                                                      image_cache=image_cache,
                                                      max_new_tokens=config.compare_max_new_tokens)
                    logger.log({"step": step, **validation})
                if on_step is not None:
                    on_step(step, step_loss)
                if interrupt.raised:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if logger is not None:
            logger.close()
        if updating:
            kept = find_checkpoint(out)
            raise TrainingInterrupted(
                f"interrupted during a parameter update at step {completed + 1}: nothing saved; "
                f"the last checkpoint ({kept or 'none'}) is kept") from None
        path = save(completed, rng_state, elapsed())
        if main and losses:
            draw_loss_curve(range(len(losses)), losses, out / CURVE_FILE, "Aligner training loss")
        raise TrainingInterrupted(
            f"interrupted after step {completed} of {config.steps}: checkpoint saved in {path or out}; "
            f"continue with `plvmctl train aligner --out {out} --resume`") from None
    except BaseException:
        bar.close()
        if logger is not None:
            logger.close()
        raise
    bar.close()

    # the end: final checkpoint (so --resume --steps MORE can extend the run), Aligner, curve
    save(completed, rng_state, elapsed())
    aligner_path = out / ALIGNER_DIR
    if main:
        if val_samples:
            validation = validate_recognition(aligner, val_samples, references, runtime,
                                              batch_size=2 * config.batch_size,
                                              image_cache=image_cache,
                                              max_new_tokens=config.compare_max_new_tokens)
            logger.log({"step": completed - 1, **validation})
        save_aligner(_unwrap(aligner), aligner_path)
        if losses:
            draw_loss_curve(range(len(losses)), losses, out / CURVE_FILE, "Aligner training loss")
        write_json_atomic(out / RUN_FILE, {
            "recipe": runtime.recipe.name, "manifest": str(manifest_path),
            "identities": [i.name for i in train_ids], "val_identities": [i.name for i in val_ids],
            "config": asdict(config), "steps": completed, "final_loss": losses[-1] if losses else None,
            "validation": validation, "seconds": round(elapsed(), 3),
            "aligner": str(aligner_path), "aligner_parameters": trained.num_parameters()})
    if logger is not None:
        logger.close()
    return TrainResult(out, aligner_path, completed, start_step, list(losses), validation)


def logged_losses(out: str | os.PathLike) -> dict[int, float]:
    """step -> loss from OUT/log.jsonl (training rows only)."""
    return {int(row["step"]): float(row["loss"]) for row in read_jsonl(Path(out) / LOG_FILE)
            if "loss" in row}


__all__ = [
    "TrainConfig", "TrainResult", "ReferenceTokens", "weighted_answer_loss", "concept_logits",
    "batch_loss", "validate_recognition", "new_aligner", "freeze", "train_aligner",
    "maybe_accelerator", "logged_losses",
]
