"""`plvmctl eval`: the PLVM paper's evaluation protocol on a plvm-val-style test set."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from ..errors import PlvmError
from ..methods import KNOWN_METHODS, get_method

TINY_WARNING = ("warning: the tiny recipe's model is random, so its numbers are meaningless "
                "(it only exercises the machinery)")


def parse_methods(values: tuple[str, ...]) -> list[str]:
    """`--method a --method b,c` -> [a, b, c], duplicates dropped, order kept."""
    names: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if not names:
        raise PlvmError("no method to evaluate: pass --method")
    return names


def default_out_dir(recipe_name: str) -> Path:
    """runs/eval-<recipe>-<timestamp>, relative to the current directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in recipe_name)
    return Path("runs") / f"eval-{safe}-{time.strftime('%Y%m%d-%H%M%S')}"


ITEM_BYTES = 1024  # an answer in items/METHOD.jsonl: about 350 bytes measured; room for reasoning
REPORT_BYTES = 1 << 20  # results.json, .md, .png


def report_bytes(testset, methods: int, limit: int | None) -> int:
    """What an evaluation report may take on disk, at most: every recognition pair (each query
    photo against every identity), every question, for each method."""
    tasks = [testset.query_count * len(testset.identities), len(testset.visual), len(testset.text)]
    items = sum(min(count, limit) if limit else count for count in tasks)
    return REPORT_BYTES + methods * items * ITEM_BYTES


@click.command("eval")
@click.option("--testset", type=click.Path(file_okay=False), default=None,
              help="Folder that holds validation_recognition/ [default: ../shared/testsets/plvm-val].")
@click.option("--method", "methods", multiple=True, default=("plvm",), show_default=True,
              metavar="NAME", help=f"Method to evaluate: {' | '.join(KNOWN_METHODS)}. "
                                   "Repeat it or separate names with commas.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder; reuse one to resume [default: runs/eval-<recipe>-<timestamp>].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N items per task (quick runs).")
@click.option("--neg-per-identity", type=click.IntRange(min=0), default=None,
              help="Sample N negative recognition pairs per identity [default: all pairs].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for that sampling.")
@click.option("--mcq", type=click.Choice(["likelihood", "generate"]), default=None,
              help="Multiple choice by option-letter likelihood, or by generating an answer and "
                   "reading the letter it gives [default: the recipe's eval.mcq, else likelihood].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Questions per batch [default: the recipe's generation.batch_size].")
@click.option("--retrieval", is_flag=True,
              help="Also score \"who is in this photo\" by retrieval: every query photo searched "
                   "for all test identities (precision, recall, F1, calibrated threshold).")
@click.option("--retrieval-only", is_flag=True, help="Only that; no method is asked.")
@click.option("--captions", is_flag=True,
              help="Also score captions: \"Describe this photo.\" per query photo with its concepts "
                   "and one absent test identity in the prompt (plvm-auto: the ones it finds); recall "
                   "(MyVLM's metric: the share of (photo, concept) pairs whose description says the "
                   "concept is there) and name precision.")
@click.option("--pairs", is_flag=True,
              help="Also ask questions that hold several concepts at once (\"Is <A> in this photo?\" "
                   "with <B> in the prompt too, which of two or three, who of four; on a toy set's "
                   "group photos both here and left of); reported in their own section.")
@click.option("--negatives", type=click.Path(file_okay=False), default=None,
              help="Photos of people who are not in the test set: the negatives of the methods that "
                   "train (yollava, myvlm, mcllava) and plvm-auto's other people [default: the "
                   "recipe's METHOD.index / negatives_dir, else the test set's negatives/ folder].")
@click.pass_obj
def eval_command(app, testset, methods, out_dir, limit, neg_per_identity, seed, mcq, batch_size,
                 retrieval, retrieval_only, captions, pairs, negatives):
    """Recognition (positive/negative/mean), text QA and visual QA accuracy, per method.

    Writes results.json, results.md, results.png and items/<method>.jsonl into the output
    folder; an interrupted run continues where it stopped when given the same --out.

    \b
    Example:
      plvmctl --recipe llava15-7b eval --method plvm,llava-text,llava-none
      plvmctl eval --testset /tmp/ts --method plvm,plvm-auto --retrieval
      plvmctl eval --testset /tmp/ts --method plvm,plvm-auto --captions
      plvmctl eval --testset /tmp/ts --method mcllava,plvm,yollava --pairs
    """
    from ..fileio import check_free_space
    from ..locks import LOCK_FILE, hold
    from ..shards import current_process
    from ..evaluate import load_testset, recipe_mcq_mode, render_markdown, run_evaluation

    names = [] if retrieval_only else parse_methods(methods)
    for name in names:
        get_method(name)  # unknown or unavailable methods fail before anything loads
    loaded = load_testset(testset)  # fail fast, before any model loads
    recipe = app.recipe
    mcq = mcq or recipe_mcq_mode(recipe)
    if recipe.name == "tiny" or str(recipe.model.source) == "tiny":
        click.echo(TINY_WARNING, err=True)
    out = Path(out_dir) if out_dir else default_out_dir(recipe.name)
    check_free_space(out, report_bytes(loaded, max(len(names), 1), limit), "the evaluation report")
    main = current_process().is_main  # several processes (accelerate launch): rank 0 locks and reports
    with hold(out / LOCK_FILE, f"the evaluation folder {out}") if main else contextlib.nullcontext():
        results = run_evaluation(app.runtime, loaded, names, out, limit=limit,
                                 neg_per_identity=neg_per_identity, seed=seed, mcq=mcq,
                                 batch_size=batch_size, progress=True,
                                 retrieval=retrieval or retrieval_only, captions=captions, pairs=pairs,
                                 negatives=negatives, echo=lambda message: click.echo(message, err=True))
    if not main:
        return
    click.echo(render_markdown(results))
    click.echo(f"report: {out}/results.md, results.json, results.png; answers in {out}/items/")
