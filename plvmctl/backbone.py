"""The LLaVA-family backbone behind one small interface.

`Backbone` holds the model, its tokenizer and image processor and answers the few questions
the rest of plvmctl asks: hidden size, vocabulary size, which id is `<image>` and how many
slots one image takes, how to turn photos into pixel values, the model's fingerprint.
LLaVA-1.5 (`LlavaForConditionalGeneration`) is implemented; another family (LLaVA-OneVision)
plugs in by answering the same questions.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import PlvmError
from .images import expand_to_square

SUPPORTED_MODEL_TYPES = ("llava",)


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
    """A loaded LLaVA-family model with its tokenizer and image processor."""

    model: torch.nn.Module  # LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    name: str
    image_preprocess: str = "pad"  # pad | crop
    prompt_pieces: str = "natural"  # natural | per_piece (prompt.encode_segments)

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
    def num_image_tokens(self) -> int:
        """How many `<image>` slots one picture fills (576 for LLaVA-1.5 at 336 px)."""
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

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

    # -- images -----------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """Photos → pixel values for the vision tower ([B, 3, S, S], model dtype/device).

        `pad` pads each photo to a square with the processor's mean colour first, as the
        original LLaVA-1.5 code did; `crop` lets the processor resize and centre-crop.
        """
        if self.image_preprocess == "pad":
            fill = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
            images = [expand_to_square(image, fill) for image in images]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised global embeddings from the vision tower ([B, D], float32).

        The pooled (post-layernorm CLS) output of LLaVA's own CLIP tower: what retrieval
        indexes of image folders are built from.
        """
        tower = self.model.model.vision_tower
        output = tower(pixel_values=self.pixel_values(images))
        pooled = output.pooler_output.float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    # -- identity ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """A short hash that changes when the model's shape or weights differ.

        Built from the config's architecture fields plus the first rows of the input
        embeddings and the output head, so concepts made for another model, or another
        fine-tune of the same architecture, are recognised as foreign.
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


def _quantization_config(quantization: str):
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise PlvmError(
            f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes "
            "(on a CUDA machine)"
        ) from error
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_quant_type="nf4")


def load_backbone(source: str, *, device: str = "auto", dtype: str = "auto",
                  quantization: str = "none", image_preprocess: str = "pad",
                  revision: str | None = None, seed: int = 0) -> Backbone:
    """Load a LLaVA-family model: `tiny` (random, from configs), a local folder or a hub id.

    Hub ids resolve through transformers' cache; with no network only cached or local
    models load, and the error says so.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source == "tiny":
        from .tiny import build_tiny_llava

        model, tokenizer, image_processor = build_tiny_llava(seed=seed)
        model = model.to(device=torch_device, dtype=torch_dtype)
        return Backbone(model, tokenizer, image_processor, name=f"tiny-llava-seed{seed}",
                        image_preprocess=image_preprocess).freeze()

    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    quantization_config = _quantization_config(quantization)
    if quantization_config is not None and torch_device.type != "cuda":
        raise PlvmError(f"model.quantization={quantization} needs a CUDA GPU")

    if source.startswith((".", "/", "~")) and not Path(source).expanduser().exists():
        raise PlvmError(f"model folder not found: {source}")
    source = str(Path(source).expanduser()) if source.startswith("~") else source
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise PlvmError(
            f"cannot load model {source!r}: {str(error).splitlines()[0]} "
            "(pass a local folder, or make sure the Hugging Face cache has it)"
        ) from error
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PlvmError(
            f"model {source!r} is a {config.model_type!r} model; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    kwargs = {"dtype": torch_dtype, "revision": revision}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch_device.index or 0}
    try:
        model = LlavaForConditionalGeneration.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise PlvmError(f"cannot load model {source!r}: {str(error).splitlines()[0]}") from error
    if quantization_config is None:
        model = model.to(torch_device)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    return Backbone(model, tokenizer, processor.image_processor, name=source,
                    image_preprocess=image_preprocess).freeze()


def save_backbone(backbone: Backbone, folder: str | os.PathLike) -> Path:
    """Write model + tokenizer + processor as a Hugging Face folder (`from_pretrained`-able)."""
    from transformers import LlavaProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(folder, safe_serialization=True)
    vision = backbone.config.vision_config
    processor = LlavaProcessor(
        image_processor=backbone.image_processor,
        tokenizer=backbone.tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=backbone.config.vision_feature_select_strategy,
        num_additional_image_tokens=0 if backbone.config.vision_feature_select_strategy == "default" else 1,
    )
    processor.save_pretrained(folder)
    return folder
