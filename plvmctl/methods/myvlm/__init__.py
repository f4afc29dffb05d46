"""MyVLM: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train myvlm` (cli.py) and
its ask-time concept head (hook.py).

`RECORDS` is what the registry (plvmctl/methods/__init__.py) lists for it.
"""

from __future__ import annotations

from ..base import Method
from .adapter import MYVLM_CACHE, MYVLM_SECTION, prepare_myvlm
from .cli import myvlm as train_command
from .hook import SeenHook

RECORDS = (Method("myvlm", prepare_myvlm, "docs/methods/myvlm.md", train_command=train_command,
                  section=MYVLM_SECTION, cache=MYVLM_CACHE, hook=SeenHook,
                  trains_on_negatives=True),)
