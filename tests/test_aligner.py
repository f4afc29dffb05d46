"""Tests for plvmctl.aligner: both layouts, the folder format, the released import, the encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plvmctl.aligner import (
    RELEASED_KEYS,
    Aligner,
    AlignerConfig,
    AlignerOutput,
    ReferenceEncoder,
    aligner_sha256,
    import_released_checkpoint,
    load_aligner,
    load_reference_encoder,
    released_key_shapes,
    save_aligner,
)
from plvmctl.errors import PlvmError

ENC, LM, K = 32, 48, 4


def tiny_config(layout: str) -> AlignerConfig:
    """Small sizes for fast tests (both layouts' fields filled in)."""
    return AlignerConfig(
        layout=layout,
        encoder_dim=ENC,
        lm_dim=LM,
        num_context=K,
        mlp_hidden=40,
        hidden=24,
        depth=2,
        heads=4,
        ff_mult=2,
        released_heads=2,
        released_dim_head=16,
        released_depth=2,
        released_ff_mult=4,
        head_mapping_hidden=20,
    )


def random_tokens(batch: int = 3, patches: int = 9, dim: int = ENC) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1 + patches, dim, generator=gen)  # [B, 1+N, D]


# ---------------------------------------------------------------------------- config


def test_config_round_trip_and_unknown_keys():
    config = tiny_config("released")
    assert AlignerConfig.from_dict(config.to_dict()) == config
    with pytest.raises(PlvmError, match="unknown key.*num_ctx"):
        AlignerConfig.from_dict({**config.to_dict(), "num_ctx": 3})
    with pytest.raises(PlvmError, match="layout"):
        AlignerConfig(layout="other")
    with pytest.raises(PlvmError, match="num_context"):
        AlignerConfig(num_context=0)
    with pytest.raises(PlvmError, match="divisible"):
        AlignerConfig(hidden=30, heads=4)


# ---------------------------------------------------------------------------- both layouts


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_output_shapes(layout):
    torch.manual_seed(0)
    aligner = Aligner(tiny_config(layout))
    out = aligner(random_tokens(batch=3, patches=9))
    assert isinstance(out, AlignerOutput)
    assert out.word.shape == (3, LM)
    assert out.head.shape == (3, LM)
    assert out.context.shape == (3, K, LM)
    assert torch.isfinite(out.context).all()


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_each_photo_is_independent_of_the_rest_of_the_batch(layout):
    torch.manual_seed(0)
    aligner = Aligner(tiny_config(layout)).eval()
    tokens = random_tokens(batch=3)
    together = aligner(tokens)
    alone = aligner(tokens[1:2])
    torch.testing.assert_close(together.context[1:2], alone.context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(together.word[1:2], alone.word, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_gradients_reach_every_parameter(layout):
    torch.manual_seed(0)
    aligner = Aligner(tiny_config(layout))
    out = aligner(random_tokens())
    # random projections: a plain sum of LayerNorm outputs would have zero gradient
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen)).sum() for t in (out.word, out.head, out.context)
    )
    loss.backward()
    for name, param in aligner.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_wrong_encoder_width_is_a_clear_error():
    aligner = Aligner(tiny_config("paper"))
    with pytest.raises(PlvmError, match=f"{ENC}"):
        aligner(random_tokens(dim=ENC + 1))


def test_released_layout_has_exactly_the_documented_keys():
    config = tiny_config("released")
    aligner = Aligner(config)
    shapes = {name: tuple(t.shape) for name, t in aligner.state_dict().items()}
    assert shapes == released_key_shapes(config)
    # the real table from the released checkpoint
    assert RELEASED_KEYS["latents"] == (1, 17, 768)
    assert RELEASED_KEYS["layers.3.0.to_kv.weight"] == (2048, 768)
    assert RELEASED_KEYS["layers.0.1.3.weight"] == (768, 3072)
    assert RELEASED_KEYS["linear_weight_mapping.4.weight"] == (4096, 1024)
    assert len(RELEASED_KEYS) == 3 + 4 * 11 + 4 + 6


# ---------------------------------------------------------------------------- folder format


@pytest.mark.parametrize("layout", ["paper", "released"])
def test_save_load_round_trip(tmp_path, layout):
    torch.manual_seed(0)
    aligner = Aligner(tiny_config(layout)).eval()
    folder = save_aligner(aligner, tmp_path / "aligner")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == "plvmctl.aligner" and config["format_version"] == 1
    loaded = load_aligner(folder)
    assert loaded.config == aligner.config
    tokens = random_tokens()
    with torch.no_grad():
        a, b = aligner(tokens), loaded(tokens)
    assert torch.equal(a.word, b.word)
    assert torch.equal(a.head, b.head)
    assert torch.equal(a.context, b.context)
    assert len(aligner_sha256(folder)) == 64


def test_save_replaces_an_existing_aligner_and_leaves_no_temp_files(tmp_path):
    torch.manual_seed(0)
    first = Aligner(tiny_config("released"))
    second = Aligner(tiny_config("released"))
    save_aligner(first, tmp_path / "a")
    sha_first = aligner_sha256(tmp_path / "a")
    save_aligner(second, tmp_path / "a")
    assert aligner_sha256(tmp_path / "a") != sha_first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    torch.testing.assert_close(load_aligner(tmp_path / "a").latents, second.latents)


def test_save_refuses_to_replace_a_foreign_folder(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "me.jpg").write_bytes(b"not yours")
    with pytest.raises(PlvmError, match="not a plvmctl Aligner folder"):
        save_aligner(Aligner(tiny_config("paper")), other)
    assert (other / "me.jpg").read_bytes() == b"not yours"


def test_failed_save_keeps_the_old_folder(tmp_path, monkeypatch):
    aligner = Aligner(tiny_config("released"))
    folder = save_aligner(aligner, tmp_path / "a")
    before = aligner_sha256(folder)

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_aligner(Aligner(tiny_config("released")), folder)
    assert aligner_sha256(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_missing_folder_says_how_to_get_one(tmp_path):
    with pytest.raises(PlvmError) as info:
        load_aligner(tmp_path / "nowhere")
    message = str(info.value)
    assert "no Aligner at" in message
    assert "aligner import" in message
    assert "train aligner" in message


def _resave(folder: Path, mutate) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    mutate(state)
    save_file(state, str(folder / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path):
    folder = save_aligner(Aligner(tiny_config("released")), tmp_path / "a")
    _resave(folder, lambda state: state.pop("layers.1.0.to_q.weight"))
    with pytest.raises(PlvmError, match=r"missing key 'layers\.1\.0\.to_q\.weight'"):
        load_aligner(folder)


def test_unexpected_tensor_is_named(tmp_path):
    folder = save_aligner(Aligner(tiny_config("paper")), tmp_path / "a")
    _resave(folder, lambda state: state.update(extra=torch.zeros(2)))
    with pytest.raises(PlvmError, match="unexpected key 'extra'"):
        load_aligner(folder)


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    folder = save_aligner(Aligner(tiny_config("paper")), tmp_path / "a")
    _resave(folder, lambda state: state.update(queries=torch.zeros(1, K + 1, 24)))
    with pytest.raises(PlvmError) as info:
        load_aligner(folder)
    message = str(info.value)
    assert "'queries'" in message and "[1, 5, 24]" in message and "[1, 4, 24]" in message


def test_garbage_weights_file(tmp_path):
    folder = save_aligner(Aligner(tiny_config("paper")), tmp_path / "a")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(PlvmError, match="not a readable safetensors file"):
        load_aligner(folder)


def test_missing_weights_and_bad_config(tmp_path):
    folder = save_aligner(Aligner(tiny_config("paper")), tmp_path / "a")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PlvmError, match="model.safetensors is missing"):
        load_aligner(folder)
    with pytest.raises(PlvmError, match="no Aligner at"):
        aligner_sha256(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PlvmError, match="not valid JSON"):
        load_aligner(folder)
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PlvmError, match="not a plvmctl Aligner config"):
        load_aligner(folder)
    (folder / "config.json").unlink()
    with pytest.raises(PlvmError, match="config.json is missing"):
        load_aligner(folder)


def test_load_casts_to_the_requested_dtype(tmp_path):
    folder = save_aligner(Aligner(tiny_config("released")), tmp_path / "a")
    loaded = load_aligner(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    out = loaded(random_tokens().to(torch.bfloat16))
    assert out.context.dtype == torch.bfloat16


# ---------------------------------------------------------------------------- released import


HEADS, DIM_HEAD, DEPTH, FF, MAP = 2, 16, 2, 4 * ENC, 20


def released_import_config() -> AlignerConfig:
    """The sizes the importer cannot read from the shapes (heads split, depth, ...)."""
    return AlignerConfig(
        layout="released",
        released_heads=HEADS,
        released_dim_head=DIM_HEAD,
        released_depth=DEPTH,
        released_ff_mult=4,
        head_mapping_hidden=MAP,
    )


def fake_released_state() -> dict[str, torch.Tensor]:
    """A state dict written out by hand with the documented names and small shapes."""
    gen = torch.Generator().manual_seed(42)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.2

    inner = HEADS * DIM_HEAD
    state = {
        "latents": rand(1, K + 1, ENC),
        "proj_in.weight": rand(ENC, ENC),
        "proj_in.bias": rand(ENC),
    }
    for i in range(DEPTH):
        state[f"layers.{i}.0.norm1.weight"] = 1 + rand(ENC)
        state[f"layers.{i}.0.norm1.bias"] = rand(ENC)
        state[f"layers.{i}.0.norm2.weight"] = 1 + rand(ENC)
        state[f"layers.{i}.0.norm2.bias"] = rand(ENC)
        state[f"layers.{i}.0.to_q.weight"] = rand(inner, ENC)
        state[f"layers.{i}.0.to_kv.weight"] = rand(2 * inner, ENC)
        state[f"layers.{i}.0.to_out.weight"] = rand(ENC, inner)
        state[f"layers.{i}.1.0.weight"] = 1 + rand(ENC)
        state[f"layers.{i}.1.0.bias"] = rand(ENC)
        state[f"layers.{i}.1.1.weight"] = rand(FF, ENC)
        state[f"layers.{i}.1.3.weight"] = rand(ENC, FF)
    state["proj_out.weight"] = rand(LM, ENC)
    state["proj_out.bias"] = rand(LM)
    state["norm_out.weight"] = 1 + rand(LM)
    state["norm_out.bias"] = rand(LM)
    state["linear_weight_mapping.0.weight"] = rand(MAP, ENC)
    state["linear_weight_mapping.0.bias"] = rand(MAP)
    state["linear_weight_mapping.2.weight"] = rand(MAP, MAP)
    state["linear_weight_mapping.2.bias"] = rand(MAP)
    state["linear_weight_mapping.4.weight"] = rand(LM, MAP)
    state["linear_weight_mapping.4.bias"] = rand(LM)
    return state


def reference_released_forward(s: dict[str, torch.Tensor], tokens: torch.Tensor):
    """The released resampler written out plainly, one batch element at a time."""
    words, heads, contexts = [], [], []
    for b in range(tokens.shape[0]):
        t = tokens[b]  # [1+N, D]
        x = t @ s["proj_in.weight"].T + s["proj_in.bias"]  # [1+N, D]
        lat = s["latents"][0].clone()  # [Q, D]
        for i in range(DEPTH):
            p = f"layers.{i}."
            xn = F.layer_norm(x, (ENC,), s[p + "0.norm1.weight"], s[p + "0.norm1.bias"], 1e-5)
            ln = F.layer_norm(lat, (ENC,), s[p + "0.norm2.weight"], s[p + "0.norm2.bias"], 1e-5)
            q = ln @ s[p + "0.to_q.weight"].T  # [Q, h*d]
            kv = torch.cat([xn, ln]) @ s[p + "0.to_kv.weight"].T  # [N+1+Q, 2*h*d]
            k, v = kv[:, : HEADS * DIM_HEAD], kv[:, HEADS * DIM_HEAD :]
            head_outputs = []
            for h in range(HEADS):
                cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
                scores = (q[:, cols] @ k[:, cols].T) / math.sqrt(DIM_HEAD)  # [Q, N+1+Q]
                head_outputs.append(torch.softmax(scores, dim=-1) @ v[:, cols])  # [Q, d]
            attn = torch.cat(head_outputs, dim=1) @ s[p + "0.to_out.weight"].T  # [Q, D]
            lat = lat + attn
            hidden = F.layer_norm(lat, (ENC,), s[p + "1.0.weight"], s[p + "1.0.bias"], 1e-5)
            hidden = F.gelu(hidden @ s[p + "1.1.weight"].T) @ s[p + "1.3.weight"].T
            lat = lat + hidden
        out = lat @ s["proj_out.weight"].T + s["proj_out.bias"]  # [Q, H]
        out = F.layer_norm(out, (LM,), s["norm_out.weight"], s["norm_out.bias"], 1e-5)
        cls = t[0]
        m = F.gelu(cls @ s["linear_weight_mapping.0.weight"].T + s["linear_weight_mapping.0.bias"])
        m = F.gelu(m @ s["linear_weight_mapping.2.weight"].T + s["linear_weight_mapping.2.bias"])
        m = m @ s["linear_weight_mapping.4.weight"].T + s["linear_weight_mapping.4.bias"]
        words.append(out[0])
        contexts.append(out[1:])
        heads.append(m)
    return torch.stack(words), torch.stack(heads), torch.stack(contexts)


def test_released_import_matches_a_plain_reimplementation(tmp_path):
    state = fake_released_state()
    ckpt = tmp_path / "checkpoint.ckpt"
    torch.save(state, ckpt)
    folder = import_released_checkpoint(ckpt, tmp_path / "plvm", config=released_import_config())
    aligner = load_aligner(folder)
    assert aligner.config.layout == "released"
    assert (aligner.config.encoder_dim, aligner.config.lm_dim, aligner.config.num_context) == (
        ENC,
        LM,
        K,
    )
    assert aligner.config.encoder == "facebook/dinov2-base"
    assert aligner.config.base_model == "llava-hf/llava-1.5-7b-hf"
    tokens = random_tokens(batch=2, patches=6)
    with torch.no_grad():
        out = aligner(tokens)
    word, head, context = reference_released_forward(state, tokens)
    torch.testing.assert_close(out.word, word, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.head, head, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.context, context, rtol=1e-4, atol=1e-5)


def test_released_import_accepts_wrappers_and_module_prefix(tmp_path):
    state = fake_released_state()
    ckpt = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    folder = import_released_checkpoint(ckpt, tmp_path / "plvm", config=released_import_config())
    loaded = load_aligner(folder)
    assert torch.equal(loaded.latents, state["latents"])
    ckpt2 = tmp_path / "model.ckpt"
    torch.save({"model": state, "epoch": 3}, ckpt2)
    folder2 = import_released_checkpoint(ckpt2, tmp_path / "plvm2", config=released_import_config())
    assert aligner_sha256(folder2) == aligner_sha256(folder)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda s: s.pop("layers.1.0.to_kv.weight"), r"missing key 'layers\.1\.0\.to_kv\.weight'"),
        (
            lambda s: s.update({"layers.0.0.to_k.weight": torch.zeros(3)}),
            "unexpected key 'layers.0.0.to_k.weight'",
        ),
        (
            lambda s: s.update({"layers.0.1.1.weight": torch.zeros(FF + 1, ENC)}),
            r"'layers\.0\.1\.1\.weight' has shape \[129, 32\], expected \[128, 32\]",
        ),
    ],
)
def test_released_import_rejects_mismatches(tmp_path, mutate, expected):
    state = fake_released_state()
    mutate(state)
    ckpt = tmp_path / "bad.ckpt"
    torch.save(state, ckpt)
    with pytest.raises(PlvmError, match=expected):
        import_released_checkpoint(ckpt, tmp_path / "plvm", config=released_import_config())
    assert not (tmp_path / "plvm").exists()


def test_released_import_lists_first_problems_and_count(tmp_path):
    state = fake_released_state()
    for i in range(DEPTH):
        state.pop(f"layers.{i}.0.norm1.weight")
        state.pop(f"layers.{i}.0.norm1.bias")
        state.pop(f"layers.{i}.0.norm2.weight")
    ckpt = tmp_path / "bad.ckpt"
    torch.save(state, ckpt)
    with pytest.raises(PlvmError, match=r"\(6 problem\(s\)\).*and 1 more"):
        import_released_checkpoint(ckpt, tmp_path / "plvm", config=released_import_config())


def test_released_import_with_default_heads_rejects_a_mismatched_split(tmp_path):
    # with the released defaults (16 x 64, depth 4) a small depth-2 checkpoint cannot match:
    # the error names the missing block and the sizes it assumed
    ckpt = tmp_path / "small.ckpt"
    torch.save(fake_released_state(), ckpt)
    with pytest.raises(PlvmError) as info:
        import_released_checkpoint(ckpt, tmp_path / "plvm")
    message = str(info.value)
    assert "missing key 'layers.2.0.norm1.bias'" in message
    assert "sizes assumed: 16 heads x 64, depth 4, ff x4, head mapping 1024" in message


def test_released_import_rejects_non_state_dicts(tmp_path):
    not_a_dict = tmp_path / "list.ckpt"
    torch.save([1, 2, 3], not_a_dict)
    with pytest.raises(PlvmError, match="not a state dict"):
        import_released_checkpoint(not_a_dict, tmp_path / "out")
    noise = tmp_path / "noise.ckpt"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(PlvmError, match="not a PyTorch file"):
        import_released_checkpoint(noise, tmp_path / "out")
    with pytest.raises(PlvmError, match="no checkpoint file"):
        import_released_checkpoint(tmp_path / "absent.ckpt", tmp_path / "out")
    no_latents = tmp_path / "other.ckpt"
    torch.save({"weight": torch.zeros(2)}, no_latents)
    with pytest.raises(PlvmError, match="latents"):
        import_released_checkpoint(no_latents, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _bad_checkpoints(folder: Path) -> dict[str, Path]:
    """One file of every kind `aligner import` must refuse, by kind."""
    files = {kind: folder / f"{kind}.ckpt" for kind in
             ("empty", "text", "jpeg", "module", "truncated", "old-truncated", "other-layout")}
    files["empty"].write_bytes(b"")
    files["text"].write_text("hello, this is a note\n")
    files["jpeg"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    torch.save(torch.nn.Linear(2, 2), files["module"])
    torch.save({"latents": torch.zeros(1, 3, 4)}, folder / "whole.ckpt")
    files["truncated"].write_bytes((folder / "whole.ckpt").read_bytes()[:300])
    torch.save({"latents": torch.zeros(1, 3, 4)}, folder / "old.ckpt", _use_new_zipfile_serialization=False)
    files["old-truncated"].write_bytes((folder / "old.ckpt").read_bytes()[:40])
    torch.save({"encoder.weight": torch.zeros(2, 2), "encoder.bias": torch.zeros(2)}, files["other-layout"])
    return files


@pytest.mark.parametrize("kind, says", [
    ("empty", "is empty (0 bytes)"),
    ("text", "is not a PyTorch file"),
    ("jpeg", "is not a PyTorch file"),
    ("module", "holds pickled Python objects"),
    ("truncated", "is a damaged or truncated PyTorch file"),
    ("old-truncated", "is a damaged or truncated PyTorch file"),
    ("other-layout", "is a state dict of another model (2 tensors: 'encoder.weight', 'encoder.bias')"),
])
def test_every_kind_of_bad_checkpoint_gets_one_clear_line(tmp_path, kind, says):
    path = _bad_checkpoints(tmp_path)[kind]
    with pytest.raises(PlvmError) as info:
        import_released_checkpoint(path, tmp_path / "out")
    message = str(info.value)
    assert says in message and str(path) in message
    assert "\n" not in message and "weights_only=False" not in message
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- real sizes on meta


def llava15_7b_config():
    """A config equal to llava-hf/llava-1.5-7b-hf (no download)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    return LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=32000,
        pad_token_id=32001,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        tie_word_embeddings=False,
    )


def linear(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def layer_norm(d: int) -> int:
    return 2 * d


def test_real_sizes_parameter_counts_on_meta():
    from transformers import LlavaForConditionalGeneration

    enc, lm, k = 768, 4096, 16  # dinov2-base, LLaVA-1.5-7B, paper's k
    with torch.device("meta"):
        paper = Aligner(AlignerConfig(layout="paper", encoder_dim=enc, lm_dim=lm, num_context=k))
        released = Aligner(
            AlignerConfig(layout="released", encoder_dim=enc, lm_dim=lm, num_context=k)
        )

    # paper layout: two CLS MLPs 768 -> 4096 -> 4096 -> 4096
    mlp = linear(768, 4096) + linear(4096, 4096) + linear(4096, 4096)
    assert mlp == 36_712_448
    # context transformer, width 1024: queries, patch projection, 4 x (LN q, LN kv, q/k/v/out,
    # LN + FFN 1024 -> 4096 -> 1024), final LN, 1024 -> 4096
    attn = 2 * layer_norm(1024) + 4 * linear(1024, 1024)
    ffn = layer_norm(1024) + linear(1024, 4096) + linear(4096, 1024)
    transformer = 16 * 1024 + linear(768, 1024) + 4 * (attn + ffn)
    transformer += layer_norm(1024) + linear(1024, 4096)
    expected_paper = 2 * mlp + transformer
    assert expected_paper == 128_822_272
    assert paper.num_parameters() == expected_paper

    # released layout: 17 latents of 768, proj_in, 4 x (2 LN, q 768->1024, kv 768->2048,
    # out 1024->768, LN + 768->3072->768 without bias), proj_out 768->4096, LN 4096, head MLP
    block = 2 * layer_norm(768) + linear(768, 1024, False) + linear(768, 2048, False)
    block += linear(1024, 768, False) + layer_norm(768) + 2 * linear(768, 3072, False)
    head_mlp = linear(768, 1024) + linear(1024, 1024) + linear(1024, 4096)
    expected_released = 17 * 768 + linear(768, 768) + 4 * block
    expected_released += linear(768, 4096) + layer_norm(4096) + head_mlp
    assert expected_released == 41_272_832
    assert released.num_parameters() == expected_released
    assert sum(math.prod(shape) for shape in RELEASED_KEYS.values()) == expected_released

    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(llava15_7b_config())
    llava_params = sum(p.numel() for p in llava.parameters())
    assert abs(llava_params - 7_063_000_000) / 7_063_000_000 < 0.01
    paper_share = 100 * expected_paper / llava_params
    released_share = 100 * expected_released / llava_params
    print(
        f"\nLLaVA-1.5-7B {llava_params:,} parameters; paper Aligner {expected_paper:,} "
        f"({paper_share:.2f} %); released Aligner {expected_released:,} ({released_share:.2f} %)"
    )
    assert 1.7 < paper_share < 1.9  # the paper reports 1.8 %


def llava_onevision_7b_config():
    """A config equal to llava-hf/llava-onevision-qwen2-7b-ov-hf (no download): Qwen2-7B's
    text config and SigLIP so400m-patch14-384 with its last layer dropped (26 of 27 layers,
    features from the last kept one: transformers' LlavaOnevisionConfig defaults)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    text = Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=151646,
        video_token_index=151647,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def test_onevision_7b_parameter_counts_on_meta():
    """The paper-layout Aligner for OV-7B (output 3,584) next to LLaVA-1.5-7B's (4,096)."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    enc, k = 768, 16
    with torch.device("meta"):
        for_onevision = Aligner(AlignerConfig(layout="paper", encoder_dim=enc, lm_dim=3584, num_context=k))
        onevision = LlavaOnevisionForConditionalGeneration(llava_onevision_7b_config())
        llava = LlavaForConditionalGeneration(llava15_7b_config())
    # two CLS MLPs 768 -> 4096 -> 4096 -> 3584; the context transformer (width 1024) as for
    # LLaVA-1.5 up to its last projection, 1024 -> 3584
    mlp = linear(768, 4096) + linear(4096, 4096) + linear(4096, 3584)
    attn = 2 * layer_norm(1024) + 4 * linear(1024, 1024)
    ffn = layer_norm(1024) + linear(1024, 4096) + linear(4096, 1024)
    transformer = 16 * 1024 + linear(768, 1024) + 4 * (attn + ffn) + layer_norm(1024) + linear(1024, 3584)
    expected = 2 * mlp + transformer
    assert expected == 124_102_144
    assert for_onevision.num_parameters() == expected

    onevision_params = sum(p.numel() for p in onevision.parameters())
    llava_params = sum(p.numel() for p in llava.parameters())
    # Qwen2-7B 7.62 B + SigLIP (26 layers) 0.40 B + projector 0.017 B
    assert 8.0e9 < onevision_params < 8.05e9
    share = 100 * expected / onevision_params
    llava_share = 100 * 128_822_272 / llava_params
    print(f"\nLLaVA-OneVision-7B {onevision_params:,} parameters; paper Aligner {expected:,} ({share:.2f} %)"
          f"\nLLaVA-1.5-7B       {llava_params:,} parameters; paper Aligner 128,822,272 ({llava_share:.2f} %)")
    assert 1.5 < share < 1.6 and share < llava_share


# ---------------------------------------------------------------------------- reference encoder


@pytest.fixture
def tiny_encoder_dir(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        image_size=28,
        patch_size=14,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    folder = tmp_path / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28})
    processor.save_pretrained(folder)
    return folder


def test_reference_encoder_feeds_the_aligner(tiny_encoder_dir):
    from PIL import Image

    encoder = load_reference_encoder(str(tiny_encoder_dir))
    assert isinstance(encoder, ReferenceEncoder)
    assert encoder.hidden_size == 32
    assert encoder.name == str(tiny_encoder_dir)
    red = Image.new("RGB", (40, 50), (200, 20, 20))
    grey = Image.new("L", (30, 30), 128)  # converted to RGB by the encoder
    tokens = encoder.encode([red, grey])
    assert tokens.shape == (2, 1 + 4, 32)  # CLS + 2 x 2 patches
    assert not tokens.requires_grad
    assert not torch.allclose(tokens[0], tokens[1])
    # the same photo alone gives the same tokens
    torch.testing.assert_close(encoder.encode([red])[0], tokens[0], rtol=1e-5, atol=1e-5)
    out = Aligner(tiny_config("released"))(tokens)
    assert out.context.shape == (2, K, LM)


def test_reference_encoder_load_failure_is_a_plvm_error(tmp_path):
    with pytest.raises(PlvmError, match="cannot load reference encoder"):
        load_reference_encoder(str(tmp_path / "missing-encoder"))
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    )
    encoder = ReferenceEncoder(Dinov2Model(config), image_processor=None)
    with pytest.raises(PlvmError, match="at least one image"):
        encoder.encode([])


def test_real_dinov2_base_feeds_the_real_aligner_on_meta():
    """DINOv2-base (fed 224 px, patch 14) → 1 CLS + 256 patch tokens of 768 → the paper Aligner."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, image_size=518, patch_size=14)  # as on the hub
    with torch.device("meta"):
        encoder = Dinov2Model(config)
        tokens = encoder(pixel_values=torch.empty(1, 3, 224, 224)).last_hidden_state
        aligner = Aligner(AlignerConfig(layout="paper", encoder_dim=768, lm_dim=4096, num_context=16))
        output = aligner(tokens)
    assert tokens.shape == (1, 257, 768)
    assert sum(p.numel() for p in encoder.parameters()) == 86_580_480  # dinov2-base: 86.6 M
    assert output.word.shape == output.head.shape == (1, 4096)
    assert output.context.shape == (1, 16, 4096)
