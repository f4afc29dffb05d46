"""`plvm-auto`: PLVM's concepts, the photo's concepts found by retrieval, not named (adapter.py).
"""
