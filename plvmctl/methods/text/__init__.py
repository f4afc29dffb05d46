"""`llava-text` and `llava-none`: the baselines without soft tokens (adapter.py); nothing to train.

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import DESCRIPTIONS_CACHE, prepare_llava_none, prepare_llava_text

RECORDS = (
    Method("llava-text", prepare_llava_text, "docs/methods/text-prompt.md", cache=DESCRIPTIONS_CACHE),
    Method("llava-none", prepare_llava_none, "docs/methods/text-prompt.md"),
)
