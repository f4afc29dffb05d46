"""Pretraining the pocket reference encoder: a tiny DINOv2 that tells toy identities apart.

PLVM's reference encoder is a frozen DINOv2 whose CLS token and patch tokens describe the
reference photo well enough for the Aligner to write a concept from them. The toy world has
no pretrained DINOv2, so the pocket one (`Dinov2Model`, 64 px portraits, 8 px patches -> 64
patch tokens + CLS) is trained here on training-part portraits only, then frozen.

Objective, per step: `identities_per_step` training identities, `views` portraits of each
drawn with different rngs (shirt, expression and background change; the identity's traits
do not) plus light augmentation (a shift of a few pixels, a horizontal flip).

* Supervised contrastive loss (SupCon, Khosla et al. 2020) on the L2-normalised projection
  of the CLS token: views of the same identity are positives, everybody else negatives. Half
  of each step's identities are one-trait neighbours of the other half (hard negatives), so
  one differing trait must be enough to push two people apart.
* An auxiliary trait classifier per trait (face, skin, hair colour, hair style, accessory,
  facial hair, eye colour) on the CLS token. The labels are free in the toy world and make
  the features learn much faster on two CPU cores; the heads are thrown away afterwards.

`measure_retrieval` reports the held-out nearest-neighbour identification accuracy: one
portrait of each of M held-out identities is the gallery, another (different rng) the query.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn
from transformers import Dinov2Model

from . import toy
from ..errors import PlvmError
from ..tiny import dinov2_image_processor, tiny_dinov2_config
from ..train.common import JsonlLogger, lr_multiplier, seed_everything


@dataclass
class EncoderSizes:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8


@dataclass
class EncoderTrainConfig:
    steps: int = 300
    identities_per_step: int = 32
    views: int = 2
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 20
    weight_decay: float = 0.01
    temperature: float = 0.1
    trait_weight: float = 1.0
    max_shift: int = 4
    seed: int = 0
    log_every: int = 10
    max_seconds: float = 0.0  # stop early after this much training time (0: no limit)


class EncoderTrainer(nn.Module):
    """The DINOv2 being trained plus its throw-away heads (projection and trait classifiers)."""

    def __init__(self, model: Dinov2Model) -> None:
        super().__init__()
        self.model = model
        hidden = model.config.hidden_size
        self.projection = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.trait_heads = nn.ModuleDict({name: nn.Linear(hidden, len(values))
                                          for name, values in toy.TRAITS.items()})

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cls = self.model(pixel_values=pixels).last_hidden_state[:, 0]  # [B, D]
        embedding = F.normalize(self.projection(cls), dim=-1)
        return embedding, {name: head(cls) for name, head in self.trait_heads.items()}


def build_pocket_dinov2(sizes: EncoderSizes, seed: int):
    """(model, image_processor): a fresh tiny DINOv2, identical for a seed."""
    config = tiny_dinov2_config(hidden_size=sizes.hidden, image_size=sizes.image_size,
                                patch_size=sizes.patch_size, layers=sizes.layers, heads=sizes.heads)
    config.intermediate_size = sizes.hidden * 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config)
    model.config._name_or_path = "plvmctl-pocket-dinov2"
    return model, dinov2_image_processor(sizes.image_size)


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss: mean over anchors of -log p(positive | anchor), averaged
    over each anchor's positives. embeddings [B, D] unit-norm, labels [B]."""
    similarity = embeddings @ embeddings.T / temperature  # [B, B]
    self_mask = torch.eye(len(labels), dtype=torch.bool)
    similarity = similarity.masked_fill(self_mask, -1e9)
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    counts = positives.sum(1).clamp(min=1)
    return -(log_prob * positives).sum(1).div(counts).mean()


def augment(image: Image.Image, rng: random.Random, max_shift: int) -> Image.Image:
    """A shift of up to `max_shift` pixels (edges filled with the corner colour) and a flip."""
    if max_shift > 0:
        dx, dy = rng.randint(-max_shift, max_shift), rng.randint(-max_shift, max_shift)
        fill = image.getpixel((0, 0))
        image = image.transform(image.size, Image.Transform.AFFINE, (1, 0, -dx, 0, 1, -dy), fillcolor=fill)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return image


def _neighbour(identity: toy.Identity, rng: random.Random) -> toy.Identity | None:
    """A training-part identity that differs from `identity` in exactly one trait."""
    for _ in range(10):
        trait = rng.choice(list(toy.TRAITS))
        value = rng.choice([v for v in toy.TRAITS[trait] if v != getattr(identity, trait)])
        candidate = dataclasses.replace(identity, **{trait: value})
        if not toy.is_heldout(candidate):
            return candidate
    return None


def sample_identities(rng: random.Random, count: int) -> list[toy.Identity]:
    """`count` distinct training identities, half of them one-trait neighbours of the rest."""
    pool = toy.training_identities()
    chosen: list[toy.Identity] = []
    while len(chosen) < count:
        identity = pool[rng.randrange(len(pool))]
        if identity in chosen:
            continue
        chosen.append(identity)
        neighbour = _neighbour(identity, rng)
        if neighbour is not None and neighbour not in chosen and len(chosen) < count:
            chosen.append(neighbour)
    return chosen


def pixel_values(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def measure_retrieval(model: Dinov2Model, image_processor, *, identities: int = 200, seed: int = 1,
                      portrait_size: int = 64) -> dict[str, float]:
    """Held-out identification: top-1 nearest neighbour (CLS cosine) of a second portrait
    among the first portraits of `identities` held-out identities. Chance is 1/identities."""
    pool = list(toy.heldout_identities())
    rng = random.Random(f"plvmctl-pocket-retrieval-{seed}")
    chosen = rng.sample(pool, min(identities, len(pool)))
    gallery = [toy.render_portrait(identity, rng, size=portrait_size) for identity in chosen]
    queries = [toy.render_portrait(identity, rng, size=portrait_size) for identity in chosen]
    model.eval()

    def embed(images: list[Image.Image]) -> torch.Tensor:
        rows = []
        for start in range(0, len(images), 64):
            pixels = pixel_values(image_processor, images[start:start + 64])
            rows.append(model(pixel_values=pixels).last_hidden_state[:, 0])
        return F.normalize(torch.cat(rows), dim=-1)

    similarity = embed(queries) @ embed(gallery).T  # [M, M]
    top1 = similarity.argmax(dim=1)
    accuracy = float((top1 == torch.arange(len(chosen))).float().mean())
    return {"top1": accuracy, "identities": len(chosen), "chance": 1.0 / len(chosen)}


@dataclass
class EncoderResult:
    model: Dinov2Model
    image_processor: object
    losses: list[float]
    seconds: float
    steps: int


def train_encoder(model: Dinov2Model, image_processor, config: EncoderTrainConfig, *,
                  portrait_size: int = 64, logger: JsonlLogger | None = None,
                  echo: Callable[[str], None] | None = None) -> EncoderResult:
    """SupCon + trait classification on fresh training-part portraits; returns the frozen model."""
    say = echo or (lambda message: None)
    if config.views < 2:
        raise PlvmError("encoder training needs at least 2 views per identity")
    seed_everything(config.seed)
    rng = random.Random(f"plvmctl-pocket-encoder-{config.seed}")
    trainer = EncoderTrainer(model)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    trainer.train()
    trainer.requires_grad_(True)
    trait_index = {name: {value: i for i, value in enumerate(values)} for name, values in toy.TRAITS.items()}
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(config.steps):
        factor = lr_multiplier(step, total_steps=config.steps, warmup_steps=config.warmup_steps,
                               schedule="cosine")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * factor)
        identities = sample_identities(rng, config.identities_per_step)
        images, labels = [], []
        for label, identity in enumerate(identities):
            for _ in range(config.views):
                portrait = toy.render_portrait(identity, rng, size=portrait_size)
                images.append(augment(portrait, rng, config.max_shift))
                labels.append(label)
        label_tensor = torch.tensor(labels)
        embeddings, trait_logits = trainer(pixel_values(image_processor, images))
        contrastive = supcon_loss(embeddings, label_tensor, config.temperature)
        traits = sum(F.cross_entropy(trait_logits[name],
                                     torch.tensor([trait_index[name][getattr(identities[i], name)] for i in labels]))
                     for name in toy.TRAITS) / len(toy.TRAITS)
        loss = contrastive + config.trait_weight * traits
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PlvmError(f"encoder training diverged at step {step} (loss {value})")
        losses.append(value)
        elapsed = time.perf_counter() - started
        if step % config.log_every == 0 or step == config.steps - 1:
            recent = losses[-config.log_every:]
            say(f"encoder step {step:5d}  loss {sum(recent) / len(recent):.4f} "
                f"(supcon {float(contrastive.detach()):.3f}, traits {float(traits.detach()):.3f})  {elapsed:6.0f}s")
            if logger is not None:
                logger.log({"stage": "encoder", "step": step, "loss": value,
                            "supcon": float(contrastive.detach()), "traits": float(traits.detach()),
                            "seconds": round(elapsed, 2)})
        if config.max_seconds and elapsed > config.max_seconds:
            say(f"encoder: time limit reached after {step + 1} steps")
            break
    model.eval()
    model.requires_grad_(False)
    return EncoderResult(model, image_processor, losses, time.perf_counter() - started, len(losses))
