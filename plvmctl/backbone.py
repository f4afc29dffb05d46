"""The backbone interface: what plvmctl asks of a vision-language model, whatever its family.

`Backbone` holds the model, its tokenizer and image processor and answers the few questions
the rest of plvmctl asks: hidden size, vocabulary size, which id is `<image>`, how many slots
each photo fills, the model's own chat template, the model inputs for a list of photos, the
model's fingerprint. Everything that differs between model families lives in one subclass per
family (`plvmctl/families/`): LLaVA-1.5 (`llava15.py`) and LLaVA-OneVision (`onevision.py`).
A new family is one such file plus a line in `families.FAMILIES`; the family is read from the
config's `model_type`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Sequence

import torch
from PIL import Image

from .errors import PlvmError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise PlvmError("--device cuda: no CUDA GPU is visible to torch (use --device cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means bf16 on a GPU and fp32 on a CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


@dataclass
class Backbone:
    """A loaded vision-language model with its tokenizer and image processor.

    The family-independent half lives here (shapes, special ids, fingerprint); each family's
    subclass in `plvmctl/families/` answers the family-specific questions below the line
    "family-specific".
    """

    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    name: str
    image_preprocess: str = "pad"  # pad | crop (families that resize photos to a square)
    prompt_pieces: str = "natural"  # natural | per_piece (prompt.encode_segments)
    # The processor the model was loaded with (its chat template, its settings); None for
    # models built in code, where the family builds one from the parts above.
    loaded_processor: object | None = field(default=None, repr=False)

    # What a family declares: its config model_types and transformers class name.
    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    model_class: ClassVar[str] = ""
    # Whether one prompt may carry several photos (`ask --together`).
    multi_image: ClassVar[bool] = False
    # Whether `model.image_preprocess` (pad | crop) decides how photos reach the tower; a
    # family that does its own (OneVision's anyres tiling) refuses the setting.
    takes_image_preprocess: ClassVar[bool] = False

    # -- shapes and ids ---------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.config.text_config.hidden_size

    @property
    def vocab_size(self) -> int:
        """Rows of the output head: every virtual (concept) id starts here."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @property
    def pad_token_id(self) -> int:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        if self.config.pad_token_id is not None:
            return self.config.pad_token_id
        return self.tokenizer.eos_token_id

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- family-specific ----------------------------------------------------------------
    def chat_template(self):
        """The model's own chat template (a prompt.ChatTemplate): what `model.template: auto` means."""
        raise NotImplementedError

    def image_token_counts(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> list[int]:
        """How many `<image>` slots each photo fills, in order. Photos are PIL images, or paths
        (opened only by families whose count depends on the photo's size). `per_prompt` (photos
        of each prompt, in order; default one each) matters to families that treat a prompt
        with several photos differently."""
        raise NotImplementedError

    def image_inputs(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> dict:
        """Model inputs for the photos of a batch, in prompt order (pixel values and whatever
        else the family's forward needs), on the model's device and dtype."""
        raise NotImplementedError

    def image_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """The projected visual tokens of each photo ([slots, hidden] each), as the model puts
        them in place of its `<image>` slots (Yo'LLaVA caches them)."""
        raise NotImplementedError

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """L2-normalised global embeddings from the vision tower ([B, D], float32), what
        retrieval indexes of image folders are built from."""
        raise NotImplementedError

    def processor(self):
        """The transformers processor that `save_backbone` writes beside the weights."""
        raise NotImplementedError

    @classmethod
    def load_processor(cls, source: str, revision: str | None = None):
        """The model's processor (tokenizer, image processor, chat template) from a folder or hub id."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(source, revision=revision)

    # -- identity ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A short hash that changes when the model's shape or weights differ.

        Built from the config's architecture fields (the family's model_type among them) plus
        the first rows of the input embeddings and the output head, so concepts made for
        another model, another family or another fine-tune are recognised as foreign.
        """
        cached = getattr(self, "_fingerprint", None)
        if cached is not None:
            return cached
        text = self.config.text_config
        shape = {
            "model_type": self.config.model_type,
            "hidden_size": text.hidden_size,
            "layers": text.num_hidden_layers,
            "vocab_rows": self.vocab_size,
            "image_token_id": self.image_token_id,
        }
        digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
        for matrix in (self.model.get_input_embeddings().weight,
                       self.model.get_output_embeddings().weight):
            if matrix.device.type != "meta":
                sample = matrix[:8].detach().float().cpu().contiguous()
                digest.update(sample.numpy().tobytes())
        self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def freeze(self) -> "Backbone":
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        return self


def save_backbone(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """Write model + tokenizer + processor as a Hugging Face folder (`from_pretrained`-able)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder, safe_serialization=True)
    backbone.processor().save_pretrained(folder)
    return folder
