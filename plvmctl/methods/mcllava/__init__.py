"""MC-LLaVA: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train mcllava` (cli.py)
and its ask-time visual prompt (hook.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import MCLLAVA_CACHE, prepare_mcllava
from .cli import mcllava as train_command
from .hook import MCLLAVA_SECTION, LocatedHook

RECORDS = (Method("mcllava", prepare_mcllava, "docs/methods/mcllava.md", train_command=train_command,
                  section=MCLLAVA_SECTION, cache=MCLLAVA_CACHE, hook=LocatedHook,
                  trains_on_negatives=True),)
