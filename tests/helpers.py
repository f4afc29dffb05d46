"""Small builders shared by the tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from plvmctl.concept import Concept, ConceptMeta
from plvmctl.lab import toy


def save_portraits(folder: Path, identity: toy.Identity, count: int, seed: int) -> list[Path]:
    """`count` 48 px portraits of a toy identity, drawn with `seed`, saved into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for number in range(count):
        path = folder / f"{identity.name.lower()}_{seed}_{number}.png"
        toy.render_portrait(identity, rng, size=48).save(path)
        paths.append(path)
    return paths


def copied_concept(backbone, name: str, token_id: int, k: int = 3, noise: float = 0.0,
                   seed: int = 0) -> Concept:
    """A concept whose word, head and context rows are copies of real token `token_id`."""
    embedding = backbone.model.get_input_embeddings().weight.detach().float().cpu()
    head = backbone.model.get_output_embeddings().weight.detach().float().cpu()
    generator = torch.Generator().manual_seed(seed)
    context = embedding[token_id].repeat(k, 1)
    if noise:
        context = context + noise * torch.randn(context.shape, generator=generator)
    meta = ConceptMeta(method="copy", base_model=backbone.fingerprint, base_model_name=backbone.name)
    return Concept(name, embedding[token_id].clone(), head[token_id].clone(), context, meta)
