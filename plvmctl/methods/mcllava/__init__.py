"""MC-LLaVA: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train mcllava` (cli.py)
and its ask-time visual prompt (hook.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method, Section
from .adapter import MCLLAVA_CACHE, prepare_mcllava
from .cli import mcllava as train_command
from .hook import LocatedHook, location_settings
from .trainer import McllavaConfig

RECORDS = (Method("mcllava", prepare_mcllava, "docs/methods/mcllava.md", train_command=train_command,
                  section=Section("mcllava", McllavaConfig), cache=MCLLAVA_CACHE, hook=LocatedHook,
                  negatives=location_settings),)
