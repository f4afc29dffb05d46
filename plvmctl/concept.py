"""Concepts and the `.concept` file format (the folder of them is store.py).

A concept is three tensors in the LM's hidden size H:

    word     [H]     the input embedding of `<name>`
    head     [H]     its output-head row, so the model can say `<name>`
    context  [k, H]  the k soft tokens of the sentence `<name> is <t1>…<tk>.`

and, for methods that recognise the concept in the photo first:

    visual   [m, H]  tokens placed right after a photo's image tokens when the concept is
                     recognised in that photo (by its method's ask-time hook); m = 0 otherwise
    parts    {key: tensor}  what its method needs at ask time (e.g. MyVLM's concept head,
                     plvmctl/methods/myvlm/concept_head.py)

and, for finding the concept in photos nobody named it in (concept_index.py, recognise.py):

    parts["retrieval.key"]  [D]  the L2-normalised reference-encoder CLS vector of its
                     reference photo (of its photos' mean, for trained concepts)

However it was made (the Aligner or a trained method, plvmctl/methods), a concept is used
the same way. On disk it is a safetensors file (never a pickle) whose string metadata says
what it is and which model it belongs to; loading checks all of it. A concept with visual
tokens or parts is written as format version 2, every other one as version 1, so a plvmctl
that reads only version 1 refuses a concept with visual tokens instead of using it without
its parts. A retrieval key is a part too: concepts encoded now are version 2; version 1 files
still load (and get a key from `plvmctl concepts reindex`).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import __version__
from .errors import PlvmError
from .fileio import write_bytes_atomic

FORMAT_NAME = "plvmctl.concept"
FORMAT_VERSION = "2"  # the newest version this plvmctl writes
READABLE_VERSIONS = ("1", "2")  # 2 adds the optional `visual` tensor and `parts`
CORE_TENSORS = ("word", "head", "context", "visual")
SUFFIX = ".concept"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RESERVED_NAMES = {"image"}  # `<image>` is LLaVA's image placeholder


def validate_name(name: str) -> str:
    """Concept names: 1-64 letters, digits, `-` and `_` (they appear as `<name>`)."""
    if not NAME_PATTERN.match(name or ""):
        raise PlvmError(
            f"invalid concept name {name!r}: use 1-64 letters, digits, '-' or '_' (no spaces or <>)"
        )
    if name.lower() in RESERVED_NAMES:
        raise PlvmError(f"concept name {name!r} is reserved (it is the image placeholder)")
    return name


def concept_name(folder_name: str) -> str:
    """The concept name for a folder or file name: letters, digits, '-' and '_' kept, others '_'."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", folder_name)


@dataclass
class ConceptMeta:
    """Where a concept came from; stored as the safetensors file's string metadata."""

    method: str = "plvm"  # the method that made it (a name of plvmctl.methods), or "copy"
    base_model: str = ""  # the backbone's fingerprint (Backbone.fingerprint)
    base_model_name: str = ""  # hub id or folder, for messages
    aligner_id: str = ""  # folder or preset of the Aligner (plvm only)
    aligner_sha256: str = ""
    reference_sha256: str = ""  # sha256 of the reference photo's bytes
    created: str = ""
    plvmctl_version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Concept:
    name: str
    word: torch.Tensor  # [H]
    head: torch.Tensor  # [H]
    context: torch.Tensor  # [k, H]
    meta: ConceptMeta = field(default_factory=ConceptMeta)
    visual: torch.Tensor | None = None  # [m, H]; None means m = 0
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        validate_name(self.name)
        hidden = self.word.shape[-1]
        if self.visual is None:
            self.visual = self.word.new_zeros((0, hidden))
        if self.visual.ndim != 2 or self.visual.shape[1] != hidden:
            raise PlvmError(
                f"concept {self.name!r}: visual must be [m, {hidden}], got {tuple(self.visual.shape)}"
            )
        clashing = sorted(set(self.parts) & set(CORE_TENSORS))
        if clashing:
            raise PlvmError(f"concept {self.name!r}: part name(s) {', '.join(clashing)} are reserved")
        if self.word.shape != (hidden,) or self.head.shape != (hidden,):
            raise PlvmError(
                f"concept {self.name!r}: word and head must be [H] vectors, got "
                f"{tuple(self.word.shape)} and {tuple(self.head.shape)}"
            )
        if self.context.ndim != 2 or self.context.shape[1] != hidden:
            raise PlvmError(
                f"concept {self.name!r}: context must be [k, {hidden}], got {tuple(self.context.shape)}"
            )

    @property
    def hidden_size(self) -> int:
        return self.word.shape[-1]

    @property
    def num_context(self) -> int:
        return self.context.shape[0]

    @property
    def num_visual(self) -> int:
        return self.visual.shape[0]

    @property
    def format_version(self) -> str:
        """The oldest format version that holds this concept (see the module docstring)."""
        return "2" if self.num_visual or self.parts else "1"

    def renamed(self, name: str) -> "Concept":
        return Concept(name, self.word, self.head, self.context, self.meta, self.visual, dict(self.parts))

    def check_compatible(self, fingerprint: str, hidden_size: int, model_name: str = "") -> None:
        """Refuse a concept made for another model, saying exactly what differs."""
        if self.hidden_size != hidden_size:
            raise PlvmError(
                f"concept {self.name!r} has hidden size {self.hidden_size} but the model "
                f"{model_name or ''} has {hidden_size}: it was made for another model "
                f"({self.meta.base_model_name or 'unknown'})"
            )
        if self.meta.base_model and self.meta.base_model != fingerprint:
            raise PlvmError(
                f"concept {self.name!r} was made for model {self.meta.base_model_name or '?'} "
                f"(fingerprint {self.meta.base_model}), but the loaded model "
                f"{model_name} has fingerprint {fingerprint}: re-encode it with this model"
            )

    # -- file format -----------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically as safetensors + string metadata."""
        path = Path(path)
        meta = asdict(self.meta)
        extra = meta.pop("extra")
        metadata = {key: str(value) for key, value in meta.items()}
        metadata.update({f"extra.{key}": str(value) for key, value in extra.items()})
        metadata.update({
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "name": self.name,
            "k": str(self.num_context),
            "hidden_size": str(self.hidden_size),
            "created": self.meta.created or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        tensors = {
            "word": self.word.detach().to("cpu", torch.float32).contiguous(),
            "head": self.head.detach().to("cpu", torch.float32).contiguous(),
            "context": self.context.detach().to("cpu", torch.float32).contiguous(),
        }
        if self.num_visual:
            tensors["visual"] = self.visual.detach().to("cpu", torch.float32).contiguous()
        for key, value in self.parts.items():  # parts keep their dtype (a float64 threshold)
            tensors[key] = value.detach().to("cpu").contiguous()
        write_bytes_atomic(path, save(tensors, metadata=metadata))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Concept":
        path = Path(path)
        if not path.is_file():
            raise PlvmError(f"concept file not found: {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise PlvmError(f"not a valid .concept file (corrupt or not safetensors): {path}") from error
        if metadata.get("format") != FORMAT_NAME:
            raise PlvmError(f"{path} is not a plvmctl concept (format {metadata.get('format')!r})")
        if metadata.get("format_version") not in READABLE_VERSIONS:
            raise PlvmError(
                f"{path} has concept format version {metadata.get('format_version')!r}; "
                f"this plvmctl reads versions {', '.join(READABLE_VERSIONS)}"
            )
        missing = {"word", "head", "context"} - set(tensors)
        if missing:
            raise PlvmError(f"{path} lacks tensor(s) {', '.join(sorted(missing))}")
        known = {f for f in ConceptMeta.__dataclass_fields__ if f != "extra"}
        meta = ConceptMeta(
            **{key: value for key, value in metadata.items() if key in known},
            extra={k[len("extra."):]: v for k, v in metadata.items() if k.startswith("extra.")},
        )
        if metadata.get("format_version") == "1" and set(tensors) - {"word", "head", "context"}:
            raise PlvmError(f"{path}: a version 1 concept holds only word, head and context")
        parts = {key: value for key, value in tensors.items() if key not in CORE_TENSORS}
        concept = cls(metadata.get("name", path.stem), tensors["word"], tensors["head"],
                      tensors["context"], meta, tensors.get("visual"), parts)
        if str(concept.num_context) != metadata.get("k", str(concept.num_context)):
            raise PlvmError(f"{path}: metadata says k={metadata.get('k')} but context has "
                            f"{concept.num_context} rows")
        return concept
