"""`llava-text` and `llava-none`: the baselines without soft tokens (adapter.py); nothing to train.
"""
