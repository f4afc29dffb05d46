"""`plvmctl train ...`: training commands (the PLVM Aligner; per-concept baselines plug in here).

    plvmctl [--recipe R] [--set train.KEY=VALUE ...] train aligner [--data MANIFEST] [--out DIR]
                                                                   [--steps N] [--resume]

Settings come from the recipe's `train:` section (see `plvmctl.train.aligner.TrainConfig`);
the options here override it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import replace
from pathlib import Path

import click

from ..locks import LOCK_FILE, hold
from .app import App

pass_app = click.make_pass_decorator(App)


@click.group("train")
def train() -> None:
    """Train the PLVM Aligner, or Yo'LLaVA, MyVLM or MC-LLaVA concepts for comparison."""


@train.command("aligner")
@click.option("--data", "data", type=click.Path(dir_okay=False), default=None,
              help="Manifest (JSONL, one identity a line) [default: the recipe's train.data].")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output folder: checkpoint/, aligner/, log.jsonl, loss.png "
                   "[default: the recipe's train.out].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Optimizer steps in total [default: the recipe's train.steps].")
@click.option("--resume", is_flag=True,
              help="Continue the run in --out from its checkpoint, exactly where it stopped.")
@pass_app
def aligner(app: App, data: str | None, out: str | None, steps: int | None, resume: bool) -> None:
    """Train an Aligner with PLVM's weighted Yes/No loss; only the Aligner learns.

    Writes OUT/aligner (use it with `--set aligner.path=OUT/aligner`), OUT/checkpoint
    (every train.checkpoint_every steps, at the end and on Ctrl-C), OUT/log.jsonl and
    OUT/loss.png. Several GPUs: `accelerate launch -m plvmctl ... train aligner ...`.

    \b
    Example (tiny random model, seconds on a CPU):
      plvmctl toy generate --out data/toy --identities 4 --photos 3
      plvmctl --recipe train-tiny train aligner --data data/toy/manifest.jsonl --out runs/tiny
    """
    from ..train.aligner import TrainConfig, maybe_accelerator, train_aligner
    from ..train.common import TrainingInterrupted

    config = app.recipe.section("train", TrainConfig)
    overrides = {key: value for key, value in (("data", data), ("out", out), ("steps", steps))
                 if value is not None}
    config = replace(config, **overrides)
    config.validate()
    accelerator = maybe_accelerator()  # before the runtime: it picks this process's GPU
    runtime = app.runtime

    def echo(message: str) -> None:
        click.echo(message, err=True)

    main_process = accelerator is None or accelerator.is_local_main_process
    try:
        with hold(Path(config.out) / LOCK_FILE, f"the training folder {config.out}") if main_process \
                else contextlib.nullcontext():
            result = train_aligner(runtime, config, resume=resume, progress=sys.stderr.isatty(),
                                   echo=echo, accelerator=accelerator)
    except TrainingInterrupted as stopped:
        click.echo(f"stopped: {stopped}", err=True)
        sys.exit(130)
    if accelerator is not None and not accelerator.is_main_process:
        return
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    click.echo(f"trained {result.steps} steps (loss {first:.4f} -> {last:.4f})", err=True)
    if result.validation:
        v = result.validation
        click.echo(f"validation: positive {v['val_positive']:.3f}, negative "
                   f"{v['val_negative']:.3f}, mean {v['val_mean']:.3f}", err=True)
    click.echo(str(Path(result.aligner_path)))
