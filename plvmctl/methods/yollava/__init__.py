"""Yo'LLaVA: its eval adapter (adapter.py), trainer (trainer.py) and `plvmctl train yollava` (cli.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method, Section
from .adapter import YOLLAVA_CACHE, prepare_yollava, yollava_settings
from .cli import yollava as train_command
from .trainer import YollavaConfig

RECORDS = (Method("yollava", prepare_yollava, "docs/methods/yollava.md", train_command=train_command,
                  section=Section("yollava", YollavaConfig), cache=YOLLAVA_CACHE, negatives=yollava_settings),)
