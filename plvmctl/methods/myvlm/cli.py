"""`plvmctl train myvlm`: train one MyVLM concept (a concept head + a concept embedding).

    plvmctl [--recipe R] train myvlm PHOTOS_DIR --name NAME [--negatives DIR|--index INDEX]
            [--head linear|nearest] [--features encoder|vision] [--crops windows|whole]
            [--out DIR] [--force]
            [--set myvlm.KEY=VALUE ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ...errors import PlvmError
from ...locks import LOCK_FILE, hold
from ...train.per_concept import DOWNLOADS_DIR, gather_negatives, list_photos
from .trainer import MyvlmConfig, train_myvlm


def myvlm_config(app, overrides: tuple[str, ...] = (), **options):
    """The recipe's `myvlm:` section with this command's `--set myvlm.KEY=VALUE` and options applied."""
    return app.trainer_config("myvlm", MyvlmConfig, overrides, **options)


@click.command("myvlm")
@click.argument("photos_dir", type=click.Path(file_okay=False))
@click.option("--name", required=True, help="Concept name, used as <NAME> in questions.")
@click.option("--negatives", "negatives_dir", type=click.Path(file_okay=False), default=None,
              help="Folder of negative photos (other people or things); with --index, where index "
                   "hits are found by id (<id>.jpg|png).")
@click.option("--index", "index", type=click.Path(), default=None,
              help="Image index (from `plvmctl index build`) for hard + random negatives.")
@click.option("--head", "head", type=click.Choice(["linear", "nearest"]), default=None,
              help="linear: a classifier trained on the photos vs the negatives [default]; "
                   "nearest: no head trained, the nearest photo's features + a cosine threshold.")
@click.option("--features", "features", type=click.Choice(["encoder", "vision"]), default=None,
              help="What the head looks at: the reference encoder's CLS token [default] or the "
                   "model's own vision tower, pooled.")
@click.option("--crops", "crops", type=click.Choice(["windows", "whole"]), default=None,
              help="Where in a photo the head looks: the whole photo and a grid of windows, the "
                   "best one counting [default], or the whole photo only.")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: myvlm.out/NAME]: log.jsonl, loss.png, result.json.")
@click.option("--force", is_flag=True, help="Replace an existing concept of that name.")
@click.option("--set", "overrides", multiple=True, metavar="myvlm.KEY=VALUE",
              help="Override a myvlm setting, e.g. --set myvlm.attention_weight=10.")
@click.pass_obj
def myvlm(app, photos_dir: str, name: str, negatives_dir: str | None, index: str | None,
          head: str | None, features: str | None, crops: str | None, out: str | None, force: bool,
          overrides: tuple[str, ...]) -> None:
    """Train a MyVLM concept from the photos in PHOTOS_DIR; prints the .concept path.

    MyVLM keeps the model frozen. A concept head (a linear classifier on frozen image
    features, or the nearest of the photos' own features with a cosine threshold) decides
    whether <NAME> is in a photo, looking at the whole photo and a grid of windows (--crops);
    the threshold is chosen on held-out photos, scored the same way. When the head
    fires, the concept's embedding is placed after the photo's image tokens. The embedding is
    trained (100 steps) on questions that name <NAME>, with an L2 penalty on the attention
    the model pays to it (--set myvlm.attention_weight=λ; the paper: 0.0075 for captions, 10
    for questions). Without a photo the concept is only its name.

    Unreadable photos are reported and skipped. The result is an ordinary .concept (method
    myvlm): ask, chat and eval use it, with other concepts in one question or one batch.

    \b
    Example (tiny random model, seconds on a CPU):
      plvmctl --recipe tiny train myvlm photos/avril --name avril --negatives others/
      plvmctl --recipe tiny ask photo.jpg "What is <avril> doing?"
    """
    config = myvlm_config(app, overrides, head=head, features=features, crops=crops)
    store = app.store
    store.check_writable(name, force)  # validates the name too; fails before any training
    positives = list_photos(photos_dir)
    if not positives:
        raise PlvmError(f"no photos (.jpg, .png, ...) in {photos_dir}")
    if index is None and negatives_dir is None and not (config.head == "nearest" and config.threshold is not None):
        raise PlvmError("MyVLM needs negatives: pass --negatives DIR or --index INDEX (or --head "
                        "nearest with --set myvlm.threshold=COSINE)")
    run_dir = Path(out) if out else Path(config.out) / name
    lock = hold(run_dir / LOCK_FILE, f"the training folder {run_dir}")
    click.get_current_context().with_resource(lock)  # one training a run folder, till the end

    def echo(message: str) -> None:
        click.echo(message, err=True)

    runtime = app.runtime
    negatives = []
    if index is not None or negatives_dir is not None:
        # gather_negatives reads hard_negatives, random_negatives, exclude_threshold and seed,
        # which MyvlmConfig has under the same names
        found = gather_negatives(runtime, positives, config, index=index, negatives_dir=negatives_dir,
                                 download_dir=run_dir / DOWNLOADS_DIR, echo=echo)
        negatives = found.photos
        if not negatives:
            raise PlvmError("no usable negative photo (index hits without a local file: pass "
                            "--negatives DIR)")
        echo(f"<{name}>: {len(positives)} photos, {len(found.hard)} hard + {len(found.easy)} random negatives")
    result = train_myvlm(runtime, name, positives, negatives, config, run_dir,
                         progress=sys.stderr.isatty(), echo=echo)
    last = result.steps[-1] if result.steps else {"ce": float("nan"), "attention": float("nan")}
    first = result.steps[0] if result.steps else last
    echo(f"trained the embedding {len(result.steps)} steps in {result.seconds['total']:.1f} s in all "
         f"(answer loss {first['ce']:.4f} -> {last['ce']:.4f}, attention penalty {last['attention']:.4f})")
    click.echo(str(store.save(result.concept, force=force)))
