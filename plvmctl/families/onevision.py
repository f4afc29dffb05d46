"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, Qwen2 LM, anyres.

What differs from LLaVA-1.5, all of it here:

- Chat template: the processor's own Jinja template (Qwen2's `<|im_start|>role ... <|im_end|>`
  turns as llava-hf ships them), rendered once with markers and cut into text around the
  system text and the question, so a prompt has exactly the ids `apply_chat_template` +
  the tokenizer give. The concept sentences follow the system text inside the system turn;
  the answer starts right after `<|im_start|>assistant\\n` (no leading space: "Yes", not " Yes").
- Image slots ("anyres"): one photo alone is a 384 px base view plus the crops of the grid
  (`image_grid_pinpoints`) that fits it best, unpadded to the photo's aspect ratio, a newline
  slot after each row of the crops, shrunk when above `anyres_max_9`; so the count depends
  on the photo's size (729 + up to ~6,600 for OV-7B). Several photos in one prompt get the
  base view only: 729 + 1 slots each (the paper's "730 tokens" for a reference photo).
- Forward inputs: `pixel_values` [photos, crops, 3, 384, 384] + `image_sizes`, and
  `batch_num_images` when a prompt carries several photos.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..backbone import Backbone
from ..errors import PlvmError
from ..images import load_image
from ..prompt import ChatTemplate, Segment, merge_text

# llava-hf's OneVision chat template (chat_template.json of llava-hf/llava-onevision-qwen2-*-hf),
# used when a processor ships none (models built in code).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# LLaVA-OneVision's own system prompt (its "qwen_1_5" conversation template).
ONEVISION_SYSTEM = "You are a helpful assistant."
_SYSTEM_MARK, _QUESTION_MARK = "\x00system\x00", "\x00question\x00"


@functools.lru_cache(maxsize=32)
def _frame(jinja: str, num_images: int) -> tuple[str, str, str]:
    """(before the system text, between it and the question, after the question) of a
    system + user conversation with `num_images` photos, ending with the generation prompt."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "system", "content": [{"type": "text", "text": _SYSTEM_MARK}]},
        {"role": "user", "content": [{"type": "image"}] * num_images
         + [{"type": "text", "text": _QUESTION_MARK}]},
    ]
    rendered = render_jinja_template(conversations=[messages], chat_template=jinja,
                                     add_generation_prompt=True)[0][0]
    if rendered.count(_SYSTEM_MARK) != 1 or rendered.count(_QUESTION_MARK) != 1 \
            or rendered.index(_SYSTEM_MARK) > rendered.index(_QUESTION_MARK):
        raise PlvmError("the model's chat template does not place a system text before the question")
    head, rest = rendered.split(_SYSTEM_MARK)
    middle, tail = rest.split(_QUESTION_MARK)
    return head, middle, tail


@dataclass(frozen=True)
class ProcessorChatTemplate(ChatTemplate):
    """A model's own Jinja chat template: system turn (system text + concept sentences), user
    turn (photos, question), generation prompt: the very text `apply_chat_template` renders."""

    jinja: str = ONEVISION_CHAT_TEMPLATE

    def render(self, question: list[Segment], preamble: list[Segment], has_image: bool | int) -> list[Segment]:
        head, middle, tail = _frame(self.jinja, int(has_image))
        return merge_text([head + self.system, *preamble, middle, *question, tail])


def anyres_slots(height: int, width: int, *, grid: int, crop: int, pinpoints, max_crops: int) -> int:
    """Slots of one photo of `height` x `width` alone in its prompt (strategy "full").

    `grid` patches per side of a crop of `crop` px. The base view gives grid²; the best-fitting
    grid resolution is cut into crops whose patches are unpadded to the photo's aspect ratio
    (rows x cols), with one newline slot per row; above `max_crops` crops' worth of patches the
    rows and columns shrink by the square root of the excess.
    """
    from transformers.image_processing_utils import select_best_resolution

    best_height, best_width = select_best_resolution((height, width), pinpoints)
    rows, cols = grid * (best_height // crop), grid * (best_width // crop)
    if width / height > cols / rows:  # wider than the grid: padding at top and bottom
        kept = int(round(height * (cols / width), 7))
        rows -= 2 * ((rows - kept) // 2)
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= 2 * ((cols - kept) // 2)
    ratio = math.sqrt(rows * cols / (max_crops * grid ** 2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return grid ** 2 + rows * cols + rows


class OneVisionBackbone(Backbone):
    family = "llava-onevision"
    model_types = ("llava_onevision",)
    model_class = "LlavaOnevisionForConditionalGeneration"
    multi_image = True

    def chat_template(self):
        jinja = getattr(self.loaded_processor, "chat_template", None) or ONEVISION_CHAT_TEMPLATE
        return ProcessorChatTemplate(name="onevision", system=ONEVISION_SYSTEM, user="user",
                                     assistant="assistant", answer_prefix="", jinja=jinja)

    @property
    def _grid(self) -> int:
        vision = self.config.vision_config
        return vision.image_size // vision.patch_size

    def image_token_counts(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> list[int]:
        """Anyres slots for a photo alone in its prompt, base view + newline (grid² + 1) for
        photos that share a prompt."""
        per_prompt = list(per_prompt) if per_prompt is not None else [1] * len(images)
        if sum(per_prompt) != len(images):
            raise PlvmError(f"{len(images)} photos for prompts that hold {sum(per_prompt)}")
        config, grid = self.config, self._grid
        max_crops = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
        counts = []
        photos = iter(images)
        for number in per_prompt:
            for image in [next(photos) for _ in range(number)]:
                width, height = (image if isinstance(image, Image.Image) else load_image(image)).size
                if number == 1:
                    count = anyres_slots(height, width, grid=grid, crop=config.vision_config.image_size,
                                         pinpoints=config.image_grid_pinpoints, max_crops=max_crops)
                else:
                    count = grid ** 2 + 1
                counts.append(count - (1 if config.vision_feature_select_strategy == "default" else 0))
        return counts

    def image_inputs(self, images: Sequence[Image.Image], per_prompt: Sequence[int] | None = None) -> dict:
        processed = self.image_processor(images=list(images), return_tensors="pt")
        inputs = {"pixel_values": processed["pixel_values"].to(device=self.device, dtype=self.dtype),
                  "image_sizes": processed["image_sizes"].to(self.device)}
        if per_prompt is not None and any(number > 1 for number in per_prompt):
            inputs["batch_num_images"] = torch.tensor(list(per_prompt), device=self.device)
        return inputs

    @torch.no_grad()
    def image_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        output = self.model.model.get_image_features(**self.image_inputs(images))
        return [features.detach() for features in output.pooler_output]

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The SigLIP tower on each photo's base view: its pooled output where the tower has
        a head, else the mean of its last hidden states; L2-normalised."""
        base_views = self.image_inputs(images)["pixel_values"][:, 0]
        output = self.model.model.vision_tower(pixel_values=base_views)
        pooled = output.pooler_output if output.pooler_output is not None \
            else output.last_hidden_state.mean(dim=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def processor(self):
        if self.loaded_processor is not None:
            return self.loaded_processor
        settings = {"num_image_tokens": self._grid ** 2,
                    "vision_feature_select_strategy": self.config.vision_feature_select_strategy,
                    "vision_aspect_ratio": self.config.vision_aspect_ratio}
        return PhotoProcessor(self.tokenizer, self.image_processor, ONEVISION_CHAT_TEMPLATE, settings)

    @classmethod
    def load_processor(cls, source: str, revision: str | None = None):
        """transformers' LlavaOnevisionProcessor; where torchvision is missing (its video half
        needs it), the photo half: tokenizer, image processor and chat template."""
        try:
            return super().load_processor(source, revision)
        except ImportError as error:
            if "torchvision" not in str(error).lower():
                raise
            return PhotoProcessor.from_pretrained(source, revision)


@dataclass
class PhotoProcessor:
    """The photo half of a LlavaOnevisionProcessor folder (no video processor, so no
    torchvision): what plvmctl reads from it and writes back in the same files."""

    tokenizer: object
    image_processor: object
    chat_template: str | None
    settings: dict

    @classmethod
    def from_pretrained(cls, source: str, revision: str | None = None) -> "PhotoProcessor":
        from transformers import AutoImageProcessor, AutoTokenizer
        from transformers.utils import cached_file

        def read(name: str) -> str | None:
            path = cached_file(source, name, revision=revision, _raise_exceptions_for_missing_entries=False)
            return Path(path).read_text(encoding="utf-8") if path else None

        template = read("chat_template.jinja")
        if template is None and (stored := read("chat_template.json")) is not None:
            template = json.loads(stored)["chat_template"]
        settings = json.loads(read("processor_config.json") or "{}")
        settings.pop("processor_class", None)
        return cls(AutoTokenizer.from_pretrained(source, revision=revision),
                   AutoImageProcessor.from_pretrained(source, revision=revision), template, settings)

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        config = {"processor_class": "LlavaOnevisionProcessor", **self.settings}
        (folder / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
