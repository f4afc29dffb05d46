"""Yo'LLaVA: its eval adapter (adapter.py), trainer (trainer.py) and `plvmctl train yollava` (cli.py).
"""
