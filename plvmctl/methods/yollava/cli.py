"""`plvmctl train yollava`: train one Yo'LLaVA concept on its photos (the baseline PLVM beats).

    plvmctl [--recipe R] train yollava PHOTOS_DIR --name NAME [--index INDEX] [--negatives DIR]
            [--download] [--out DIR] [--force] [--set yollava.KEY=VALUE ...]

The command is the module attribute `yollava`; the methods registry (plvmctl.methods) names it
and the CLI puts it under `plvmctl train`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ...errors import PlvmError
from ...locks import LOCK_FILE, hold
from ...train.per_concept import DOWNLOADS_DIR, gather_negatives, list_photos
from .trainer import YollavaConfig, train_yollava


def yollava_config(app, overrides: tuple[str, ...] = ()):
    """The recipe's `yollava:` section with this command's `--set yollava.KEY=VALUE` applied."""
    return app.trainer_config("yollava", YollavaConfig, overrides)


@click.command("yollava")
@click.argument("photos_dir", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Concept name, used as <NAME> in questions.")
@click.option("--index", "index", type=click.Path(), default=None,
              help="Image index (from `plvmctl index build`) for hard + random negatives.")
@click.option("--negatives", "negatives_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of negative photos: index hits by id (<id>.jpg|png), or, without "
                   "--index, random negatives drawn from it.")
@click.option("--download", is_flag=True,
              help="Fetch index hits with no local photo from their URL (off by default).")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: yollava.out/NAME]: conversations.json, log.jsonl, "
                   "loss.png, result.json.")
@click.option("--force", is_flag=True, help="Replace an existing concept of that name.")
@click.option("--set", "overrides", multiple=True, metavar="yollava.KEY=VALUE",
              help="Override a yollava setting, e.g. --set yollava.epochs=5.")
@click.pass_obj
def yollava(app, photos_dir: str, name: str, index: str | None, negatives_dir: str | None,
            download: bool, out: str | None, force: bool, overrides: tuple[str, ...]) -> None:
    """Train a Yo'LLaVA concept from the 4-10 photos in PHOTOS_DIR; prints the .concept path.

    Only the concept's tensors learn (<NAME>, its head row and k latent tokens); the model
    is untouched. The result goes into the concept store and is used like any other concept
    (ask, chat, eval), together with other concepts in one question.

    \b
    Example (tiny random model, seconds on a CPU):
      plvmctl train yollava photos/avril --name avril --negatives negatives/ \\
          --set yollava.epochs=2
    """
    config = yollava_config(app, overrides)
    store = app.store
    store.check_writable(name, force)  # validates the name too; fails before any training
    positives = list_photos(photos_dir)
    if not positives:
        raise PlvmError(f"no photos (.jpg, .png, ...) in {photos_dir}")
    if len(positives) < 4:
        click.echo(f"warning: {len(positives)} photo(s) of <{name}>; Yo'LLaVA uses 4-10", err=True)
    if index is None and negatives_dir is None:
        raise PlvmError("Yo'LLaVA needs negatives: pass --index INDEX and/or --negatives DIR")
    run_dir = Path(out) if out else Path(config.out) / name
    lock = hold(run_dir / LOCK_FILE, f"the training folder {run_dir}")
    click.get_current_context().with_resource(lock)  # one training a run folder, till the end

    def echo(message: str) -> None:
        click.echo(message, err=True)

    runtime = app.runtime
    negatives = gather_negatives(runtime, positives, config, index=index,
                                 negatives_dir=negatives_dir, download=download,
                                 download_dir=run_dir / DOWNLOADS_DIR, echo=echo)
    for failure in negatives.failed_downloads[:10]:
        echo(f"download failed: {failure}")
    if not negatives.photos:
        raise PlvmError("no usable negative photo (index hits without a local file: pass "
                        "--negatives DIR or --download)")
    echo(f"<{name}>: {len(positives)} photos, {len(negatives.hard)} hard + "
         f"{len(negatives.easy)} random negatives")
    result = train_yollava(runtime, name, positives, negatives.photos, config, run_dir,
                           progress=sys.stderr.isatty(), echo=echo)
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    accuracy = result.best_accuracy or {}
    echo(f"trained {len(result.losses)} steps in {result.seconds['total']:.1f} s (loss {first:.4f} -> "
         f"{last:.4f}); best epoch {result.best_epoch}: training-photo accuracy positive "
         f"{accuracy.get('positive', float('nan')):.3f}, negative {accuracy.get('negative', float('nan')):.3f}")
    click.echo(str(store.save(result.concept, force=force)))

