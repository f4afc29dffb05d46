"""`plvm-auto`: PLVM's concepts, the photo's concepts found by retrieval, not named (adapter.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import prepare_plvm_auto

RECORDS = (Method("plvm-auto", prepare_plvm_auto, "docs/who-is-here.md"),)
