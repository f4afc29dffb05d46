"""Tiny models built from configs: no network, no download, deterministic for a seed.

The `tiny` recipe uses them to exercise every code path in seconds on a CPU: a LLaVA
(CLIP vision tower + Llama LM) with a word-level tokenizer, and a DINOv2 reference encoder.
Their weights are random, so their answers are meaningless; the pocket model of the toy
world is the tiny model that has actually been trained.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    BitImageProcessorPil,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

# Special tokens, in this order, take the first ids of every word-level tokenizer we build.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))

TINY_WORDS = (
    "a an the is are was be in on at of to and or with without this that these those photo "
    "image picture person people man woman who what where which how many much color colour "
    "hair shirt left right middle center top bottom yes no not there here it its his her their "
    "red green blue yellow black white brown gray grey orange purple pink blond blonde smiling "
    "sad happy neutral wearing glasses hat earrings beard short long curly bald round oval square "
    "face skin light dark one two three four five six seven eight nine ten can you see tell me "
    "describe answer question chat between curious user artificial intelligence assistant gives "
    "helpful detailed polite answers s user assistant background standing sitting next"
).split()
PUNCTUATION = list(".,?!:;'\"()-/\n")


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over `words` (plus punctuation and specials).

    Text is split on whitespace and punctuation; unknown words become `<unk>`. It is what
    the tiny and pocket models speak: small vocabulary, fast, no training needed.
    """
    vocabulary: dict[str, int] = {}
    for token in SPECIAL_TOKENS + PUNCTUATION + [w.lower() for w in words]:
        vocabulary.setdefault(token, len(vocabulary))
    core = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def tiny_llava_config(vocab_size: int, hidden_size: int = 32, layers: int = 2, image_size: int = 8,
                      patch_size: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                      heads: int = 4) -> LlavaConfig:
    """A LLaVA config with the real classes at toy sizes (transformers' own test sizes)."""
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=heads,
        projection_dim=vision_hidden,
    )
    num_patches = (image_size // patch_size) ** 2
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=IMAGE_ID,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=num_patches,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_convert_rgb=True,
    )


def build_tiny_llava(seed: int = 0, words: list[str] | None = None, **sizes):
    """(model, tokenizer, image_processor): a random tiny LLaVA, identical for a seed."""
    tokenizer = build_word_tokenizer(words or TINY_WORDS)
    config = tiny_llava_config(vocab_size=len(tokenizer), **sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.config._name_or_path = f"tiny-llava-seed{seed}"
    return model, tokenizer, clip_image_processor(config.vision_config.image_size)


def tiny_dinov2_config(hidden_size: int = 32, image_size: int = 28, patch_size: int = 14,
                       layers: int = 2, heads: int = 4) -> Dinov2Config:
    return Dinov2Config(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 2,
    )


def dinov2_image_processor(image_size: int) -> BitImageProcessorPil:
    """DINOv2's preprocessing (shortest edge 256/224 of the crop, bicubic, ImageNet stats)."""
    return BitImageProcessorPil(
        size={"shortest_edge": round(image_size * 256 / 224)},
        crop_size={"height": image_size, "width": image_size},
        resample=3,  # bicubic
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_convert_rgb=True,
    )


def build_tiny_dinov2(seed: int = 0, **sizes):
    """(model, image_processor): a random tiny DINOv2, identical for a seed."""
    config = tiny_dinov2_config(**sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Dinov2Model(config).eval()
    model.config._name_or_path = f"tiny-dinov2-seed{seed}"
    return model, dinov2_image_processor(config.image_size)
