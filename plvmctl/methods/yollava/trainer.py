"""Yo'LLaVA as a baseline: train one concept's soft prompt on its photos, per concept.

The soft prompt and its step are `train.soft_prompt`; photos, negatives, conversations and
the epoch loop are `train.per_concept`; this module holds Yo'LLaVA's settings, its start
and a whole run.

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

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ...concept import Concept, ConceptMeta, validate_name
from ...concept_index import photos_key, with_key
from ...errors import PlvmError
from ...fileio import sha256_file, write_json_atomic
from ...images import load_image
from ...train.common import config_digest, draw_loss_curve, photos_digest
from ...train.per_concept import build_conversations, spread, train_epochs
from ...train.soft_prompt import SoftPromptConfig, SoftPromptTrainer, initial_rows, noisy_rows

METHOD = "yollava"
CONVERSATIONS_FILE = "conversations.json"
LOG_FILE = "log.jsonl"
CURVE_FILE = "loss.png"
RESULT_FILE = "result.json"


@dataclass
class YollavaConfig(SoftPromptConfig):
    """The recipe's `yollava:` section (`--set yollava.KEY=VALUE`); defaults are Yo'LLaVA's."""

    SECTION = "yollava"

    out: str = "runs/yollava"  # OUT/<name>/ holds conversations, log, curve, result


def initial_tensors(backbone, config: SoftPromptConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(word [1, H], head [1, H], context [1, k, H]) to start one concept from: `init_word`'s
    rows plus noise (different noise per row, from the seed)."""
    word, head = initial_rows(backbone, config.init_word)
    generator = torch.Generator().manual_seed(config.seed)
    return (noisy_rows(word, 1, config.init_noise, generator),
            noisy_rows(head, 1, config.init_noise, generator),
            noisy_rows(word, config.num_context, config.init_noise, generator).unsqueeze(0))


def yollava_trainer(runtime, name: str, config: SoftPromptConfig) -> SoftPromptTrainer:
    """The soft prompt of one Yo'LLaVA concept, at its start, ready to step."""
    validate_name(name)
    config.validate()
    runtime.backbone.freeze()
    return SoftPromptTrainer(runtime, [name], config, initial_tensors(runtime.backbone, config), method=METHOD)


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

    trainer = yollava_trainer(runtime, name, config)
    sides = (False, True) if config.flip else (False,)
    feature_start = time.perf_counter()
    if config.cache_features:
        trainer.cache_features(positives + negatives, flips=sides, progress=progress)
    seconds_features = time.perf_counter() - feature_start

    selection_negatives = spread(negatives, config.selection_negatives or len(positives))

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

