"""Core commands: encode, ask, concepts, chat, recipes, aligner import."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import click

from ..answers import conclusion
from ..errors import PlvmError
from ..recipe import refuse_unused_settings
from ..shards import ShardedRun
from .app import App

pass_app = click.make_pass_decorator(App)


# -- encode -------------------------------------------------------------------------------
def _report_skipped(skipped: dict[str, str]) -> None:
    """One line on stderr per photo left out of a concept."""
    for photo, why in skipped.items():
        click.echo(f"skipped {photo}: {why}", err=True)


@click.command()
@click.argument("references", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--name", required=True, help="Concept name, used as <NAME> in questions.")
@click.option("--force", is_flag=True, help="Replace an existing concept of that name.")
@pass_app
def encode(app: App, references: tuple[str, ...], name: str, force: bool):
    """Encode REFERENCE photos (one or up to the recipe's aligner.max_references, default 8)
    into one concept, no training: prints the written path. Several photos: each is encoded on
    its own and their Aligner outputs are averaged (docs/several-photos.md); an unreadable
    photo is reported on stderr and the others are used."""
    from ..references import check_count, encode_photos

    store = app.store
    store.check_writable(name, force)  # fail before loading any model
    check_count(len(references), app.recipe.aligner.max_references)
    runtime = app.runtime
    start = time.perf_counter()
    encoded = encode_photos(runtime, name, references)
    _report_skipped(encoded.skipped)
    app.log(f"encoded <{name}> in {1000 * (time.perf_counter() - start):.1f} ms")
    click.echo(str(store.save(encoded.concept, force=force)))


# -- ask ----------------------------------------------------------------------------------
def _beside(batch_file: Path, image: str) -> str:
    """A batch file's relative photo path, relative to the batch file unless it exists as given."""
    if Path(image).is_absolute() or Path(image).exists():
        return image
    return str(batch_file.parent / image)


def _read_batch(path: str):
    from ..engine import AskRequest

    requests, problems = [], {}
    source = Path(path)
    if not source.is_file():
        raise PlvmError(f"batch file not found: {path}")
    for number, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise ValueError('expected {"image": ..., "question": ...}')
            image = row.get("image")
            if isinstance(image, list):  # several photos in one prompt (models that take them)
                image = [_beside(source, str(one)) for one in image]
            elif image is not None:
                image = _beside(source, image)
            requests.append(AskRequest(row["question"], image))
        except (ValueError, TypeError) as error:
            problems[len(requests)] = f"line {number}: {error}"
            requests.append(AskRequest("", None))
    return requests, problems


@click.command()
@click.argument("args", nargs=-1, required=False)
@click.option("--batch", "batch_file", type=click.Path(dir_okay=False),
              help='JSONL file, one {"image": PATH, "question": TEXT} per line.')
@click.option("--out", "out_file", type=click.Path(dir_okay=False),
              help="With --batch: write answers as JSONL here instead of stdout.")
@click.option("--no-image", is_flag=True, help="Text-only question (no photo).")
@click.option("--batch-size", type=int, default=None, help="Questions per forward pass [recipe].")
@click.option("--max-new-tokens", type=int, default=None, help="Answer length limit [recipe].")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature [recipe].")
@click.option("--top-p", type=float, default=None, help="Nucleus sampling mass [recipe].")
@click.option("--seed", type=int, default=None, help="Sampling seed [recipe].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per answer.")
@click.option("--together", is_flag=True,
              help="All IMAGEs in one prompt, one answer (models that take several photos: LLaVA-OneVision).")
@click.option("--auto", is_flag=True, help="Find the store's concepts in each photo by retrieval "
              "(verified by the model with the recipe's retrieval.verify and verify_by) and put "
              "the found ones (best first) into the prompt; named ones are always there.")
@click.option("--threshold", type=float, default=None,
              help="With --auto: cosine a concept must reach [recipe retrieval.threshold].")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=None,
              help="With --auto: at most K found concepts per photo [recipe retrieval.top_k].")
@click.option("--location/--no-location", "location", default=True, show_default=True,
              help="MC-LLaVA concepts: say where in the photo each one scores best, when above its "
                   "threshold (\"<name> is on the left.\"; the recipe's mcllava.location).")
@pass_app
def ask(app: App, args, batch_file, out_file, no_image, batch_size, max_new_tokens, sample,
        temperature, top_p, seed, as_json, together, auto, threshold, top_k, location):
    """Ask QUESTION about one or more IMAGEs: `ask IMAGE... QUESTION`.

    Concepts are named as <name> (see `plvmctl concepts list`). Every image gets the same
    question, or, with --together, one question about all of them in one prompt; with --batch
    each line has its own image (or list of images, asked together) and question. Decoding is
    greedy unless --sample. Items that fail are reported and the others still answered; the
    exit status is 1 if any failed. A model that compares before it answers (the pocket
    recipe's `model.reasoning: comparison`) is shown by its conclusion; -v prints the whole
    answer, and --json gives both ("answer" and "conclusion").

    \b
    Examples:
      plvmctl ask party.jpg "Where is <avril>?"
      plvmctl ask a.jpg b.jpg "Is <avril> next to <bob>?" --json
      plvmctl --recipe llava-ov-7b ask a.jpg b.jpg "Is <avril> in both photos?" --together
      plvmctl ask --no-image "What colour is <avril>'s hair?"
      plvmctl ask --batch queries.jsonl --out answers.jsonl --batch-size 16
      plvmctl ask party.jpg "Who is in this photo?" --auto --json
    """
    from ..engine import AskRequest
    from ..methods import make_engine

    problems: dict[int, str] = {}
    if batch_file:
        if args:
            raise PlvmError("--batch takes no IMAGE or QUESTION arguments")
        requests, problems = _read_batch(batch_file)
    elif no_image:
        if len(args) != 1:
            raise PlvmError("--no-image takes exactly one QUESTION")
        requests = [AskRequest(args[0], None)]
    else:
        if len(args) < 2:
            raise PlvmError("usage: plvmctl ask IMAGE... QUESTION (or --no-image QUESTION, or --batch FILE)")
        *images, question = args
        requests = [AskRequest(question, image) for image in images]
        if together:
            if len(images) < 2:
                raise PlvmError("--together asks about two or more IMAGEs in one prompt")
            if not app.runtime.backbone.multi_image:
                raise PlvmError(f"--together: {app.runtime.backbone.family} ({app.runtime.backbone.name}) "
                                "takes one photo per question; LLaVA-OneVision takes several")
            requests = [AskRequest(question, list(images))]
    if together and (batch_file or no_image):
        raise PlvmError("--together is for IMAGE... QUESTION (in --batch, give a line's \"image\" as a list)")
    if out_file and not batch_file:
        raise PlvmError("--out is only for --batch")
    if batch_size is not None and batch_size < 1:
        raise PlvmError("--batch-size must be at least 1")

    generation = app.recipe.generation
    if sample:
        generation.do_sample = True
    for key, value in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(generation, key, value)
    refuse_unused_settings(app.recipe)  # --temperature, --top-p or --seed without --sample
    if (threshold is not None or top_k is not None) and not auto:
        raise PlvmError("--threshold and --top-k go with --auto")
    if auto and any(isinstance(request.image, list) for request in requests):
        raise PlvmError("--auto finds concepts in one photo per question: leave out --together")
    if auto and all(request.image is None for i, request in enumerate(requests) if i not in problems):
        raise PlvmError("--auto finds concepts in photos: give at least one photo")
    engine = make_engine(app.runtime, app.store, locate=location)
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, auto=auto,
                   threshold=threshold, top_k=top_k)
    if batch_file and ShardedRun.wanted(out_file):
        rows = _ask_sharded(app, engine, requests, problems, out_file, options,
                            dict(recipe=app.recipe.name, location=location, sample=sample,
                                 temperature=temperature, top_p=top_p, seed=seed))
        if rows is None:  # not rank 0: its shard is in its partial file
            return
    else:
        answered = _ask_rows(app, engine, requests, problems, range(len(requests)), options,
                             progress=sys.stderr.isatty())
        rows = [answered[i] for i in range(len(requests))]

    failed = sum(row["error"] is not None for row in rows)
    if out_file:
        from ..fileio import write_text_atomic

        write_text_atomic(out_file, "".join(json.dumps(row) + "\n" for row in rows))
        ShardedRun.clean_after(out_file)
        click.echo(f"{out_file}: {len(rows) - failed} answered, {failed} failed")
    else:
        for row in rows:
            if as_json or batch_file:
                click.echo(json.dumps(row))
            elif row["error"]:
                click.echo(f"{_shown(row['image'])}: error: {row['error']}")
            elif len(rows) > 1:
                click.echo(f"{row['image']}: {_shown_answer(app, row['answer'])}")
            else:
                click.echo(_shown_answer(app, row["answer"]))
    for row in rows:
        if row["error"]:
            click.echo(f"failed: {_shown(row['image']) if row['image'] else row['question']}: {row['error']}",
                       err=True)
    if failed:
        sys.exit(1)


def _ask_rows(app: App, engine, requests, problems: dict, indices, options: dict,
              progress: bool = False) -> dict:
    """Answer the requests at `indices`: index → output row (what `ask --batch` writes)."""
    reasoning = app.recipe.model.reasoning
    indices = list(indices)
    subset = [requests[i] for i in indices]
    wrong = {n: problems[i] for n, i in enumerate(indices) if i in problems}
    photos = any(subset[n].image is not None for n in range(len(subset)) if n not in wrong)
    found = (_auto_concepts(app, subset, wrong, options["threshold"], options["top_k"])
             if options["auto"] and photos else {})
    todo = [n for n in range(len(subset)) if n not in wrong]
    results = engine.ask([subset[n] for n in todo], batch_size=options["batch_size"],
                         max_new_tokens=options["max_new_tokens"], progress=progress and len(todo) > 1)
    rows = {}
    for n, request in enumerate(subset):
        image = request.image
        row = {"image": [str(one) for one in image] if isinstance(image, list) else
               None if image is None else str(image), "question": request.question}
        if n in wrong:
            row.update(answer=None, error=wrong[n])
        else:
            result = results[todo.index(n)]
            row.update(answer=result.answer, error=result.error)
            if reasoning != "none" and result.answer is not None:
                row["conclusion"] = conclusion(result.answer, reasoning)
            if result.notes.get("located"):  # where the prompt said a concept is (MC-LLaVA)
                row["located"] = dict(result.notes["located"])
        if options["auto"]:
            row["found"] = [f.to_json() for f in found[n]] if n in found else None
        rows[indices[n]] = row
    return rows


def _ask_cost(app: App, request, max_new_tokens: int | None) -> float:
    """What answering a request costs, in tokens: its photos' image tokens, its question
    (about four characters a token) and the answer's length limit."""
    images = request.image if isinstance(request.image, list) else \
        ([] if request.image is None else [request.image])
    try:
        image_tokens = sum(app.runtime.backbone.image_token_counts(images, [len(images)])) if images else 0
    except (PlvmError, OSError, ValueError):  # an unreadable photo fails fast when asked
        image_tokens = 0
    return image_tokens + len(request.question) / 4 + (max_new_tokens or app.recipe.generation.max_new_tokens)


def _ask_sharded(app: App, engine, requests, problems: dict, out_file, options: dict, settings: dict):
    """`ask --batch` split over the launched processes (plvmctl.shards): this rank answers
    its shard chunk by chunk into its partial file; rank 0 returns every row in input order,
    the other ranks None."""
    from ..shards import item_key

    if not out_file:
        raise PlvmError("ask --batch over several processes needs --out (the ranks merge into it)")
    keys = [item_key("ask", request.question, request.image, problems.get(i), options, settings)
            for i, request in enumerate(requests)]
    costs = [_ask_cost(app, request, options["max_new_tokens"]) for request in requests]
    run = ShardedRun(out_file, keys, costs)
    chunk = 4 * (options["batch_size"] or app.recipe.generation.batch_size)
    for start in range(0, len(run.todo), chunk):
        run.save(_ask_rows(app, engine, requests, problems, run.todo[start:start + chunk], options))
    app.log(f"rank {run.process.rank}/{run.process.world_size}: asked {len(run.todo)} of "
            f"{len(requests)} questions")
    return run.finish()


def _shown_answer(app: App, answer: str) -> str:
    """An answer as `ask` and `chat` print it: the conclusion of a model that reasons first
    (the whole answer with -v)."""
    return answer if app.verbose else conclusion(answer, app.recipe.model.reasoning)


def _shown(image) -> str:
    return " + ".join(image) if isinstance(image, list) else (image or "-")


def _auto_concepts(app: App, requests, problems: dict, threshold, top_k) -> dict:
    """--auto: find the store's concepts in each request's photo (each distinct photo once)
    and add them to the request; position → the Found list. An unreadable photo is left to
    the engine, which reports it."""
    from .find import look_at_photos
    from ..recognise import retrieval_config

    config = retrieval_config(app.recipe, threshold, top_k)
    wanted = [i for i, r in enumerate(requests) if i not in problems and r.image is not None]
    photos = list(dict.fromkeys(str(requests[i].image) for i in wanted))
    if not photos:
        raise PlvmError("--auto finds concepts in photos: give at least one photo")
    looked = look_at_photos(app, photos, config)
    found = {}
    for i in wanted:
        result = looked[photos.index(str(requests[i].image))]
        if not isinstance(result, str):
            found[i] = result.found
            requests[i].concepts = tuple(f.name for f in result.found)
            app.log(f"found in {requests[i].image}: "
                    + (", ".join(f"<{f.name}> {f.score:.3f}" for f in result.found) or "none"))
    return found


# -- recipes --------------------------------------------------------------------------------
def _summary(path: Path) -> str:
    """A recipe's opening comment up to its first ':' or '.' (what the recipe is)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return re.split(r"[:.](?:\s|$)", " ".join(lines), maxsplit=1)[0].strip()


@click.command()
def recipes():
    """The named recipes (use one with --recipe NAME): name, what it is, its file."""
    from ..recipe import DEFAULT_RECIPE, known_recipes

    for name, path in known_recipes().items():
        default = " (default)" if name == DEFAULT_RECIPE else ""
        click.echo(f"{name}{default}\t{_summary(path)}\t{path}")


# -- concepts -------------------------------------------------------------------------------
@click.group()
def concepts():
    """List, show, refine (add-photo) or remove concepts in the store."""


@concepts.command("list")
@pass_app
def concepts_list(app: App):
    """One line per concept: name, method, k, base model."""
    from ..concept import Concept

    names = app.store.names()
    if not names:
        click.echo(f"no concepts in {app.store.root} (add one: plvmctl encode PHOTO --name NAME)")
        return
    for name in names:
        try:
            concept = Concept.load(app.store.path_for(name))
            click.echo(f"<{name}>\t{concept.meta.method}\tk={concept.num_context}\t{concept.meta.base_model_name}")
        except PlvmError as error:
            click.echo(f"<{name}>\tunreadable: {error}")


@concepts.command("show")
@click.argument("name")
@pass_app
def concepts_show(app: App, name: str):
    """Everything stored about concept NAME (metadata and tensor norms), as JSON."""
    from dataclasses import asdict

    concept = app.store.load(name)
    info = {
        "name": concept.name,
        "path": str(app.store.path_for(name)),
        "k": concept.num_context,
        "hidden_size": concept.hidden_size,
        "norms": {"word": round(float(concept.word.norm()), 4), "head": round(float(concept.head.norm()), 4),
                  "context_mean": (round(float(concept.context.norm(dim=-1).mean()), 4)
                                   if concept.num_context else None)},
        **asdict(concept.meta),
    }
    if concept.num_visual:  # a MyVLM concept: its embedding and its concept head's tensors
        info["norms"]["visual_mean"] = round(float(concept.visual.norm(dim=-1).mean()), 4)
    if concept.parts:
        info["parts"] = {key: list(value.shape) for key, value in sorted(concept.parts.items())}
    click.echo(json.dumps(info, indent=2))


@concepts.command("add-photo")
@click.argument("name")
@click.argument("photos", nargs=-1, required=True, type=click.Path(dir_okay=False))
@pass_app
def concepts_add_photo(app: App, name: str, photos: tuple[str, ...]):
    """Refine PLVM concept NAME with more PHOTOS: the result equals encoding all its photos at
    once (its file records every photo's sha256, in order). Prints the path rewritten."""
    from ..references import add_photos

    encoded = add_photos(app.runtime, app.store.load(name), photos)
    _report_skipped(encoded.skipped)
    click.echo(str(app.store.save(encoded.concept, force=True)))


@concepts.command("rm")
@click.argument("name")
@pass_app
def concepts_rm(app: App, name: str):
    """Delete concept NAME from the store."""
    click.echo(f"removed {app.store.remove(name)}")


@concepts.command("reindex")
@click.option("--photos", "photo_folders", multiple=True, type=click.Path(file_okay=False),
              help="Folder to look for reference photos in (by sha256), for concepts whose "
                   "recorded photo path is gone or that record none. Repeatable.")
@pass_app
def concepts_reindex(app: App, photo_folders):
    """Rebuild the store's retrieval index (STORE/.retrieval), first giving concepts without
    a retrieval key (older files) one from their reference photo; reports those it cannot."""
    from ..concept_index import StoreIndex, add_missing_keys

    store = app.store
    if not store.names():
        raise PlvmError(f"no concepts in {store.root}")
    runtime = app.runtime
    filled = add_missing_keys(runtime, store, photo_folders)
    for name, photo in filled.added.items():
        click.echo(f"<{name}>: key from {photo}")
    for name, reason in filled.missing.items():
        click.echo(f"<{name}>: no key: {reason}")
    report = StoreIndex(store).build(runtime.encoder_fingerprint)
    click.echo(f"{report.indexed} concepts indexed ({report.factory}) in {store.root / '.retrieval'}"
               + (f"; {len(report.left_out)} left out" if report.left_out else ""))


# -- chat ---------------------------------------------------------------------------------
CHAT_HELP = """commands: /add NAME PHOTO... (encode a concept), /image PATH (set the photo), /noimage,
/reset (forget the photo), /concepts, /quit. Anything else is a question."""


@click.command()
@click.argument("image", required=False, type=click.Path(dir_okay=False))
@click.option("--auto", is_flag=True, help="Put the concepts found in the photo by retrieval "
              "into every question's prompt (as `ask --auto`).")
@pass_app
def chat(app: App, image: str | None, auto: bool):
    """Interactive questions about IMAGE (optional). Type /help for commands."""
    from ..engine import AskRequest
    from ..methods import make_engine

    engine = make_engine(app.runtime, app.store)
    current = image
    found: dict[str, tuple[str, ...]] = {}  # --auto: photo -> the concepts found in it
    click.echo(f"plvmctl chat ({app.recipe.name}); {CHAT_HELP}")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return
            if line == "/help":
                click.echo(CHAT_HELP)
            elif line.startswith("/add "):
                from ..references import encode_photos

                parts = line.split()
                if len(parts) < 3 or Path(parts[1]).is_file():
                    raise PlvmError("usage: /add NAME PHOTO... (the name comes first)")
                encoded = encode_photos(app.runtime, parts[1], parts[2:])
                for photo, why in encoded.skipped.items():
                    click.echo(f"skipped {photo}: {why}")
                click.echo(f"saved {app.store.save(encoded.concept, force=True)}")
                engine = make_engine(app.runtime, app.store)
                found.clear()
            elif line.startswith("/image "):
                path = line.split(maxsplit=1)[1]
                from ..images import load_image

                load_image(path)
                current = path
                click.echo(f"photo: {current}")
            elif line in ("/reset", "/noimage"):
                current = None
                click.echo("no photo")
            elif line == "/concepts":
                click.echo(" ".join(f"<{n}>" for n in app.store.names()) or "none")
            elif line.startswith("/"):
                raise PlvmError(f"unknown command {line.split()[0]} ({CHAT_HELP})")
            else:
                request = AskRequest(line, current)
                if auto and current is not None:
                    if current not in found:
                        request.image = current
                        _auto_concepts(app, [request], {}, None, None)
                        found[current] = tuple(request.concepts)
                        click.echo("found: " + (" ".join(f"<{n}>" for n in found[current]) or "none"))
                    request.concepts = found[current]
                result = engine.ask([request])[0]
                click.echo(f"bot> {_shown_answer(app, result.answer)}" if result.ok else f"error: {result.error}")
        except PlvmError as error:
            click.echo(f"error: {error}")


# -- aligner --------------------------------------------------------------------------------
@click.group()
def aligner():
    """Manage Aligner checkpoints."""


@aligner.command("import")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (config.json + model.safetensors).")
@click.option("--encoder", default="facebook/dinov2-base", show_default=True,
              help="Reference encoder the checkpoint was trained with.")
@click.option("--base-model", default="llava-hf/llava-1.5-7b-hf", show_default=True,
              help="LLaVA model the checkpoint was trained for.")
def aligner_import(checkpoint: str, out: str, encoder: str, base_model: str):
    """Convert the released PLVM CHECKPOINT (checkpoint.ckpt) into an Aligner folder.

    The file is read with torch.load(weights_only=True): no code in it can run. Every key
    and shape is checked against the released layout.
    """
    from ..aligner import import_released_checkpoint

    if not Path(checkpoint).is_file():
        raise PlvmError(f"checkpoint not found: {checkpoint}")
    folder = import_released_checkpoint(checkpoint, out, encoder=encoder, base_model=base_model)
    click.echo(str(folder))
