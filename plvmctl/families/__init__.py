"""Model families behind the `Backbone` interface, one module each, chosen by `model_type`.

A family module defines a `Backbone` subclass that says which transformers class loads the
model, what the model's own chat template is, how many `<image>` slots a photo fills and what
the model's forward takes for photos. Adding a family is one module plus one line here.
`load_backbone` reads a model's family from its config and loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbone import Backbone, resolve_device, resolve_dtype
from ..errors import PlvmError
from ..tiny import build_tiny_llava
from .llava15 import Llava15Backbone
from .onevision import OneVisionBackbone

FAMILIES = (Llava15Backbone, OneVisionBackbone)


def family_for(model_type: str, source: str = "the model"):
    """The Backbone subclass for a config's `model_type`, or a one-line error."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for family in FAMILIES for t in family.model_types)
    raise PlvmError(f"model {source!r} is a {model_type!r} model; supported: {supported}")


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
                  quantization: str = "none", image_preprocess: str | None = None,
                  revision: str | None = None, seed: int = 0) -> Backbone:
    """Load a vision-language model: `tiny` (random, from configs), a local folder or a hub id.

    The family (LLaVA-1.5, LLaVA-OneVision, ...) is read from the config's `model_type`. Hub
    ids resolve through transformers' cache; with no network only cached or local models
    load, and the error says so. `image_preprocess` None is the family's own (pad for
    LLaVA-1.5); a family that ignores the setting refuses a value.
    """
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if source == "tiny":
        model, tokenizer, image_processor = build_tiny_llava(seed=seed)
        model = model.to(device=torch_device, dtype=torch_dtype)
        return Llava15Backbone(model, tokenizer, image_processor, name=f"tiny-llava-seed{seed}",
                               image_preprocess=image_preprocess or "pad").freeze()

    import transformers  # here, not at the top: only a real model needs them loaded
    from transformers import AutoConfig

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
    family = family_for(config.model_type, source)
    if image_preprocess is not None and not family.takes_image_preprocess:
        raise PlvmError(f"model.image_preprocess={image_preprocess}: {family.family} ignores it (its processor "
                        "decides how photos are cut); leave it out of the recipe")
    kwargs = {"dtype": torch_dtype, "revision": revision}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": torch_device.index or 0}
    try:
        model = getattr(transformers, family.model_class).from_pretrained(source, **kwargs)
        processor = family.load_processor(source, revision=revision)
    except (OSError, ValueError, ImportError) as error:
        raise PlvmError(f"cannot load model {source!r}: {str(error).splitlines()[0]}") from error
    if quantization_config is None:
        model = model.to(torch_device)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    return family(model, tokenizer, processor.image_processor, name=source,
                  image_preprocess=image_preprocess or "pad", loaded_processor=processor).freeze()
