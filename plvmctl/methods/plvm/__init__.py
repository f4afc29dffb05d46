"""`plvm`: PLVM's concepts, one Aligner pass per reference photo (adapter.py). No trainer here:
the Aligner is trained once for all concepts by `plvmctl train aligner` (plvmctl/train/aligner.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import prepare_plvm

RECORDS = (Method("plvm", prepare_plvm, "docs/how-it-works.md"),)
