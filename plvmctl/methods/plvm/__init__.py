"""`plvm`: PLVM's concepts, one Aligner pass per reference photo (adapter.py). No trainer here:
the Aligner is trained once for all concepts by `plvmctl train aligner` (plvmctl/train/aligner.py).
"""
