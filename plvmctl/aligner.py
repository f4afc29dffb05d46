"""The PLVM Aligner and the reference encoder that feeds it.

The Aligner turns the reference encoder's tokens for ONE reference photo into a concept:

    photo ─► ReferenceEncoder (DINOv2) ─► tokens [B, 1+N, D] ─► Aligner ─► AlignerOutput
                                                                           word    [B, H]
                                                                           head    [B, H]
                                                                           context [B, k, H]

(D = encoder hidden size, H = the language model's hidden size, k = context tokens.)

Two layouts share one interface:

* ``paper``: as described in the PLVM paper. Two MLPs on the CLS token give ``word`` and
  ``head``; a small cross-attention transformer (k learnable queries reading the patch tokens)
  gives ``context``. About 128 M parameters for DINOv2-base → LLaVA-1.5-7B.
* ``released``: exactly the resampler of the authors' released checkpoint (parameter names and
  shapes included), so that checkpoint can be imported and run. It has k + 1 queries: query 0
  becomes ``word``, queries 1..k the context; an MLP on the raw CLS token gives ``head``.

On disk an Aligner is a folder holding ``config.json`` and ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from plvmctl.errors import PlvmError
from plvmctl.fileio import atomic_folder, sha256_file, write_bytes_atomic, write_json_atomic
from plvmctl.state_dict import read_state_dict

FORMAT_NAME = "plvmctl.aligner"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYOUTS = ("paper", "released")


# --------------------------------------------------------------------------------------------
# Configuration and output
# --------------------------------------------------------------------------------------------


@dataclass
class AlignerConfig:
    """Sizes of an Aligner. Only the fields of the chosen ``layout`` matter for its shape."""

    layout: str = "paper"  # "paper" | "released"
    encoder_dim: int = 768  # reference encoder hidden size (DINOv2-base)
    lm_dim: int = 4096  # language model hidden size (LLaVA-1.5-7B)
    num_context: int = 16  # k, the number of context tokens
    # paper layout
    mlp_hidden: int = 4096
    hidden: int = 1024
    depth: int = 4
    heads: int = 16
    ff_mult: int = 4
    # released layout (queries = num_context + 1, resampler width = encoder_dim)
    released_heads: int = 16
    released_dim_head: int = 64
    released_depth: int = 4
    released_ff_mult: int = 4
    head_mapping_hidden: int = 1024
    # informational
    encoder: str = ""  # which reference encoder it was trained with
    base_model: str = ""  # which language model

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise PlvmError if a field has the wrong type or an impossible value."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" or field.type is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise PlvmError(
                        f"Aligner config: {field.name} must be an integer, got {value!r}"
                    )
                if value <= 0:
                    raise PlvmError(f"Aligner config: {field.name} must be positive, got {value}")
            elif not isinstance(value, str):
                raise PlvmError(f"Aligner config: {field.name} must be a string, got {value!r}")
        if self.layout not in LAYOUTS:
            raise PlvmError(
                f"Aligner config: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}"
            )
        if self.layout == "paper" and self.hidden % self.heads != 0:
            raise PlvmError(
                f"Aligner config: hidden ({self.hidden}) must be divisible by heads ({self.heads})"
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AlignerConfig":
        """Build from a dict; unknown keys are an error (they usually mean a typo)."""
        if not isinstance(data, dict):
            raise PlvmError(f"Aligner config must be a mapping, got {type(data).__name__}")
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlvmError(
                f"Aligner config: unknown key(s) {', '.join(unknown)}; "
                f"known keys are {', '.join(sorted(known))}"
            )
        return cls(**data)


@dataclass
class AlignerOutput:
    """What the Aligner predicts for each reference photo of a batch."""

    word: torch.Tensor  # [B, lm_dim]   input embedding of <name>
    head: torch.Tensor  # [B, lm_dim]   output-head row of <name>
    context: torch.Tensor  # [B, k, lm_dim] the k context embeddings


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _cls_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Three linear layers with GELU between them (indices 0, 2, 4 hold the weights)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.Linear(hidden, hidden),
        nn.GELU(),
        nn.Linear(hidden, out_dim),
    )


class PaperCrossAttention(nn.Module):
    """Pre-LN multi-head cross-attention: queries attend to the patch tokens (no self-attention)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        # queries [B, k, C], patches [B, N, C] -> [B, k, C] (the residual is added by the caller)
        batch, num_q, dim = queries.shape
        num_p = patches.shape[1]
        dim_head = dim // self.heads
        q_in = self.norm_q(queries)
        kv_in = self.norm_kv(patches)
        # [B, L, C] -> [B, h, L, d]
        q = self.to_q(q_in).view(batch, num_q, self.heads, dim_head).transpose(1, 2)
        k = self.to_k(kv_in).view(batch, num_p, self.heads, dim_head).transpose(1, 2)
        v = self.to_v(kv_in).view(batch, num_p, self.heads, dim_head).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, k, d]
        out = out.transpose(1, 2).reshape(batch, num_q, dim)  # [B, k, C]
        return self.to_out(out)


class PaperBlock(nn.Module):
    """One block of the paper's context transformer: cross-attention then FFN, both residual."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.attn = PaperCrossAttention(dim, heads)
        self.ff = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, ff_mult * dim),
            nn.GELU(),
            nn.Linear(ff_mult * dim, dim),
        )

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        # queries [B, k, C], patches [B, N, C] -> [B, k, C]
        queries = queries + self.attn(queries, patches)
        queries = queries + self.ff(queries)
        return queries


class ReleasedAttention(nn.Module):
    """The released checkpoint's attention (IP-Adapter style "perceiver" attention).

    Keys and values come from the concatenation of the image tokens and the latents; q and k
    are each scaled by dim_head ** -0.25; softmax runs in float32.
    """

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)  # on the image tokens
        self.norm2 = nn.LayerNorm(dim)  # on the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # [B, L, h*d] -> [B, h, L, d]
        batch, length, _ = t.shape
        return t.view(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        # x [B, N, C] image tokens, latents [B, Q, C] -> [B, Q, C]
        x = self.norm1(x)
        latents = self.norm2(latents)
        batch, num_q, _ = latents.shape
        q = self.to_q(latents)  # [B, Q, h*d]
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)  # [B, N+Q, h*d] each
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        scale = self.dim_head**-0.25
        scores = (q * scale) @ (k * scale).transpose(-2, -1)  # [B, h, Q, N+Q]
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        out = weights @ v  # [B, h, Q, d]
        out = out.transpose(1, 2).reshape(batch, num_q, self.heads * self.dim_head)  # [B, Q, h*d]
        return self.to_out(out)


# --------------------------------------------------------------------------------------------
# The Aligner
# --------------------------------------------------------------------------------------------


class Aligner(nn.Module):
    """Reference-encoder tokens [B, 1+N, encoder_dim] -> AlignerOutput (word, head, context).

    The modules are registered directly on this class, so in the ``released`` layout the state
    dict keys are exactly those of the released checkpoint.
    """

    def __init__(self, config: AlignerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        enc, lm, k = config.encoder_dim, config.lm_dim, config.num_context
        if config.layout == "paper":
            self.word_mlp = _cls_mlp(enc, config.mlp_hidden, lm)
            self.head_mlp = _cls_mlp(enc, config.mlp_hidden, lm)
            self.queries = nn.Parameter(torch.randn(1, k, config.hidden) * 0.02)  # [1, k, C]
            self.patch_proj = nn.Linear(enc, config.hidden)
            self.blocks = nn.ModuleList(
                PaperBlock(config.hidden, config.heads, config.ff_mult) for _ in range(config.depth)
            )
            self.norm_out = nn.LayerNorm(config.hidden)
            self.proj_out = nn.Linear(config.hidden, lm)
        else:
            self.latents = nn.Parameter(torch.randn(1, k + 1, enc) / enc**0.5)  # [1, k+1, D]
            self.proj_in = nn.Linear(enc, enc)
            self.layers = nn.ModuleList(
                nn.ModuleList(
                    [
                        ReleasedAttention(enc, config.released_heads, config.released_dim_head),
                        nn.Sequential(
                            nn.LayerNorm(enc),
                            nn.Linear(enc, config.released_ff_mult * enc, bias=False),
                            nn.GELU(),
                            nn.Linear(config.released_ff_mult * enc, enc, bias=False),
                        ),
                    ]
                )
                for _ in range(config.released_depth)
            )
            self.proj_out = nn.Linear(enc, lm)
            self.norm_out = nn.LayerNorm(lm)
            self.linear_weight_mapping = _cls_mlp(enc, config.head_mapping_hidden, lm)

    def num_parameters(self) -> int:
        """Total number of parameters (works on the meta device too)."""
        return sum(p.numel() for p in self.parameters())

    def _check_tokens(self, tokens: torch.Tensor) -> None:
        expected = self.config.encoder_dim
        if tokens.dim() != 3 or tokens.shape[-1] != expected:
            trained = f" (trained with {self.config.encoder!r})" if self.config.encoder else ""
            raise PlvmError(
                f"the Aligner expects reference-encoder tokens of shape [batch, 1+patches, "
                f"{expected}]{trained} but got {list(tokens.shape)}: use the matching encoder"
            )
        if tokens.shape[1] < 2:
            raise PlvmError(
                f"the Aligner needs a CLS token plus patch tokens, got {tokens.shape[1]} token(s)"
            )

    def forward(self, tokens: torch.Tensor) -> AlignerOutput:
        # tokens [B, 1+N, D], token 0 = CLS
        self._check_tokens(tokens)
        if self.config.layout == "paper":
            return self._forward_paper(tokens)
        return self._forward_released(tokens)

    def _forward_paper(self, tokens: torch.Tensor) -> AlignerOutput:
        cls = tokens[:, 0]  # [B, D]
        word = self.word_mlp(cls)  # [B, H]
        head = self.head_mlp(cls)  # [B, H]
        patches = self.patch_proj(tokens[:, 1:])  # [B, N, C]
        queries = self.queries.expand(tokens.shape[0], -1, -1)  # [B, k, C]
        for block in self.blocks:
            queries = block(queries, patches)
        context = self.proj_out(self.norm_out(queries))  # [B, k, H]
        return AlignerOutput(word=word, head=head, context=context)

    def _forward_released(self, tokens: torch.Tensor) -> AlignerOutput:
        x = self.proj_in(tokens)  # [B, 1+N, D], all tokens, CLS included
        latents = self.latents.repeat(tokens.shape[0], 1, 1)  # [B, k+1, D]
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        out = self.norm_out(self.proj_out(latents))  # [B, k+1, H]
        head = self.linear_weight_mapping(tokens[:, 0])  # [B, H], from the raw CLS token
        return AlignerOutput(word=out[:, 0], head=head, context=out[:, 1:])


# --------------------------------------------------------------------------------------------
# Folder format: config.json + model.safetensors
# --------------------------------------------------------------------------------------------


def _is_aligner_folder(folder: Path) -> bool:
    """True when `folder` holds a config.json written by save_aligner."""
    try:
        data = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT_NAME


def save_aligner(aligner: Aligner, folder: str | os.PathLike) -> Path:
    """Write `aligner` to `folder` (config.json + model.safetensors), atomically.

    Both files are written into a temporary folder next to `folder`, which is then renamed
    into place; an existing Aligner folder is replaced only once the new one is complete.
    An existing folder that is not an Aligner (and not empty) is never replaced.
    """
    from safetensors.torch import save

    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise PlvmError(f"cannot save the Aligner to {folder}: it is a file, not a folder")
        if any(folder.iterdir()) and not _is_aligner_folder(folder):
            raise PlvmError(
                f"refusing to replace {folder}: it exists and is not a plvmctl Aligner folder"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    state = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in aligner.state_dict().items()
    }
    config = {**aligner.config.to_dict(), "format": FORMAT_NAME, "format_version": FORMAT_VERSION}

    with atomic_folder(folder) as tmp_dir:
        write_bytes_atomic(tmp_dir / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
        write_json_atomic(tmp_dir / CONFIG_FILE, config)
    return folder


def _shape_problems(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]]
) -> list[str]:
    """Describe every missing key, unexpected key and wrong shape (in a stable order)."""
    problems = [f"missing key '{key}'" for key in sorted(set(expected) - set(found))]
    problems += [f"unexpected key '{key}'" for key in sorted(set(found) - set(expected))]
    for key in sorted(set(found) & set(expected)):
        if tuple(found[key]) != tuple(expected[key]):
            problems.append(
                f"'{key}' has shape {list(found[key])}, expected {list(expected[key])}"
            )
    return problems


def _summarise(problems: list[str], limit: int = 5) -> str:
    """The first `limit` problems joined on one line, plus how many were left out."""
    text = "; ".join(problems[:limit])
    if len(problems) > limit:
        text += f"; and {len(problems) - limit} more"
    return text


def _missing_aligner_message(folder: Path) -> str:
    return (
        f"no Aligner at {folder}: import the released checkpoint with "
        f"`plvmctl aligner import CHECKPOINT --out {folder}` or train one with "
        f"`plvmctl train aligner --out {folder}`"
    )


def load_aligner_config(folder: str | os.PathLike) -> AlignerConfig:
    """Read and check `folder`/config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PlvmError(_missing_aligner_message(folder))
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise PlvmError(f"{folder} is not an Aligner folder: {CONFIG_FILE} is missing")
    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise PlvmError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else None
        raise PlvmError(f"{config_path} is not a plvmctl Aligner config (format {found!r})")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise PlvmError(
            f"{config_path} has format_version {version!r}; this plvmctl reads "
            f"version {FORMAT_VERSION}"
        )
    fields = {key: value for key, value in data.items() if key not in ("format", "format_version")}
    return AlignerConfig.from_dict(fields)


def load_aligner(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Aligner:
    """Load an Aligner folder written by save_aligner, checking every key and shape."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = load_aligner_config(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PlvmError(f"{folder} is not a complete Aligner folder: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise PlvmError(f"{weights_path} is not a readable safetensors file: {exc}") from None

    with torch.device("meta"):
        aligner = Aligner(config)
    expected = {name: tuple(t.shape) for name, t in aligner.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    problems = _shape_problems(found, expected)
    if problems:
        raise PlvmError(
            f"{weights_path} does not match its config.json ({len(problems)} problem(s)): "
            f"{_summarise(problems)}"
        )
    aligner.load_state_dict(state, strict=True, assign=True)
    return aligner.to(device=device, dtype=dtype).eval()


def aligner_sha256(folder: str | os.PathLike) -> str:
    """The sha256 of the Aligner's model.safetensors (its identity in .concept files)."""
    weights_path = Path(folder) / WEIGHTS_FILE
    if not weights_path.is_file():
        raise PlvmError(_missing_aligner_message(Path(folder)))
    return sha256_file(weights_path)


# --------------------------------------------------------------------------------------------
# Importing the released PLVM checkpoint
# --------------------------------------------------------------------------------------------


def released_key_shapes(config: AlignerConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a released-layout Aligner with its shape, written out from the sizes."""
    enc, lm = config.encoder_dim, config.lm_dim
    inner = config.released_heads * config.released_dim_head
    ff = config.released_ff_mult * enc
    mid = config.head_mapping_hidden
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, config.num_context + 1, enc),
        "proj_in.weight": (enc, enc),
        "proj_in.bias": (enc,),
    }
    for i in range(config.released_depth):
        attn, ffn = f"layers.{i}.0", f"layers.{i}.1"
        shapes.update(
            {
                f"{attn}.norm1.weight": (enc,),
                f"{attn}.norm1.bias": (enc,),
                f"{attn}.norm2.weight": (enc,),
                f"{attn}.norm2.bias": (enc,),
                f"{attn}.to_q.weight": (inner, enc),
                f"{attn}.to_kv.weight": (2 * inner, enc),
                f"{attn}.to_out.weight": (enc, inner),
                f"{ffn}.0.weight": (enc,),
                f"{ffn}.0.bias": (enc,),
                f"{ffn}.1.weight": (ff, enc),
                f"{ffn}.3.weight": (enc, ff),
            }
        )
    shapes.update(
        {
            "proj_out.weight": (lm, enc),
            "proj_out.bias": (lm,),
            "norm_out.weight": (lm,),
            "norm_out.bias": (lm,),
            "linear_weight_mapping.0.weight": (mid, enc),
            "linear_weight_mapping.0.bias": (mid,),
            "linear_weight_mapping.2.weight": (mid, mid),
            "linear_weight_mapping.2.bias": (mid,),
            "linear_weight_mapping.4.weight": (lm, mid),
            "linear_weight_mapping.4.bias": (lm,),
        }
    )
    return shapes


#: The keys and shapes of the checkpoint the PLVM authors released (DINOv2-base → LLaVA-1.5-7B).
RELEASED_KEYS: dict[str, tuple[int, ...]] = released_key_shapes(AlignerConfig(layout="released"))


def import_released_checkpoint(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    encoder: str = "facebook/dinov2-base",
    base_model: str = "llava-hf/llava-1.5-7b-hf",
    config: AlignerConfig | None = None,
) -> Path:
    """Convert the authors' released checkpoint into an Aligner folder at `out_dir`.

    encoder_dim, lm_dim and num_context are read from the `latents` and `proj_out` shapes; the
    other sizes (heads × dim_head, depth, ff_mult, head-mapping width) come from `config`
    (default: the released 16 × 64, 4 blocks, ×4, 1024). Every key and shape is checked.
    """
    checkpoint_path = Path(checkpoint_path)
    state = read_state_dict(checkpoint_path)
    latents = state.get("latents")
    proj_out = state.get("proj_out.weight")
    if latents is None or proj_out is None or latents.dim() != 3 or proj_out.dim() != 2:
        keys = ", ".join(repr(key) for key in list(state)[:3])
        raise PlvmError(
            f"{checkpoint_path} is a state dict of another model ({len(state)} tensors: {keys}"
            f"{', ...' if len(state) > 3 else ''}); the released PLVM Aligner has "
            f"'latents' [1, k+1, D] and 'proj_out.weight' [H, D]"
        )
    template = config if config is not None else AlignerConfig(layout="released")
    if latents.shape[1] < 2:
        raise PlvmError(f"{checkpoint_path}: 'latents' has {latents.shape[1]} query, need >= 2")
    fields = {
        **template.to_dict(),
        "layout": "released",
        "encoder_dim": int(latents.shape[2]),
        "lm_dim": int(proj_out.shape[0]),
        "num_context": int(latents.shape[1]) - 1,
        "encoder": encoder,
        "base_model": base_model,
    }
    resolved = AlignerConfig.from_dict(fields)
    problems = _shape_problems(
        {name: tuple(t.shape) for name, t in state.items()}, released_key_shapes(resolved)
    )
    if problems:
        raise PlvmError(
            f"{checkpoint_path} does not match the released PLVM Aligner layout "
            f"({len(problems)} problem(s)): {_summarise(problems)} (sizes assumed: "
            f"{resolved.released_heads} heads x {resolved.released_dim_head}, depth "
            f"{resolved.released_depth}, ff x{resolved.released_ff_mult}, head mapping "
            f"{resolved.head_mapping_hidden})"
        )
    aligner = Aligner(resolved)
    with torch.no_grad():
        aligner.load_state_dict(state, strict=True)
    return save_aligner(aligner, out_dir)


# --------------------------------------------------------------------------------------------
# The reference encoder
# --------------------------------------------------------------------------------------------


class ReferenceEncoder:
    """A frozen vision model (DINOv2 by default) + its image processor.

    `encode` returns the model's `last_hidden_state`, whose token 0 is the CLS token.
    """

    def __init__(self, model: nn.Module, image_processor: Any, name: str | None = None) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        self._name = name

    @property
    def hidden_size(self) -> int:
        """D, the width of every token."""
        return int(self.model.config.hidden_size)

    @property
    def name(self) -> str:
        """Where the encoder came from (hub id or folder), for provenance."""
        if self._name:
            return self._name
        return str(getattr(self.model.config, "_name_or_path", "") or "")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, images: list) -> torch.Tensor:
        """PIL images -> tokens [B, 1+N, D] (CLS first), computed without gradients."""
        if not images:
            raise PlvmError("the reference encoder needs at least one image")
        self.model.eval()
        rgb = [image.convert("RGB") for image in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt")["pixel_values"]
        pixels = pixels.to(device=self.device, dtype=self.dtype)  # [B, 3, S, S]
        with torch.no_grad():
            return self.model(pixel_values=pixels).last_hidden_state  # [B, 1+N, D]


def load_reference_encoder(
    source: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ReferenceEncoder:
    """Load a vision model and its image processor from a hub id or a local folder."""
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(source, dtype=dtype)
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as exc:  # hub, file and config errors all land here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlvmError(
            f"cannot load reference encoder {source!r}: {reason}. Pass a local folder or make "
            f"sure the hub cache has it"
        ) from None
    model.requires_grad_(False)
    return ReferenceEncoder(model.to(device), processor, name=source)
