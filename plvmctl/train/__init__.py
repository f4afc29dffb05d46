"""Trainers: the PLVM Aligner (`plvmctl.train.aligner`) and the loop bits they share.

    from plvmctl.train import TrainConfig, train_aligner, weighted_answer_loss

`common` holds the shared loop pieces (seeding, RNG state, checkpoints, JSONL log, loss
curve, lr schedule, Ctrl-C), `data` the manifest, the PLVM sampler and `data attributes`.
`per_concept` and `soft_prompt` hold what the per-concept methods' trainers compose
(plvmctl/methods/NAME/trainer.py: Yo'LLaVA, MyVLM, MC-LLaVA).
"""

from .aligner import TrainConfig, TrainResult, train_aligner, weighted_answer_loss
from .common import TrainingInterrupted
from .data import Identity, Manifest, PlvmSampler, Sample, fill_attributes, read_manifest

__all__ = [
    "TrainConfig", "TrainResult", "train_aligner", "weighted_answer_loss", "TrainingInterrupted",
    "Identity", "Manifest", "PlvmSampler", "Sample", "fill_attributes", "read_manifest",
]
