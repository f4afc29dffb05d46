"""The loaded world of one recipe: backbone, reference encoder, Aligner, and encoding.

`load_runtime(recipe)` loads the backbone at once; the reference encoder and the Aligner
load on first use, so `ask` never pays for them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .backbone import Backbone, resolve_device, resolve_dtype
from .concept import Concept, ConceptMeta, validate_name
from .errors import PlvmError
from .families import load_backbone
from .fileio import sha256_file
from .images import load_image
from .prompt import get_template
from .recipe import PACKAGE_DIR, Recipe

TINY_ALIGNER_SIZES = {"mlp_hidden": 64, "hidden": 32, "depth": 2, "heads": 4,
                      "released_heads": 2, "released_dim_head": 16, "released_depth": 2,
                      "head_mapping_hidden": 32}


def resolve_recipe_path(recipe: Recipe, value: str) -> str:
    """Relative paths in a recipe are relative to the working directory, then to the
    recipe file's folder's parent (the project root for recipes/NAME.yaml), then to the folder
    that holds the plvmctl package (where an installed package keeps plvmctl/assets/...)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or recipe.path is None:
        return str(path)
    for root in (recipe.path.resolve().parent.parent, PACKAGE_DIR.parent):
        if (root / path).exists():
            return str(root / path)
    return str(path)


def _resolve_source(recipe: Recipe, source: str) -> str:
    """Model sources that name an existing folder (relative to the recipe) become paths."""
    if source == "tiny" or ("/" not in source and not source.startswith(".")):
        return source
    candidate = resolve_recipe_path(recipe, source)
    return candidate if Path(candidate).exists() else source


@dataclass
class Runtime:
    recipe: Recipe
    backbone: Backbone
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    verbose: int = 0

    @property
    def template(self):
        """The recipe's chat template; `auto` is the model's own (its family's)."""
        if self.recipe.model.template == "auto":
            return self.backbone.chat_template()
        return get_template(self.recipe.model.template)

    @functools.cached_property
    def encoder(self):
        """The frozen reference encoder (DINOv2 by default)."""
        from .aligner import ReferenceEncoder, load_reference_encoder

        source = self.recipe.encoder.source
        if source == "tiny":
            from .tiny import build_tiny_dinov2

            model, processor = build_tiny_dinov2(seed=self.recipe.model.seed)
            encoder = ReferenceEncoder(model.to(self.device, self.dtype), processor)
        else:
            source = _resolve_source(self.recipe, source)
            encoder = load_reference_encoder(source, device=self.device, dtype=self.dtype)
        for parameter in encoder.model.parameters():
            parameter.requires_grad_(False)
        return encoder

    @functools.cached_property
    def encoder_fingerprint(self) -> str:
        """The reference encoder's id in retrieval keys (concept_index.encoder_fingerprint)."""
        from .concept_index import encoder_fingerprint

        return encoder_fingerprint(self.encoder)

    @functools.cached_property
    def aligner_id(self) -> str:
        section = self.recipe.aligner
        if section.path:
            return resolve_recipe_path(self.recipe, section.path)
        return f"random-{section.layout}-k{section.num_context}-seed{self.recipe.model.seed}"

    @functools.cached_property
    def aligner(self):
        """The Aligner from the recipe's folder, or a random one for the tiny recipe."""
        from .aligner import Aligner, AlignerConfig, load_aligner

        section = self.recipe.aligner
        if section.path:
            aligner = load_aligner(self.aligner_id, device=self.device, dtype=self.dtype)
        elif self.recipe.model.source == "tiny":
            config = AlignerConfig(layout=section.layout, encoder_dim=self.encoder.hidden_size,
                                   lm_dim=self.backbone.hidden_size,
                                   num_context=section.num_context, **TINY_ALIGNER_SIZES)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.recipe.model.seed + 1)
                aligner = Aligner(config)
            aligner = aligner.to(self.device, self.dtype)
        else:
            raise PlvmError(
                f"recipe {self.recipe.name!r} names no Aligner (aligner.path): import the released "
                "checkpoint with `plvmctl aligner import CHECKPOINT --out DIR` or train one with "
                "`plvmctl train aligner --out DIR`, then set aligner.path"
            )
        config = aligner.config
        if config.lm_dim != self.backbone.hidden_size:
            raise PlvmError(
                f"Aligner {self.aligner_id} outputs {config.lm_dim}-d embeddings but model "
                f"{self.backbone.name} has hidden size {self.backbone.hidden_size}: it was made for another model"
            )
        if config.encoder_dim != self.encoder.hidden_size:
            raise PlvmError(
                f"Aligner {self.aligner_id} expects {config.encoder_dim}-d reference features but "
                f"encoder {self.recipe.encoder.source} gives {self.encoder.hidden_size}"
            )
        aligner.eval()
        for parameter in aligner.parameters():
            parameter.requires_grad_(False)
        return aligner

    @functools.cached_property
    def aligner_sha256(self) -> str:
        if self.recipe.aligner.path:
            from .aligner import aligner_sha256

            return aligner_sha256(self.aligner_id)
        return ""

    def encode_concept(self, name: str, reference: str | os.PathLike | Image.Image) -> Concept:
        """One reference photo → a Concept (DINOv2 features → Aligner), no training."""
        return self.encode_concepts([(name, reference)])[0]

    @torch.no_grad()
    def encode_concepts(self, items: list[tuple[str, str | os.PathLike | Image.Image]]) -> list[Concept]:
        """Encode several references in one batch. Each concept carries its retrieval key (the
        reference's normalised CLS vector, concept_index.py) and its reference photo's path."""
        from .concept_index import key_from_cls, with_key

        images, digests, paths = [], [], []
        for name, reference in items:
            paths.append(None if isinstance(reference, Image.Image) else reference)
            validate_name(name)
            if isinstance(reference, Image.Image):
                images.append(reference.convert("RGB"))
                buffer = io.BytesIO()
                images[-1].save(buffer, format="PNG")
                digests.append(hashlib.sha256(buffer.getvalue()).hexdigest())
            else:
                images.append(load_image(reference))
                digests.append(sha256_file(reference))
        tokens = self.encoder.encode(images)  # [B, 1+N, D]
        output = self.aligner(tokens.to(self.device, self.dtype))
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        concepts = []
        for row, ((name, _), digest) in enumerate(zip(items, digests)):
            meta = ConceptMeta(method="plvm", base_model=self.backbone.fingerprint,
                               base_model_name=self.backbone.name, aligner_id=self.aligner_id,
                               aligner_sha256=self.aligner_sha256, reference_sha256=digest,
                               created=created)
            concept = Concept(name, output.word[row].float().cpu(), output.head[row].float().cpu(),
                              output.context[row].float().cpu(), meta)
            concepts.append(with_key(concept, key_from_cls(tokens[row:row + 1, 0]),
                                     self.encoder_fingerprint, 1, paths[row]))
        return concepts

    def check_concept(self, concept: Concept) -> Concept:
        concept.check_compatible(self.backbone.fingerprint, self.backbone.hidden_size, self.backbone.name)
        return concept


def recipe_dtype(recipe: Recipe, device: torch.device) -> str:
    """The dtype `model.dtype: auto` stands for: float16 on a GPU with the released Aligner
    (its authors ran DINOv2, the Aligner and LLaVA in fp16; bench/dtype_context.py measures
    how far fp16 and bf16 move its context tokens), otherwise bf16 on a GPU and fp32 on a CPU."""
    if recipe.model.dtype == "auto" and device.type == "cuda" and recipe.aligner.layout == "released":
        return "float16"
    return recipe.model.dtype


def load_runtime(recipe: Recipe, device: str = "auto", verbose: int = 0) -> Runtime:
    torch_device = resolve_device(device)
    dtype = recipe_dtype(recipe, torch_device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = _resolve_source(recipe, recipe.model.source)
    backbone = load_backbone(source, device=str(torch_device), dtype=dtype,
                             quantization=recipe.model.quantization,
                             image_preprocess=recipe.model.image_preprocess,
                             revision=recipe.model.revision, seed=recipe.model.seed)
    backbone.prompt_pieces = recipe.model.prompt_pieces
    return Runtime(recipe=recipe, backbone=backbone, device=torch_device, dtype=torch_dtype,
                   verbose=verbose)
