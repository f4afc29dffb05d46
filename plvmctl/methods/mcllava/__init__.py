"""MC-LLaVA: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train mcllava` (cli.py)
and its ask-time visual prompt (hook.py).
"""
