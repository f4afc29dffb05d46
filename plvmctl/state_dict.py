"""Reading a foreign PyTorch state dict (a checkpoint someone else saved), safely.

`torch.load(..., weights_only=True)` only: tensors and plain containers, never pickled code.
Every kind of file that is not such a state dict gets one line that says what it is instead:
empty, not a PyTorch file at all, a damaged one, or one that holds pickled Python objects
(a whole `nn.Module`, an optimizer, custom classes). Torch's own advice to retry with
`weights_only=False` is never passed on: a file that needs it is refused.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

from .errors import PlvmError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6
PICKLE_MAGIC = b"\x80"  # the older torch.save format starts with a pickle protocol byte
EXPECTED = "expected a PyTorch state dict of tensors (torch.save(model.state_dict(), path))"


def _first_sentence(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if not text or "weights_only" in text:  # never relay torch's advice to unpickle
        return type(error).__name__
    return text.split(". ")[0].rstrip(".")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat name → tensor dict saved in `path` (unwrapping `state_dict` / `model` and a
    `module.` prefix), or a PlvmError that names the kind of file it is instead."""
    path = Path(path)
    if not path.is_file():
        raise PlvmError(f"no checkpoint file at {path}")
    with path.open("rb") as file:
        head = file.read(8)
    if not head:
        raise PlvmError(f"{path} is empty (0 bytes); {EXPECTED}")
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        raise PlvmError(f"{path} is not a PyTorch file (it starts with {head[:4]!r}); {EXPECTED}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pickle-protocol chatter from the weights-only reader
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only load failed" in str(error).lower():
            raise PlvmError(
                f"{path} holds pickled Python objects (such as a whole nn.Module), not only tensors; "
                f"plvmctl never unpickles code: {EXPECTED}"
            ) from None
        raise PlvmError(f"{path} is a damaged PyTorch file ({_first_sentence(error)})") from None
    except Exception as error:  # truncated zips and pickles fail in many ways
        raise PlvmError(f"{path} is a damaged or truncated PyTorch file "
                        f"({type(error).__name__}: {_first_sentence(error)})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj:
        found = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise PlvmError(f"{path} holds {found}, not a state dict; {EXPECTED}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PlvmError(f"{path} is not a state dict: entry {key!r} is a {type(value).__name__}, "
                            f"not a tensor")
        state[key[len("module."):] if key.startswith("module.") else key] = value
    return state
