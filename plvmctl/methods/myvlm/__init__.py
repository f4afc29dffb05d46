"""MyVLM: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train myvlm` (cli.py) and
its ask-time concept head (hook.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method, Section
from .adapter import MYVLM_CACHE, myvlm_settings, prepare_myvlm
from .cli import myvlm as train_command
from .hook import SeenHook
from .trainer import MyvlmConfig

RECORDS = (Method("myvlm", prepare_myvlm, "docs/methods/myvlm.md", train_command=train_command,
                  section=Section("myvlm", MyvlmConfig), cache=MYVLM_CACHE, hook=SeenHook,
                  negatives=myvlm_settings),)
