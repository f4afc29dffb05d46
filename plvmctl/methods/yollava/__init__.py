"""Yo'LLaVA: its eval adapter (adapter.py), trainer (trainer.py) and `plvmctl train yollava` (cli.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import YOLLAVA_CACHE, YOLLAVA_SECTION, prepare_yollava
from .cli import yollava as train_command

RECORDS = (Method("yollava", prepare_yollava, "docs/methods/yollava.md", train_command=train_command,
                  section=YOLLAVA_SECTION, cache=YOLLAVA_CACHE, trains_on_negatives=True),)
