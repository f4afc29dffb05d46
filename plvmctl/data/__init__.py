"""Shared Q&A templates of the trainers and the evaluation (the toy world is in `plvmctl.lab.toy`)."""
