"""plvmctl: personalize LLaVA-family vision-language models (PLVM and baselines)."""

__version__ = "0.1.0"
