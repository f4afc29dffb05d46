"""`plvmctl train mcllava`: train several MC-LLaVA concepts together.

    plvmctl [--recipe R] train mcllava --concept NAME=PHOTOS_DIR [--concept ...]
            [--negatives DIR] [--index INDEX] [--no-kmeans] [--epochs N] [--out DIR] [--force]
            [--set mcllava.KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ...errors import PlvmError
from ...locks import LOCK_FILE, hold
from ...train.per_concept import DOWNLOADS_DIR, gather_negatives, list_photos
from .trainer import McllavaConfig, check_concepts, parse_concept_options, train_mcllava


@click.command("mcllava")
@click.option("--concept", "concept_options", multiple=True, required=True, metavar="NAME=PHOTOS_DIR",
              help="A concept and the folder of its photos; repeat for each concept trained together. "
                   "A photo found (the same bytes) in several folders shows those concepts together. "
                   "Optional masks: PHOTOS_DIR/masks/<photo stem>.png, white where the concept is.")
@click.option("--negatives", "negatives_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of negative photos (other people or things); with --index, where index "
                   "hits are found by id (<id>.jpg|png).")
@click.option("--index", "index", type=click.Path(), default=None,
              help="Image index (from `plvmctl index build`) for hard + random negatives of each concept.")
@click.option("--kmeans/--no-kmeans", "kmeans", default=None,
              help="Start each concept's tokens at k-means centroids of its visual tokens [default: on], "
                   "or at the word `person` as Yo'LLaVA does.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Passes over the rows [default: mcllava.epochs, 15 as the paper].")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: mcllava.out/NAME1+NAME2...]: conversations, log.jsonl, loss.png, result.json.")
@click.option("--force", is_flag=True, help="Replace existing concepts of those names.")
@click.option("--set", "overrides", multiple=True, metavar="mcllava.KEY=VALUE",
              help="Override an mcllava setting, e.g. --set mcllava.location=mark.")
@click.pass_obj
def mcllava(app, concept_options: tuple[str, ...], negatives_dir: str | None, index: str | None,
            kmeans: bool | None, epochs: int | None, out: str | None, force: bool,
            overrides: tuple[str, ...]) -> None:
    """Train MC-LLaVA concepts TOGETHER; prints one .concept path per concept.

    Every concept is <NAME> + k context tokens; only those tensors learn, the model is frozen.
    The concepts share every training step: each row's prompt names all the concepts it
    involves, one concept's photos are the others' negatives, and questions about two concepts
    at once ("Are <a> and <b> both in this photo?") teach them apart, so with two or more
    concepts no outside negatives are needed (they still help: --negatives / --index). Each
    concept's tokens start at k-means centroids of its photos' visual tokens (--no-kmeans: at
    a generic word).

    At ask time a question with a photo gets MC-LLaVA's personalized visual prompt: where in
    the photo the concept scores best, when above its threshold, as "<NAME> is on the left."
    (--set mcllava.location=mark draws a numbered mark instead; =off, or `ask --no-location`,
    turns it off).

    \b
    Example (tiny random model, seconds on a CPU):
      plvmctl --recipe tiny train mcllava --concept avril=photos/avril --concept bob=photos/bob \\
          --set mcllava.epochs=2
      plvmctl --recipe tiny ask photo.jpg "Is <avril> next to <bob>?"
    """
    config = app.trainer_config("mcllava", McllavaConfig, overrides, kmeans=kmeans, epochs=epochs)
    pairs = parse_concept_options(concept_options)
    store = app.store
    for name, _ in pairs:
        store.check_writable(name, force)  # fails before any training
    photos = {}
    for name, folder in pairs:
        photos[name] = list_photos(folder)
        if not photos[name]:
            raise PlvmError(f"no photos (.jpg, .png, ...) of <{name}> in {folder}")
    photos = check_concepts(photos)
    if len(photos) == 1 and index is None and negatives_dir is None:
        raise PlvmError("one concept alone needs negatives: pass --negatives DIR or --index INDEX "
                        "(or train it together with other concepts)")
    run_dir = Path(out) if out else Path(config.out) / "+".join(photos)
    lock = hold(run_dir / LOCK_FILE, f"the training folder {run_dir}")
    click.get_current_context().with_resource(lock)  # one training a run folder, till the end

    def echo(message: str) -> None:
        click.echo(message, err=True)

    runtime = app.runtime
    negatives = {name: [] for name in photos}
    if index is not None or negatives_dir is not None:
        for name, positives in photos.items():
            found = gather_negatives(runtime, positives, config, index=index, negatives_dir=negatives_dir,
                                     download_dir=run_dir / DOWNLOADS_DIR, echo=echo)
            negatives[name] = found.photos
            echo(f"<{name}>: {len(positives)} photos, {len(found.hard)} hard + {len(found.easy)} random negatives")
    result = train_mcllava(runtime, photos, negatives, config, run_dir, progress=sys.stderr.isatty(), echo=echo)
    first = result.losses[0] if result.losses else float("nan")
    last = result.losses[-1] if result.losses else float("nan")
    echo(f"trained {len(result.losses)} steps in {result.seconds['total']:.1f} s "
         f"({result.seconds_per_concept:.1f} s per concept; loss {first:.4f} -> {last:.4f}); best epoch "
         f"{result.best_epoch}")
    for name, accuracy in (result.best_accuracy or {}).items():
        echo(f"  <{name}>: training-photo accuracy positive {accuracy['positive']:.3f}, negative "
             f"{accuracy['negative']:.3f}")
    for concept in result.concepts.values():
        click.echo(str(store.save(concept, force=force)))
