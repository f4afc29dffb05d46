"""The evaluation run: prepare each method, ask every item it has not answered yet, score it
from its item log and write the report.

Items are asked in batches of the recipe's generation batch size (or `--batch-size`); each
batch's answers are appended to the method's item log as soon as it returns, so a run that
stops resumes where it stopped (resume.py says when earlier answers still hold).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from tqdm import tqdm

from ..answers import MCQ_INSTRUCTION, RECOGNITION_QUESTION
from ..engine import AskRequest
from ..errors import PlvmError
from ..fileio import sha256_file
from ..fingerprint import answer_fingerprint, model_weights
from ..methods import (TRAINED_ON_NEGATIVES, MethodContext, PreparedMethod, Reference, check_recipe_sections, get_method,
                       make_engine, negative_pool)
from .itemlog import ItemLog
from .items import (
    MCQ_MODES,
    RECOGNITION_MODE,
    TASK_TITLES,
    TASKS,
    EvalItem,
    answer_mode,
    build_items,
    caption_items,
    item_concepts,
    pair_items,
)
from .metrics import caption_metrics, pair_metrics, score_method
from .report import PAPER_FIGURES, write_report
from .resume import check_run_folder
from .split import EvalSplit
from .testset import TestSet, load_testset, relative_path
from .who import retrieval_task


def load_engine_api() -> Any:
    """The real engine: `Engine` (with every method's ask-time hooks) and `AskRequest`."""
    return SimpleNamespace(Engine=make_engine, AskRequest=AskRequest)


def _answer_items(prepared: PreparedMethod, engine_api: Any, items: list[EvalItem], mode: str,
                  log: ItemLog, root: Path, batch_size: int, progress: bool, label: str) -> int:
    """Ask `items` in chunks of `batch_size`, logging each chunk; returns how many were asked."""
    bar = tqdm(total=len(items), desc=label, unit="item", disable=not progress)
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            requests = [engine_api.AskRequest(item.question, item.image, concepts=item.concepts)
                        if item.concepts else engine_api.AskRequest(item.question, item.image)
                        for item in chunk]
            if mode == "likelihood":
                options = [[letter for letter, _ in item.options] for item in chunk]
                results = prepared.engine.score_options(requests, options, batch_size=batch_size,
                                                        progress=False)
            else:
                results = prepared.engine.ask(requests, batch_size=batch_size, progress=False)
            if len(results) != len(chunk):
                raise PlvmError(f"the engine returned {len(results)} results for {len(chunk)} "
                                f"questions ({prepared.name})")
            records = []
            for item, result in zip(chunk, results):
                record = {
                    "key": item.key, "task": item.task, "mode": mode,
                    "identity": item.identity, "image": relative_path(item.image, root),
                    "question": item.question, "expected": item.expected,
                    "error": result.error,
                }
                if mode == "likelihood":
                    letters = [letter for letter, _ in item.options]
                    logprobs = result.logprobs
                    if record["error"] is None and (logprobs is None or len(logprobs) != len(letters)):
                        record["error"] = "the engine returned no score for some options"
                    record["scores"] = (dict(zip(letters, logprobs))
                                        if record["error"] is None else None)
                else:
                    record["answer"] = result.answer
                notes = getattr(result, "notes", {})  # what the method's ask-time hook found
                if mode != "likelihood" and notes.get("located"):  # where the visual prompt put a concept
                    record["located"] = dict(notes["located"])
                if getattr(result, "decided_by", None):  # answered without the model (plvm-auto)
                    record["decided_by"] = result.decided_by
                if notes.get("seen"):  # the concepts recognised in the photo, and the crop of each
                    record["seen"] = list(notes["seen"])
                    record["seen_boxes"] = {name: list(box) for name, box in notes["seen"].items()}
                records.append(record)
            log.append(records)
            bar.update(len(chunk))
    finally:
        bar.close()
    return len(items)


def _echo_stderr(message: str) -> None:
    print(message, file=sys.stderr)


SEVERAL_REFERENCE_METHODS = {"plvm", "plvm-auto"}  # concepts from every ref_img* without training


def several_references_digest(testset: TestSet) -> str | None:
    """sha256 over every identity's reference photos (names and bytes), when some identity has
    more than one; None otherwise (a test set of one photo each keeps its fingerprints)."""
    if all(len(identity.references) <= 1 for identity in testset.identities):
        return None
    digest = hashlib.sha256()
    for identity in testset.identities:
        for photo in identity.references:
            digest.update(f"{identity.name}/{photo.name}:{sha256_file(photo)}\n".encode())
    return digest.hexdigest()


def run_evaluation(runtime: Any, testset: TestSet | str | Path, methods: list[str],
                   out_dir: str | Path, *, limit: int | None = None,
                   neg_per_identity: int | None = None, seed: int = 0, mcq: str = "likelihood",
                   batch_size: int | None = None, progress: bool = True,
                   engine_api: Any = None,
                   extra_methods: Mapping[str, Any] | None = None,
                   retrieval: bool = False, captions: bool = False, pairs: bool = False,
                   negatives: str | Path | None = None,
                   echo: Callable[[str], None] = _echo_stderr) -> dict[str, Any]:
    """Evaluate `methods` on `testset` with `runtime`, writing the report into `out_dir`.

    Returns the results dict that is also written to `out_dir/results.json`. `engine_api`
    (anything with `Engine` and `AskRequest`) defaults to `plvmctl.engine`. `extra_methods`
    maps further method names to their factories (a laboratory's own baselines). `retrieval`
    adds "who is in this photo" by retrieval (`retrieval_task`); then `methods` may be empty.
    `captions` adds MyVLM's caption recall and its name precision per method (`caption_items`,
    `caption_metrics`). `pairs` adds questions that hold several concepts at once
    (`pair_items`, `pair_metrics`),
    reported apart: the single-concept numbers do not change. `negatives` is a folder of
    photos of people outside the test set for the methods that train on negatives (default:
    the test set's negatives/ folder; see `methods.base.negative_pool`). `echo` gets the lines
    that say which methods start afresh.
    """
    if mcq not in MCQ_MODES:
        raise PlvmError(f"--mcq must be one of {', '.join(MCQ_MODES)}, got {mcq!r}")
    if not methods and not retrieval:
        raise PlvmError("no method to evaluate: pass --method")
    extra = dict(extra_methods or {})
    factories = {name: extra[name] if name in extra else get_method(name) for name in dict.fromkeys(methods)}
    if limit is not None and limit < 1:
        raise PlvmError(f"--limit must be at least 1, got {limit}")
    if neg_per_identity is not None and neg_per_identity < 0:
        raise PlvmError(f"--neg-per-identity must be 0 or more, got {neg_per_identity}")
    if batch_size is not None and batch_size < 1:
        raise PlvmError(f"--batch-size must be at least 1, got {batch_size}")
    if not isinstance(testset, TestSet):
        testset = load_testset(testset)
    recipe = runtime.recipe
    check_recipe_sections(recipe)  # a misspelt method section would leave that method on its defaults
    given = Path(negatives) if negatives is not None else None
    pools = {name: negative_pool(name, TRAINED_ON_NEGATIVES[name](recipe), given, testset.negatives)
             for name in factories if name in TRAINED_ON_NEGATIVES}  # refused before any work
    if "plvm-auto" in factories and (given or testset.negatives):
        pools["plvm-auto"] = negative_pool("plvm-auto", None, given, testset.negatives)
    engine_api = engine_api if engine_api is not None else load_engine_api()
    chunk = batch_size or recipe.generation.batch_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = model_weights(recipe)
    fingerprints = {name: answer_fingerprint(recipe, name, weights, {
        "negatives": {"origin": pools[name].origin, "sha256": pools[name].digest()}} if name in pools else None)
        for name in factories}
    several = several_references_digest(testset)
    if several is not None:  # these methods' concepts come from every ref_img*: which ones decides the answers
        for name in set(factories) & SEVERAL_REFERENCE_METHODS:
            fingerprints[name]["method"]["references_sha256"] = several
    split = EvalSplit(runtime)  # several processes: each asks its share, rank 0 merges (split.py)
    progress = progress and split.process.is_main  # one progress bar, rank 0's
    afresh = split.started([out_dir / "items" / f"{name}.jsonl" for name in factories],
                           lambda: check_run_folder(out_dir, str(testset.root.resolve()), fingerprints, echo))
    items = build_items(testset, limit=limit, neg_per_identity=neg_per_identity, seed=seed)
    references = [Reference(identity.name, identity.reference, identity.references) for identity in testset.identities]
    captioned = caption_items(testset, seed=seed) if captions else []
    paired = pair_items(testset, limit=limit, seed=seed) if pairs else []

    method_results: dict[str, Any] = {}
    for name, factory in factories.items():
        context = MethodContext(runtime=runtime, references=references,
                                cache_dir=out_dir / "cache", engine_api=engine_api,
                                batch_size=batch_size, progress=progress, negatives=pools.get(name))
        prepared = factory(context)
        log = split.item_log(out_dir / "items" / f"{name}.jsonl")
        asked = 0
        try:
            for task in TASKS:
                mode = answer_mode(task, mcq)
                pending = [item for item in split.mine(items[task])
                           if item.missing is None and item.identity not in prepared.unavailable
                           and not log.done(item.key, mode)]
                asked += _answer_items(prepared, engine_api, pending, mode, log, testset.root,
                                       chunk, progress, f"{name}: {TASK_TITLES[task]}")
            if captions:
                pending = [item for item in split.mine(captioned) if not log.done(item.key, RECOGNITION_MODE)
                           and any(c not in prepared.unavailable for c in item.concepts)]
                asked += _answer_items(prepared, engine_api, pending, RECOGNITION_MODE, log,
                                       testset.root, chunk, progress, f"{name}: captions")
            if pairs:
                pending = [item for item in split.mine(paired) if not log.done(item.key, RECOGNITION_MODE)
                           and not any(c in prepared.unavailable for c in item_concepts(item))]
                asked += _answer_items(prepared, engine_api, pending, RECOGNITION_MODE, log,
                                       testset.root, chunk, progress, f"{name}: two concepts")
        finally:
            log.close()
        log, merged = split.merge(log, out_dir / "items" / f"{name}.jsonl",
                                  [items[task] for task in TASKS] + [captioned, paired])
        if log is None:  # not rank 0: its answers are in rank 0's merged log
            continue
        asked += merged
        result = score_method(items, log, mcq, prepared.unavailable)
        if captions:
            result["caption"] = caption_metrics(captioned, log, prepared.unavailable,
                                                [identity.name for identity in testset.identities],
                                                recipe.model.reasoning)
        if pairs:
            result["pairs"] = pair_metrics(paired, log, prepared.unavailable, recipe.model.reasoning)
        result.update({
            "seconds_per_concept": prepared.seconds_per_concept,
            "tokens_per_concept": prepared.tokens_per_concept,
            "concepts": {"made": len(references) - len(prepared.unavailable),
                         "unavailable": dict(prepared.unavailable)},
            "asked_this_run": asked,
            "asked_afresh_because": afresh.get(name),
            "negatives": pools[name].origin if name in pools else None,
            "items_file": f"items/{name}.jsonl",
            "details": prepared.details,
        })
        method_results[name] = result

    results = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.name,
        "model": str(recipe.model.source),
        "testset": str(testset.root.resolve()),
        "testset_is_plvm_val": testset.is_plvm_val,
        "fingerprints": fingerprints,
        "protocol": {
            "limit": limit, "neg_per_identity": neg_per_identity, "seed": seed, "mcq": mcq,
            "batch_size": chunk, "recognition_question": RECOGNITION_QUESTION.format(name="name"),
            "mcq_instruction": MCQ_INSTRUCTION,
            "mcq_likelihood_candidates": "the option letters (A, B, ...)",
        },
        "counts": {
            **testset.counts(),
            "recognition_items": len(items["recognition"]),
            "recognition_positive": sum(1 for i in items["recognition"] if i.expected == "yes"),
            "text_items": len(items["text"]),
            "visual_items": len(items["visual"]),
            **({"pair_items": len(paired)} if pairs else {}),
        },
        "method_order": list(method_results),  # results.json is written with sorted keys
        "methods": method_results,
    }
    if not split.process.is_main:
        return {}  # rank 0 writes the report
    if retrieval:
        results["retrieval"] = retrieval_task(runtime, testset, out_dir, progress=progress)
    if testset.is_plvm_val:
        results["paper"] = PAPER_FIGURES
    write_report(results, out_dir)
    return results

