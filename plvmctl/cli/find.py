"""`plvmctl find`: which known concepts appear in photos, and where (retrieval, recognise.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..errors import PlvmError
from .app import App

pass_app = click.make_pass_decorator(App)


def open_index(app: App):
    """The store's key index for this recipe's encoder, rebuilt (with a line on stderr) when
    missing or stale."""
    from ..concept_index import open_store_index

    return open_store_index(app.store, app.runtime.encoder_fingerprint,
                            say=lambda line: click.echo(line, err=True))


def look_at_photos(app: App, photos: list, config, progress: bool = False) -> dict[int, object]:
    """Position → recognise.Looked, or → the error string when the photo cannot be read.
    Photos are read and encoded `config.batch_size` at a time."""
    from tqdm import tqdm

    from ..images import load_image
    from ..recognise import look

    index = open_index(app)
    engine = None
    if config.verify:  # retrieve, then verify: the model checks each photo's best candidates
        from ..methods import make_engine

        engine = make_engine(app.runtime, app.store)
    results: dict[int, object] = {}
    bar = tqdm(total=len(photos), desc="finding", unit="photo", disable=not progress)
    for start in range(0, len(photos), config.batch_size):
        chunk = list(enumerate(photos[start:start + config.batch_size], start))
        images = []
        for position, photo in chunk:
            try:
                images.append((position, photo if not isinstance(photo, (str, Path)) else load_image(photo)))
            except PlvmError as error:
                results[position] = str(error)
        if images:
            for (position, _), looked in zip(images, look(app.runtime, index, [i for _, i in images], config,
                                                                     engine)):
                results[position] = looked
        bar.update(len(chunk))
    bar.close()
    return results


def _photo_list(paths: tuple[str, ...]) -> list[str]:
    from ..images import list_images

    photos: list[str] = []
    for path in paths:
        if Path(path).is_dir():
            found = list_images(path)
            if not found:
                raise PlvmError(f"no photos in folder {path}")
            photos += [str(p) for p in found]
        else:
            photos.append(path)  # a missing or unreadable file is reported in its row
    return photos


@click.command("find")
@click.argument("paths", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per photo (JSON lines).")
@click.option("--threshold", type=float, default=None,
              help="Cosine a concept's best crop must reach [recipe retrieval.threshold].")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=None,
              help="At most K concepts per photo [recipe retrieval.top_k].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Photos encoded together [recipe retrieval.batch_size].")
@pass_app
def find(app: App, paths, as_json, threshold, top_k, batch_size):
    """Which concepts of the store appear in PHOTOS (files or folders), and where.

    Each photo is searched as a whole and in windows against the store's retrieval index
    (rebuilt first when stale); a concept is found when its best crop's cosine reaches the
    threshold, or, with the recipe's `retrieval.verify: N` (the pocket recipe: 16), when the
    model recognises it among the photo's N best candidates: asked about each one
    (`retrieval.verify_by: each`, N model calls a photo) or about all of them in one question
    (`together`, one call). Per photo: the concepts found, best first, with score and box
    (left, top, right, bottom in pixels); --json adds the model calls the photo took and how
    many of their answers were unreadable. Unreadable files are reported and skipped; the exit
    status is 1 if any were.

    \b
    Examples:
      plvmctl find album/ --json > tags.jsonl
      plvmctl find party.jpg beach.jpg --threshold 0.9 -k 3
    """
    from ..recognise import retrieval_config

    config = retrieval_config(app.recipe, threshold, top_k)
    if batch_size:
        config.batch_size = batch_size
    photos = _photo_list(paths)
    looked = look_at_photos_split(app, photos, config, progress=len(photos) > 1 and sys.stderr.isatty())
    if looked is None:  # not rank 0: its photos are in its partial file, rank 0 prints them all
        return
    failed = 0
    for position, photo in enumerate(photos):
        result = looked[position]
        if isinstance(result, str):
            failed += 1
            if as_json:
                click.echo(json.dumps({"photo": photo, "found": None, "model_calls": 0, "unreadable": 0,
                                       "error": result}))
            else:
                click.echo(f"{photo}\terror: {result}")
            click.echo(f"failed: {photo}: {result}", err=True)
            continue
        if as_json:
            click.echo(json.dumps({"photo": photo, "found": [f.to_json() for f in result.found],
                                   "model_calls": result.model_calls, "unreadable": result.unreadable,
                                   "error": None}))
        elif not result.found:
            click.echo(f"{photo}\t-")
        else:
            cells = ", ".join(f"<{f.name}> {f.score:.3f} at {','.join(map(str, f.box))}" for f in result.found)
            click.echo(f"{photo}\t{cells}")
    if failed:
        sys.exit(1)


def look_at_photos_split(app: App, photos: list[str], config, progress: bool = False) -> dict | None:
    """`look_at_photos` split over the processes accelerate or torchrun launched
    (plvmctl.shards): each rank looks at its share of the photos (balanced by pixels) and
    writes its results to a partial file under STORE/.shards/; rank 0 gets every photo's
    result, the other ranks None. One process without partial files: `look_at_photos`."""
    from dataclasses import asdict

    from PIL import Image

    from ..recognise import Found, Looked
    from ..shards import ShardedRun, item_key

    out = app.store.root / ".shards" / f"find-{item_key(photos, asdict(config), app.recipe.name)}.jsonl"
    if not ShardedRun.wanted(out):
        return look_at_photos(app, photos, config, progress)
    costs = []
    for photo in photos:
        try:
            with Image.open(photo) as image:  # the header only: its size
                costs.append(1 + image.width * image.height / 1e6)
        except (OSError, ValueError):  # unreadable: fails fast when looked at
            costs.append(1.0)
    keys = [item_key("find", photo, app.store.names()) for photo in photos]
    run = ShardedRun(out, keys, costs)
    chunk = 4 * config.batch_size
    for start in range(0, len(run.todo), chunk):
        mine = run.todo[start:start + chunk]
        looked = look_at_photos(app, [photos[i] for i in mine], config)
        run.save({i: {"error": result} if isinstance(result, str) else {"looked": asdict(result)}
                  for i, result in zip(mine, (looked[n] for n in range(len(mine))))})
    rows = run.finish()
    if rows is None:
        return None
    ShardedRun.clean_after(out)

    def restored(row: dict):
        if "error" in row:
            return row["error"]
        fields = dict(row["looked"])
        for key in ("candidates", "found"):
            fields[key] = [Found(f["name"], f["score"], tuple(f["box"])) for f in fields[key]]
        return Looked(**fields)

    return {position: restored(row) for position, row in enumerate(rows)}
