"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, MLP projector, Vicuna/LLaMA LM.

One photo is one square view: padded to a square with the mean colour (`pad`, as the
original LLaVA-1.5 code) or resized and centre-cropped (`crop`), then 576 slots at 336 px
(24 x 24 patches, CLS dropped). The chat template is Vicuna-v1; a prompt holds one photo.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from ..backbone import Backbone
from ..images import expand_to_square
from ..prompt import VICUNA_V1


class Llava15Backbone(Backbone):
    family = "llava-1.5"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    takes_image_preprocess = True
    multi_image = False

    def chat_template(self):
        return VICUNA_V1

    @property
    def num_image_tokens(self) -> int:
        """How many `<image>` slots one picture fills (576 for LLaVA-1.5 at 336 px)."""
        vision = self.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def image_token_counts(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> list[int]:
        return [self.num_image_tokens] * len(images)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Photos → pixel values for the vision tower ([B, 3, S, S], model dtype/device).

        `pad` pads each photo to a square with the processor's mean colour first, as the
        original LLaVA-1.5 code did; `crop` lets the processor resize and centre-crop.
        """
        if self.image_preprocess == "pad":
            fill = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
            images = [expand_to_square(image, fill) for image in images]
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(device=self.device, dtype=self.dtype)

    def image_inputs(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> dict:
        return {"pixel_values": self.pixel_values(images)}

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        output = self.model.model.get_image_features(pixel_values=self.pixel_values(images))
        return [features.detach() for features in output.pooler_output]

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The pooled (post-layernorm CLS) output of LLaVA's own CLIP tower, L2-normalised."""
        tower = self.model.model.vision_tower
        output = tower(pixel_values=self.pixel_values(images))
        pooled = output.pooler_output.float()
        return torch.nn.functional.normalize(pooled, dim=-1)

    def processor(self):
        from transformers import LlavaProcessor

        if self.loaded_processor is not None:
            return self.loaded_processor
        vision = self.config.vision_config
        strategy = self.config.vision_feature_select_strategy
        return LlavaProcessor(
            image_processor=self.image_processor,
            tokenizer=self.tokenizer,
            patch_size=vision.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=0 if strategy == "default" else 1,
        )
