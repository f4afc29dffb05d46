"""Loading a LLaVA-family backbone from a folder, exactly as a hub model would load."""

import pytest
import torch
from PIL import Image

from plvmctl.backbone import resolve_dtype, save_backbone
from plvmctl.families import load_backbone
from plvmctl.errors import PlvmError


@pytest.fixture(scope="module")
def saved(runtime, tmp_path_factory):
    return save_backbone(runtime.backbone, tmp_path_factory.mktemp("tiny-llava"))


def test_folder_round_trip_is_the_same_model(runtime, saved):
    loaded = load_backbone(str(saved), device="cpu")
    assert type(loaded.model) is type(runtime.backbone.model)
    assert loaded.fingerprint == runtime.backbone.fingerprint
    assert loaded.num_image_tokens == runtime.backbone.num_image_tokens == 16
    assert loaded.tokenizer("is the person red").input_ids == runtime.backbone.tokenizer("is the person red").input_ids
    ids = torch.tensor([[1, 21, 20, 41]])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, runtime.backbone.model(input_ids=ids).logits)


def test_fingerprint_tells_models_apart(runtime):
    other = load_backbone("tiny", device="cpu", seed=1)
    assert other.fingerprint != runtime.backbone.fingerprint


def test_bfloat16_load(saved):
    loaded = load_backbone(str(saved), device="cpu", dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.pixel_values([Image.new("RGB", (10, 20))]).dtype == torch.bfloat16


def test_pad_and_crop_preprocessing_differ(runtime):
    backbone = runtime.backbone
    tall = Image.new("RGB", (8, 32), (255, 0, 0))
    backbone.image_preprocess = "pad"
    padded = backbone.pixel_values([tall])
    backbone.image_preprocess = "crop"
    cropped = backbone.pixel_values([tall])
    backbone.image_preprocess = "pad"
    assert padded.shape == cropped.shape == (1, 3, 8, 8)
    # padding puts the mean colour at the sides; cropping keeps red everywhere
    assert not torch.allclose(padded[0, :, 4, 0], cropped[0, :, 4, 0])
    assert torch.allclose(cropped[0, :, 4, 0], cropped[0, :, 4, 4])


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_missing_and_foreign_models_are_clear(tmp_path):
    with pytest.raises(PlvmError, match="model folder not found"):
        load_backbone(str(tmp_path / "nope"), device="cpu")
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "bert")
    with pytest.raises(PlvmError, match="'bert' model"):
        load_backbone(str(tmp_path / "bert"), device="cpu")


def test_quantization_needs_bitsandbytes_and_a_gpu():
    with pytest.raises(PlvmError, match="bitsandbytes|CUDA"):
        load_backbone("llava-hf/llava-1.5-7b-hf", device="cpu", quantization="8bit")


def test_embed_images_is_normalised(runtime):
    vectors = runtime.backbone.embed_images([Image.new("RGB", (9, 9), (9, 99, 199)), Image.new("RGB", (9, 9))])
    assert vectors.shape == (2, runtime.backbone.config.vision_config.hidden_size)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
