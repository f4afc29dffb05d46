"""MyVLM: its eval adapter (adapter.py), trainer (trainer.py), `plvmctl train myvlm` (cli.py) and
its ask-time concept head (hook.py).
"""
