"""Training and evaluation data: the procedural toy world and shared Q&A templates."""
