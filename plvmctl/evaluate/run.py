"""The PLVM paper's evaluation protocol on plvm-val-style test sets: items, metrics, report.

Protocol (the paper's, as described in the test set's README):

- Recognition: "Is <name> in this photo?" for every (identity reference x query photo) pair;
  the expected answer is Yes when both come from the same identity folder, No otherwise.
  Reported: positive accuracy (over expected-Yes pairs), negative accuracy, their mean.
- Text-only and visual multiple-choice QA: the question, the options one per line as
  "A. ...", then an instruction to answer with the option's letter. By default the answer is
  the option whose *letter* the model finds most likely as the answer (`engine.score_options`
  with the letters "A", "B", ... as the candidate answers: one short candidate per option,
  so no length bias, and the same choice greedy decoding would make among the letters; ties
  go to the earlier letter). `mcq="generate"` generates an answer and parses it instead.
- Rows whose photo is missing are reported, skipped from the scores and counted.

Every answered item is appended to `OUT/items/<method>.jsonl` as soon as its batch returns;
a later run with the same OUT asks only what is not there yet, and only while everything that
decides the method's answers is the same (`OUT/items/run.json` holds each method's
fingerprint, plvmctl/fingerprint.py): when it changed, the method's earlier answers and cached
concepts are set aside (`*.previous`) and every item is asked afresh. Answers are re-parsed
from the stored raw text each time the report is written.

Methods that train on photos of other people (Yo'LLaVA, MyVLM, MC-LLaVA) take them from a
pool that holds no test identity: `--negatives DIR`, the recipe's index or folder, or the test
set's own `negatives/` folder (`methods.base.negative_pool`); with none the run is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import random
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from .answers import (
    CAPTION_QUESTION,
    MCQ_INSTRUCTION,
    RECOGNITION_QUESTION,
    mcq_prompt,
    names_concept,
    parse_mcq_answer,
    parse_which,
    parse_yes_no,
    pick_by_likelihood,
)
from .concept import concept_name
from .errors import PlvmError
from .fileio import write_image_atomic, write_json_atomic, write_text_atomic, writing
from .methods import METHOD_CACHES, TRAINED_ON_NEGATIVES, MethodContext, PreparedMethod, Reference, get_method, negative_pool

DEFAULT_TESTSET = Path("../shared/testsets/plvm-val")
SET_FOLDER = "validation_recognition"
VISUAL_FILE = "query_ques.json"
TEXT_FILE = "non_query_ques.json"
NEGATIVES_FOLDER = "negatives"  # photos of people who are not test identities (trained methods' negatives)
QUERY_SUFFIXES = (".jpg", ".jpeg", ".png")
PRIMARY_REFERENCE = "ref_img.png"
PLACEHOLDER = "<sks>"

MCQ_MODES = ("likelihood", "generate")
TASKS = ("recognition", "text", "visual")
TASK_TITLES = {"recognition": "recognition", "text": "text QA", "visual": "visual QA"}
CAPTION_TASK = "caption"  # MyVLM's caption recall; asked only with --captions
PAIR_TASK = "pair"  # two concepts in one question; asked only with --pairs
RECOGNITION_MODE = "generate"  # recognition is always answered by generation + yes/no parsing
UNPARSEABLE_EXAMPLES = 20

LAYOUT_HINT = (f"the plvm-val layout: DIR/{SET_FOLDER}/<Identity>/ref_img.png and query_img*.jpg, "
               f"DIR/{SET_FOLDER}/{VISUAL_FILE} and {TEXT_FILE}")

# Table 1 of the PLVM paper (LLaVA-1.5-7B, 16 context tokens) as quoted in plvm-val's README;
# seconds per concept from the paper's Table 7 (PLVM 0.006 s; Yo'LLaVA ~40 min of training).
PAPER_FIGURES: list[dict[str, Any]] = [
    {"method": "paper: PLVM", "positive": 89.5, "negative": 82.1, "mean": 85.8,
     "text_qa": 85.9, "visual_qa": 77.5, "seconds_per_concept": 0.006, "tokens_per_concept": 16},
    {"method": "paper: Yo'LLaVA", "positive": 74.5, "negative": 75.3, "mean": 74.9,
     "text_qa": 77.4, "visual_qa": 72.9, "seconds_per_concept": 2400.0, "tokens_per_concept": 16},
    {"method": "paper: LLaVA + text prompt", "positive": 80.3, "negative": 61.3, "mean": 70.8,
     "text_qa": 71.8, "visual_qa": 72.3, "seconds_per_concept": None, "tokens_per_concept": 16},
]


# --------------------------------------------------------------------------------------------
# The test set


@dataclass(frozen=True)
class Identity:
    """One identity folder: its concept name, reference photo(s) and query photos."""

    name: str
    folder: Path
    reference: Path  # ref_img.png, else the first ref_img*.* by name
    references: tuple[Path, ...]  # the primary one first
    queries: tuple[Path, ...]


@dataclass(frozen=True)
class McqRow:
    """One published multiple-choice row; `missing` says which referenced file is absent."""

    key: str  # "visual/0012": task and row index in its JSON file
    kind: str  # "visual" | "text"
    identity: str  # the concept the question is about (folder of `ref_img`)
    question: str  # as published, with <sks>
    options: tuple[tuple[str, str], ...]  # (letter, text), letters in order
    answer: str  # the correct letter
    image: Path | None  # the query photo (visual rows)
    missing: str | None = None


@dataclass
class TestSet:
    """A plvm-val-style test set, loaded: identities and the two question files."""

    root: Path
    identities: list[Identity]
    visual: list[McqRow]
    text: list[McqRow]
    is_plvm_val: bool = False
    negatives: Path | None = None  # ROOT/negatives/ when the set has one

    @property
    def query_count(self) -> int:
        return sum(len(identity.queries) for identity in self.identities)

    def counts(self) -> dict[str, int]:
        return {
            "identities": len(self.identities),
            "identities_with_queries": sum(1 for i in self.identities if i.queries),
            "reference_photos": sum(len(i.references) for i in self.identities),
            "query_photos": self.query_count,
            "visual_questions": len(self.visual),
            "text_questions": len(self.text),
            "visual_missing": sum(1 for row in self.visual if row.missing),
            "text_missing": sum(1 for row in self.text if row.missing),
        }


def _natural_key(name: str) -> list[Any]:
    """Sort "query_img2" before "query_img10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _read_identity(folder: Path) -> Identity | None:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    references = sorted((p for p in files if p.name.startswith("ref_img") and "." in p.name),
                        key=lambda p: _natural_key(p.name))
    if not references:
        return None
    primary = next((p for p in references if p.name == PRIMARY_REFERENCE), references[0])
    references = [primary] + [p for p in references if p != primary]
    queries = sorted((p for p in files if p.name.startswith("query_img")
                      and p.suffix.lower() in QUERY_SUFFIXES), key=lambda p: _natural_key(p.name))
    return Identity(name=concept_name(folder.name), folder=folder, reference=primary,
                    references=tuple(references), queries=tuple(queries))


def _read_rows(root: Path, file_name: str, kind: str,
               identities: dict[str, Identity]) -> list[McqRow]:
    path = root / SET_FOLDER / file_name
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise PlvmError(f"malformed {path} line {error.lineno}: {error.msg}") from error
    if not isinstance(data, list):
        raise PlvmError(f"malformed {path}: expected a list of question rows")
    by_folder = {identity.folder.name: identity for identity in identities.values()}
    rows = []
    for index, raw in enumerate(data):
        where = f"{path} row {index}"
        needed = ("ref_img", "question", "multiple_choice", "correct_answer")
        if kind == "visual":
            needed += ("query_img",)
        if not isinstance(raw, dict) or any(key not in raw for key in needed):
            raise PlvmError(f"malformed {where}: needs the keys {', '.join(needed)}")
        choices = raw["multiple_choice"]
        if not isinstance(choices, dict) or not choices:
            raise PlvmError(f"malformed {where}: multiple_choice must be a mapping letter -> text")
        options = tuple(sorted((str(letter).strip().upper(), str(text))
                               for letter, text in choices.items()))
        answer = str(raw["correct_answer"]).strip().upper()
        if answer not in dict(options):
            raise PlvmError(f"malformed {where}: correct_answer {answer!r} is not an option")
        reference_rel = str(raw["ref_img"])
        folder_name = Path(reference_rel).parent.name
        identity = by_folder.get(folder_name)
        missing = None
        if identity is None:
            missing = f"unknown identity {folder_name!r} (no folder with a reference photo)"
        elif not (root / reference_rel).is_file():
            missing = f"missing file {reference_rel}"
        image = None
        if kind == "visual":
            image_rel = str(raw["query_img"])
            image = root / image_rel
            if missing is None and not image.is_file():
                missing = f"missing file {image_rel}"
        rows.append(McqRow(
            key=f"{kind}/{index:04d}",
            kind=kind,
            identity=identity.name if identity else concept_name(folder_name),
            question=str(raw["question"]),
            options=options,
            answer=answer,
            image=image,
            missing=missing,
        ))
    return rows


def _looks_like_plvm_val(root: Path) -> bool:
    """True for the real plvm-val copy: its README's title is "# plvm-val: ..." (a toy set's
    title, "# Toy plvm-val: ...", is not)."""
    readme = root / "README.md"
    if not readme.is_file():
        return False
    first_line = readme.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    return first_line.strip().lower().startswith("# plvm-val")


def load_testset(root: str | Path | None = None) -> TestSet:
    """Load a test set in the plvm-val layout from `root` (default ../shared/testsets/plvm-val,
    relative to the current directory). `root` may also be the validation_recognition folder."""
    root = Path(root) if root is not None else DEFAULT_TESTSET
    if root.name == SET_FOLDER and (root / VISUAL_FILE).exists():
        root = root.parent
    folder = root / SET_FOLDER
    if not folder.is_dir():
        raise PlvmError(f"test set not found at {root}: pass --testset DIR ({LAYOUT_HINT})")
    identities: dict[str, Identity] = {}
    for child in sorted(folder.iterdir(), key=lambda p: p.name):
        if not child.is_dir() or child.name.startswith("."):
            continue
        identity = _read_identity(child)
        if identity is None:
            continue
        if identity.name in identities:
            raise PlvmError(f"identity folders {identities[identity.name].folder.name!r} and "
                            f"{child.name!r} map to the same concept name {identity.name!r}")
        identities[identity.name] = identity
    if not identities:
        raise PlvmError(f"no identity folders with a ref_img.* under {folder} ({LAYOUT_HINT})")
    return TestSet(
        root=root,
        identities=list(identities.values()),
        visual=_read_rows(root, VISUAL_FILE, "visual", identities),
        text=_read_rows(root, TEXT_FILE, "text", identities),
        is_plvm_val=_looks_like_plvm_val(root),
        negatives=root / NEGATIVES_FOLDER if (root / NEGATIVES_FOLDER).is_dir() else None,
    )


# --------------------------------------------------------------------------------------------
# Items


@dataclass(frozen=True)
class EvalItem:
    """One question to ask, with a key that stays the same across runs."""

    key: str
    task: str  # recognition | text | visual
    identity: str  # the concept the question is about
    question: str  # the full prompt text, with <name>
    image: Path | None
    expected: str  # "yes" / "no" for recognition, the correct letter for MCQ
    options: tuple[tuple[str, str], ...] = ()
    missing: str | None = None
    concepts: tuple[str, ...] = ()  # concepts for the prompt beyond those the question names


def recipe_mcq_mode(recipe) -> str:
    """How `recipe` answers multiple choice by default: its `eval.mcq`, else "likelihood".

    A model taught to say the option's value before its letter ("red B", the pocket model)
    needs "generate": the letter is not its first answer token.
    """
    section = recipe.sections.get("eval") or {}
    if not isinstance(section, dict):
        raise PlvmError(f"recipe {recipe.name}: 'eval' must be a mapping")
    mode = section.get("mcq", "likelihood")
    if mode not in MCQ_MODES:
        raise PlvmError(f"recipe {recipe.name}: eval.mcq must be one of {', '.join(MCQ_MODES)}, got {mode!r}")
    return mode


def _mcq_item(row: McqRow) -> EvalItem:
    name = f"<{row.identity}>"
    options = tuple((letter, text.replace(PLACEHOLDER, name)) for letter, text in row.options)
    return EvalItem(
        key=row.key,
        task=row.kind,
        identity=row.identity,
        question=mcq_prompt(row.question.replace(PLACEHOLDER, name), options),
        image=row.image,
        expected=row.answer,
        options=options,
        missing=row.missing,
    )


def recognition_items(testset: TestSet, neg_per_identity: int | None = None,
                      seed: int = 0) -> list[EvalItem]:
    """Every (identity reference, query photo) pair; with `neg_per_identity`, all positives
    and that many negatives per reference identity, sampled with `seed`."""
    items = []
    for reference in testset.identities:
        positives, negatives = [], []
        for owner in testset.identities:
            for query in owner.queries:
                item = EvalItem(
                    key=f"rec/{reference.name}/{owner.folder.name}/{query.name}",
                    task="recognition",
                    identity=reference.name,
                    question=RECOGNITION_QUESTION.format(name=reference.name),
                    image=query,
                    expected="yes" if owner is reference else "no",
                )
                (positives if owner is reference else negatives).append(item)
        if neg_per_identity is not None and neg_per_identity < len(negatives):
            rng = random.Random(f"{seed}/{reference.name}")
            chosen = set(rng.sample(range(len(negatives)), neg_per_identity))
            negatives = [item for i, item in enumerate(negatives) if i in chosen]
        items.extend(positives + negatives)
    return items


def _round_robin(items: list[EvalItem], count: int) -> list[EvalItem]:
    """Up to `count` items taken one identity at a time, so a small cap still spans identities."""
    groups: dict[str, list[EvalItem]] = {}
    for item in items:
        groups.setdefault(item.identity, []).append(item)
    chosen: list[EvalItem] = []
    depth = 0
    while len(chosen) < count and any(depth < len(group) for group in groups.values()):
        for group in groups.values():
            if depth < len(group) and len(chosen) < count:
                chosen.append(group[depth])
        depth += 1
    return chosen


def _cap(items: list[EvalItem], limit: int | None, balance_yes_no: bool = False) -> list[EvalItem]:
    """At most `limit` items (in their original order); recognition keeps half positives."""
    if limit is None or len(items) <= limit:
        return items
    if balance_yes_no:
        positives = [item for item in items if item.expected == "yes"]
        negatives = [item for item in items if item.expected == "no"]
        chosen = _round_robin(positives, math.ceil(limit / 2))
        chosen += _round_robin(negatives, limit - len(chosen))
    else:
        chosen = _round_robin(items, limit)
    keep = {item.key for item in chosen}
    return [item for item in items if item.key in keep]


def build_items(testset: TestSet, *, limit: int | None = None, neg_per_identity: int | None = None,
                seed: int = 0) -> dict[str, list[EvalItem]]:
    """The items of each task: recognition, text, visual (in that order)."""
    return {
        "recognition": _cap(recognition_items(testset, neg_per_identity, seed), limit, True),
        "text": _cap([_mcq_item(row) for row in testset.text], limit),
        "visual": _cap([_mcq_item(row) for row in testset.visual], limit),
    }


# --------------------------------------------------------------------------------------------
# Metrics


def _ratio(correct: int, total: int) -> float | None:
    return correct / total if total else None


def recognition_metrics(pairs: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
    """Accuracy on (expected, predicted) yes/no pairs; a None prediction is wrong either way.

    Returns positive (accuracy over expected "yes"), negative, mean of the two (None when a
    class is empty), the counts behind them and how many answers were unparseable.
    """
    counts = Counter()
    for expected, predicted in pairs:
        cls = "positive" if expected == "yes" else "negative"
        counts[f"{cls}_total"] += 1
        counts[f"{cls}_correct"] += int(predicted == expected)
        counts["unparseable"] += int(predicted is None)
    positive = _ratio(counts["positive_correct"], counts["positive_total"])
    negative = _ratio(counts["negative_correct"], counts["negative_total"])
    mean = (positive + negative) / 2 if positive is not None and negative is not None else None
    return {
        "positive": positive, "negative": negative, "mean": mean,
        "positive_correct": counts["positive_correct"], "positive_total": counts["positive_total"],
        "negative_correct": counts["negative_correct"], "negative_total": counts["negative_total"],
        "unparseable": counts["unparseable"],
    }


def mcq_metrics(pairs: Iterable[tuple[str, str | None]]) -> dict[str, Any]:
    """Accuracy on (expected letter, predicted letter or None) pairs."""
    correct = total = unparseable = 0
    for expected, predicted in pairs:
        total += 1
        correct += int(predicted == expected)
        unparseable += int(predicted is None)
    return {"accuracy": _ratio(correct, total), "correct": correct, "total": total,
            "unparseable": unparseable}


# --------------------------------------------------------------------------------------------
# The per-item log (resumability)


def _mode_for(task: str, mcq: str) -> str:
    return RECOGNITION_MODE if task == "recognition" else mcq


class ItemLog:
    """`OUT/items/<method>.jsonl`: one JSON line per answered item, appended and flushed.

    Records are looked up by (key, mode); a later line for the same pair wins. A damaged
    line (from a crash mid-write) is ignored and the file is re-terminated before appending.
    """

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self._fd: int | None = None
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    self.records[(record["key"], record["mode"])] = record
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def done(self, key: str, mode: str) -> bool:
        """True when the item has an answer without an error."""
        record = self.records.get((key, mode))
        return record is not None and record.get("error") is None

    def append(self, records: list[dict[str, Any]]) -> None:
        with writing(self.path):  # a full disk: `cannot write <this log>: <reason>`
            self._append(records)

    def _append(self, records: list[dict[str, Any]]) -> None:
        """One batch, one appending `os.write` loop: a failure anywhere leaves the batch out of
        `records`, and at worst a torn last line on disk, which a later read skips."""
        text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists() and self.path.stat().st_size > 0:
                with open(self.path, "rb") as existing:
                    existing.seek(-1, 2)
                    if existing.read(1) != b"\n":
                        text = "\n" + text
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        data = memoryview(text.encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        for record in records:
            self.records[(record["key"], record["mode"])] = record

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _relative(path: Path | None, root: Path) -> str | None:
    if path is None:
        return None
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


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
                    "identity": item.identity, "image": _relative(item.image, root),
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


def predict(item: EvalItem, record: Mapping[str, Any]) -> str | None:
    """The answer an item's logged record gives: "yes" / "no", an option letter, or None."""
    if item.task == "recognition":
        return parse_yes_no(record.get("answer"))
    if record.get("scores") is not None:
        letters = [letter for letter, _ in item.options]
        return pick_by_likelihood(letters, [record["scores"].get(letter) for letter in letters])
    return parse_mcq_answer(record.get("answer"), item.options)


def logged_items(items: dict[str, list[EvalItem]], log: ItemLog, mcq: str,
                 unavailable: Mapping[str, str] | None = None):
    """Per item of each task, in order: (task, item, its logged record, why it is not scored
    or None). Its record is None when the item is skipped."""
    for task in TASKS:
        mode = _mode_for(task, mcq)
        for item in items[task]:
            record = log.records.get((item.key, mode))
            reason = item.missing or (unavailable or {}).get(item.identity)
            if reason is None and record is None:
                reason = "not answered"
            if reason is None and record.get("error") is not None:
                reason = f"engine error: {record['error']}"
            yield task, item, (None if reason else record), reason


def score_method(items: dict[str, list[EvalItem]], log: ItemLog, mcq: str,
                 unavailable: Mapping[str, str]) -> dict[str, Any]:
    """Metrics of one method from its item log, with the skipped and unparseable items."""
    skipped: list[dict[str, str]] = []
    unparseable: list[dict[str, Any]] = []
    pairs: dict[str, list[tuple[str, str | None]]] = {task: [] for task in TASKS}
    decided = Counter(answers=0, no=0, correct=0)
    for task, item, record, reason in logged_items(items, log, mcq, unavailable):
        if reason is not None:
            skipped.append({"key": item.key, "task": task, "reason": reason})
            continue
        predicted = predict(item, record)
        if predicted is None:
            unparseable.append({"key": item.key, "task": task, "answer": record.get("answer")})
        pairs[task].append((item.expected, predicted))
        if task == "recognition" and record.get("decided_by") == "retrieval":
            decided["answers"] += 1
            decided["correct"] += int(predicted == item.expected)
            decided["no"] += int(predicted == "no")
    reasons = Counter((entry["task"], entry["reason"]) for entry in skipped)
    recognition = recognition_metrics(pairs["recognition"])
    recognition["decided_by_retrieval"] = {  # plvm-auto's "No." when retrieval missed the concept
        **decided, "of_no_answers": sum(1 for _, predicted in pairs["recognition"] if predicted == "no")}
    return {
        "recognition": recognition,
        "text_qa": mcq_metrics(pairs["text"]),
        "visual_qa": mcq_metrics(pairs["visual"]),
        "skipped": {
            "total": len(skipped),
            "by_task": {task: sum(1 for e in skipped if e["task"] == task) for task in TASKS},
            "reasons": [{"task": task, "reason": reason, "count": count}
                        for (task, reason), count in sorted(reasons.items())],
            "items": skipped,
        },
        "unparseable": {
            "total": len(unparseable),
            "by_task": {task: sum(1 for e in unparseable if e["task"] == task) for task in TASKS},
            "examples": unparseable[:UNPARSEABLE_EXAMPLES],
        },
    }


# --------------------------------------------------------------------------------------------
# Who is in this photo (retrieval)

TOY_SIDECAR = "toy_world.json"


def photo_truth(testset: TestSet) -> dict[Path, set[str]]:
    """Every query photo → the test identities in it: its folder's, and (on a toy set, whose
    toy_world.json says who stands in each photo) any other test identity drawn in it."""
    truth = {query: {identity.name} for identity in testset.identities for query in identity.queries}
    sidecar = testset.root / TOY_SIDECAR
    if sidecar.is_file():
        try:
            scenes = json.loads(sidecar.read_text(encoding="utf-8")).get("scenes", {})
        except (json.JSONDecodeError, AttributeError):
            raise PlvmError(f"malformed {sidecar}: expected {{'scenes': {{photo: scene}}}}") from None
        names = {identity.name for identity in testset.identities}
        for relative, scene in scenes.items():
            photo = testset.root / relative
            if photo in truth and isinstance(scene, dict):
                truth[photo] |= {p.get("name") for p in scene.get("people", []) if p.get("name") in names}
    return truth


def caption_items(testset: TestSet) -> list[EvalItem]:
    """One "Describe this photo." per query photo, with the test identities in it (photo_truth)
    as the prompt's concepts; `expected` lists them, comma-separated. A method that finds
    concepts itself (plvm-auto) replaces them with the ones it found."""
    items = []
    for photo, names in photo_truth(testset).items():
        present = tuple(sorted(names))
        items.append(EvalItem(key=f"caption:{_relative(photo, testset.root)}", task=CAPTION_TASK,
                              identity=present[0] if present else "", question=CAPTION_QUESTION,
                              image=photo, expected=",".join(present), concepts=present))
    return items


def caption_metrics(items: list[EvalItem], log: ItemLog, unavailable: Mapping[str, str]) -> dict[str, Any]:
    """MyVLM's caption recall: over (photo, concept in it) pairs, the share whose generated
    description names the concept; also the share of photos that name all their concepts.
    Pairs of concepts the method could not make, and photos without an answer, are skipped."""
    pairs = named = photos = complete = skipped = 0
    missed: dict[str, int] = {}
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        present = [name for name in item.concepts if name not in unavailable]
        if not present:
            continue
        if record is None or record.get("error") is not None:
            skipped += 1
            continue
        hits = [names_concept(record.get("answer"), name) for name in present]
        pairs += len(present)
        named += sum(hits)
        photos += 1
        complete += all(hits)
        for name, hit in zip(present, hits):
            if not hit:
                missed[name] = missed.get(name, 0) + 1
    return {"question": CAPTION_QUESTION, "recall": _ratio(named, pairs), "pairs": pairs,
            "named": named, "photos": photos, "photos_all_named": _ratio(complete, photos),
            "skipped_photos": skipped, "missed_by_concept": dict(sorted(missed.items()))}


def pair_items(testset: TestSet, *, limit: int | None = None, seed: int = 0) -> list[EvalItem]:
    """Two concepts in one question, three items per query photo of identity A, with B another
    test identity not in the photo (seeded): "Is <A> in this photo?" with B's sentence in the
    prompt too (expected yes), "Is <B> in this photo?" with A's (no), and "Which of <A> and
    <B> is in this photo?" (names in a seeded order; expected A). `limit` caps the photos
    (three items each), taken one identity at a time."""
    from .data.templates import WHICH_QUESTIONS

    truth = photo_truth(testset)
    names = [identity.name for identity in testset.identities]
    groups: list[list[list[EvalItem]]] = []
    for identity in testset.identities:
        triples = []
        for query in identity.queries:
            others = [name for name in names if name not in truth[query]]
            if not others:
                continue
            rng = random.Random(f"{seed}/pair/{identity.name}/{query.name}")
            other = rng.choice(others)
            first, second = (identity.name, other) if rng.random() < 0.5 else (other, identity.name)
            where = f"{identity.name}+{other}/{_relative(query, testset.root)}"
            triples.append([
                EvalItem(f"pair/yes/{where}", PAIR_TASK, identity.name,
                         RECOGNITION_QUESTION.format(name=identity.name), query, "yes", concepts=(other,)),
                EvalItem(f"pair/no/{where}", PAIR_TASK, other,
                         RECOGNITION_QUESTION.format(name=other), query, "no", concepts=(identity.name,)),
                EvalItem(f"pair/which/{where}", PAIR_TASK, identity.name,
                         WHICH_QUESTIONS[0].format(a=first, b=second), query, identity.name,
                         concepts=(other,)),
            ])
        groups.append(triples)
    chosen: list[EvalItem] = []
    depth = 0
    while any(depth < len(group) for group in groups) and (limit is None or len(chosen) < 3 * limit):
        for group in groups:
            if depth < len(group) and (limit is None or len(chosen) < 3 * limit):
                chosen += group[depth]
        depth += 1
    return chosen


def item_concepts(item: EvalItem) -> list[str]:
    """Every concept an item's prompt holds: the one it is about, the ones it names, the extra."""
    from .prompt import mentioned_names

    return list(dict.fromkeys([item.identity, *mentioned_names(item.question), *item.concepts]))


def pair_metrics(items: list[EvalItem], log: "ItemLog", unavailable: Mapping[str, str]) -> dict[str, Any]:
    """Recognition with a second concept in the prompt (positive / negative / mean) and the
    "which of the two" accuracy, over the answered items whose concepts were all made."""
    recognition: list[tuple[str, str | None]] = []
    which = right = unparsed = skipped = 0
    for item in items:
        record = log.records.get((item.key, RECOGNITION_MODE))
        if any(name in unavailable for name in item_concepts(item)) or record is None \
                or record.get("error") is not None:
            skipped += 1
            continue
        if item.expected in ("yes", "no"):
            recognition.append((item.expected, parse_yes_no(record.get("answer"))))
            continue
        said = parse_which(record.get("answer"), item_concepts(item))
        which += 1
        right += int(said == item.expected)
        unparsed += int(said is None)
    return {"recognition": recognition_metrics(recognition),
            "which": {"accuracy": _ratio(right, which), "items": which, "unparseable": unparsed},
            "skipped": skipped}


def retrieval_task(runtime: Any, testset: TestSet, out_dir: Path, *, progress: bool = False) -> dict[str, Any]:
    """"Who is in this photo?" by retrieval: every query photo searched for all test
    identities' keys (PLVM concepts of their reference photos; recognise.py, the recipe's
    `retrieval` settings). Micro precision / recall / F1 over (photo, identity) pairs, top-1
    accuracy, and the threshold with the best F1 on this set (calibrate_threshold). Each
    photo's truth, found concepts and best candidates go to OUT/items/retrieval.jsonl."""
    from .concept_index import KeyIndex
    from .images import load_image
    from .recognise import calibrate_threshold, look, presence_metrics, retrieval_config

    config = retrieval_config(runtime.recipe)
    concepts = {c.name: c for c in runtime.encode_concepts(
        [(identity.name, identity.reference) for identity in testset.identities])}
    index = KeyIndex.from_concepts(concepts, runtime.encoder_fingerprint)
    engine = None
    if config.verify:  # retrieve, then verify (recognise.verify)
        from .engine import Engine

        engine = Engine(runtime, concepts)
    truth = photo_truth(testset)
    photos = list(truth)
    looked = []
    bar = tqdm(total=len(photos), desc="retrieval: who is in this photo", unit="photo", disable=not progress)
    for start in range(0, len(photos), config.batch_size):
        chunk = photos[start:start + config.batch_size]
        looked += look(runtime, index, [load_image(p) for p in chunk], config, engine)
        bar.update(len(chunk))
    bar.close()
    metrics = presence_metrics([truth[p] for p in photos], [[f.name for f in l.found] for l in looked])
    top1 = sum(bool(l.candidates) and l.candidates[0].name in truth[p] for p, l in zip(photos, looked))
    scores, present = [], []  # for calibration: what a photo's top K could ever find
    for photo, result in zip(photos, looked):
        best = {f.name: f.score for f in result.candidates[:config.top_k]}
        for name in concepts:
            scores.append(best.get(name))
            present.append(name in truth[photo])
    records = [{"image": _relative(p, testset.root), "truth": sorted(truth[p]),
                "found": [f.to_json() for f in l.found],
                "candidates": [f.to_json() for f in l.candidates[:5]]} for p, l in zip(photos, looked)]
    write_text_atomic(out_dir / "items" / "retrieval.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return {**metrics, "threshold": config.threshold, "top_k": config.top_k, "crops": config.crops,
            "verify": config.verify,
            "identities": len(concepts), "top1_accuracy": top1 / len(photos) if photos else None,
            "best_threshold": calibrate_threshold(scores, present) if any(present) else None,
            "items_file": "items/retrieval.jsonl"}


# --------------------------------------------------------------------------------------------
# Running


def load_engine_api() -> Any:
    """The real engine: `Engine` (with every method's ask-time hooks) and `AskRequest`."""
    from .engine import AskRequest
    from .methods import make_engine

    return SimpleNamespace(Engine=make_engine, AskRequest=AskRequest)


RUN_FILE = "run.json"


def _set_aside(path: Path) -> None:
    """Move `path` to `path.previous` (replacing an older one)."""
    old = path.with_name(path.name + ".previous")
    if old.is_dir():
        shutil.rmtree(old)
    os.replace(path, old)


def check_run_folder(out_dir: Path, testset_root: str, fingerprints: Mapping[str, Any],
                     echo: Callable[[str], None]) -> dict[str, str]:
    """Resume only what is the same: a method whose answers in `out_dir` were made under another
    fingerprint (or under none recorded) has its item log and its cache set aside and starts
    afresh, said in one line; the others are resumed. Returns {method: what changed}.

    A folder made on another test set is refused (its item keys would mean other photos).
    """
    path = out_dir / "items" / RUN_FILE
    previous: dict[str, Any] = {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = {}
    if previous.get("testset") not in (None, testset_root):
        raise PlvmError(f"{out_dir} holds answers for testset {previous['testset']!r}, not "
                        f"{testset_root!r}: pass another --out")
    from .fingerprint import first_difference

    known = previous.get("methods") if isinstance(previous.get("methods"), dict) else {}
    changed: dict[str, str] = {}
    for name, fingerprint in fingerprints.items():
        log = out_dir / "items" / f"{name}.jsonl"
        if not log.exists() or known.get(name) == fingerprint:
            continue
        changed[name] = (first_difference(known[name], fingerprint) if name in known
                         else "no fingerprint recorded with its answers")
        _set_aside(log)
        cache = out_dir / "cache" / METHOD_CACHES.get(name, "")
        if name in METHOD_CACHES and cache.exists():
            _set_aside(cache)
        echo(f"{name}: asked afresh, what decides its answers changed ({changed[name]}); "
             f"earlier answers in items/{name}.jsonl.previous")
    write_json_atomic(path, {"testset": testset_root, "methods": {**known, **fingerprints}})
    return changed


def _echo_stderr(message: str) -> None:
    print(message, file=sys.stderr)


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
    `captions` adds MyVLM's caption recall per method (`caption_items`, `caption_metrics`).
    `pairs` adds questions that hold two concepts at once (`pair_items`, `pair_metrics`),
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
    given = Path(negatives) if negatives is not None else None
    pools = {name: negative_pool(name, TRAINED_ON_NEGATIVES[name](recipe), given, testset.negatives)
             for name in factories if name in TRAINED_ON_NEGATIVES}  # refused before any work
    if "plvm-auto" in factories and (given or testset.negatives):
        pools["plvm-auto"] = negative_pool("plvm-auto", None, given, testset.negatives)
    engine_api = engine_api if engine_api is not None else load_engine_api()
    chunk = batch_size or recipe.generation.batch_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .fingerprint import answer_fingerprint, model_weights

    weights = model_weights(recipe)
    fingerprints = {name: answer_fingerprint(recipe, name, weights, {
        "negatives": {"origin": pools[name].origin, "sha256": pools[name].digest()}} if name in pools else None)
        for name in factories}
    afresh = check_run_folder(out_dir, str(testset.root.resolve()), fingerprints, echo)
    items = build_items(testset, limit=limit, neg_per_identity=neg_per_identity, seed=seed)
    references = [Reference(identity.name, identity.reference) for identity in testset.identities]
    captioned = caption_items(testset) if captions else []
    paired = pair_items(testset, limit=limit, seed=seed) if pairs else []

    method_results: dict[str, Any] = {}
    for name, factory in factories.items():
        context = MethodContext(runtime=runtime, references=references,
                                cache_dir=out_dir / "cache", engine_api=engine_api,
                                batch_size=batch_size, progress=progress, negatives=pools.get(name))
        prepared = factory(context)
        log = ItemLog(out_dir / "items" / f"{name}.jsonl")
        asked = 0
        try:
            for task in TASKS:
                mode = _mode_for(task, mcq)
                pending = [item for item in items[task]
                           if item.missing is None and item.identity not in prepared.unavailable
                           and not log.done(item.key, mode)]
                asked += _answer_items(prepared, engine_api, pending, mode, log, testset.root,
                                       chunk, progress, f"{name}: {TASK_TITLES[task]}")
            if captions:
                pending = [item for item in captioned if not log.done(item.key, RECOGNITION_MODE)
                           and any(c not in prepared.unavailable for c in item.concepts)]
                asked += _answer_items(prepared, engine_api, pending, RECOGNITION_MODE, log,
                                       testset.root, chunk, progress, f"{name}: captions")
            if pairs:
                pending = [item for item in paired if not log.done(item.key, RECOGNITION_MODE)
                           and not any(c in prepared.unavailable for c in item_concepts(item))]
                asked += _answer_items(prepared, engine_api, pending, RECOGNITION_MODE, log,
                                       testset.root, chunk, progress, f"{name}: two concepts")
        finally:
            log.close()
        result = score_method(items, log, mcq, prepared.unavailable)
        if captions:
            result["caption"] = caption_metrics(captioned, log, prepared.unavailable)
        if pairs:
            result["pairs"] = pair_metrics(paired, log, prepared.unavailable)
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
    if retrieval:
        results["retrieval"] = retrieval_task(runtime, testset, out_dir, progress=progress)
    if testset.is_plvm_val:
        results["paper"] = PAPER_FIGURES
    write_report(results, out_dir)
    return results


# --------------------------------------------------------------------------------------------
# The report


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    if value is None:
        return "–"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _method_names(results: Mapping[str, Any]) -> list[str]:
    return list(results.get("method_order") or results["methods"])


def method_row(results: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The table figures of one evaluated method (accuracies as fractions)."""
    result = results["methods"][name]
    return {
        "method": name,
        "positive": result["recognition"]["positive"],
        "negative": result["recognition"]["negative"],
        "mean": result["recognition"]["mean"],
        "text_qa": result["text_qa"]["accuracy"],
        "visual_qa": result["visual_qa"]["accuracy"],
        "seconds_per_concept": result["seconds_per_concept"],
        "tokens_per_concept": result["tokens_per_concept"],
    }


def table_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method (accuracies as fractions), then the paper's rows when present."""
    rows = [dict(method_row(results, name), paper=False) for name in _method_names(results)]
    for figures in results.get("paper", []):
        row = dict(figures, paper=True)
        for key in ("positive", "negative", "mean", "text_qa", "visual_qa"):
            row[key] = figures[key] / 100
        rows.append(row)
    return rows


def render_markdown(results: Mapping[str, Any]) -> str:
    """results.md: the method table, the skipped and unparseable summaries, the protocol."""
    counts, protocol = results["counts"], results["protocol"]
    mcq = ("likelihood of each option's letter" if protocol["mcq"] == "likelihood"
           else "generated answer, parsed")
    lines = [
        f"# Evaluation: recipe `{results['recipe']}` (model `{results['model']}`)",
        "",
        f"- Test set: `{results['testset']}`: {counts['identities']} identities, "
        f"{counts['query_photos']} query photos",
        f"- Recognition: \"{protocol['recognition_question']}\" on {counts['recognition_items']} "
        f"(reference, query) pairs, {counts['recognition_positive']} of them positive",
        f"- Text QA: {counts['text_items']} questions; visual QA: {counts['visual_items']} "
        f"questions (of all rows, {counts['text_missing']} text and {counts['visual_missing']} "
        f"visual reference a missing file); MCQ answer: {mcq}",
        f"- Options: limit {protocol['limit'] or 'none'} per task, negatives per identity "
        f"{protocol['neg_per_identity'] if protocol['neg_per_identity'] is not None else 'all'}, "
        f"seed {protocol['seed']}, batch size {protocol['batch_size']}",
        "",
        "| Method | Recognition Pos | Recognition Neg | Recognition Mean | Text QA | Visual QA "
        "| s/concept | tokens/concept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table_rows(results):
        name = f"*{row['method']}*" if row["paper"] else row["method"]
        cells = [name] + [_percent(row[key]) for key in
                          ("positive", "negative", "mean", "text_qa", "visual_qa")]
        cells += [_number(row["seconds_per_concept"]), _number(row["tokens_per_concept"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies in %."]
    if results.get("paper"):
        lines.append("Rows in italics: the PLVM paper's Table 1 (LLaVA-1.5-7B, 16 context tokens) "
                     "as quoted in the test set's README; s/concept from its Table 7 "
                     "(Yo'LLaVA: ~40 min of training per concept).")
    if results.get("retrieval"):
        lines += _retrieval_lines(results["retrieval"])
    captioned = [name for name in _method_names(results) if results["methods"][name].get("caption")]
    if captioned:
        lines += ["", "## Caption recall (MyVLM's metric)", "",
                  f"\"{CAPTION_QUESTION}\" for every query photo, with the test identities in it "
                  "given to the prompt (plvm-auto: those it found by retrieval); a concept counts "
                  "as recalled when the description names it.", "",
                  "| Method | Caption recall | photos naming all | named / pairs |", "|---|---:|---:|---:|"]
        for name in captioned:
            c = results["methods"][name]["caption"]
            lines.append(f"| {name} | {_percent(c['recall'])} | {_percent(c['photos_all_named'])} "
                         f"| {c['named']} / {c['pairs']} |")
    paired = [name for name in _method_names(results) if results["methods"][name].get("pairs")]
    if paired:
        lines += ["", "## Two concepts in one question", "",
                  "Per query photo of identity A and another test identity B not in it: \"Is <A> in "
                  "this photo?\" (yes) and \"Is <B> in this photo?\" (no), each with both concepts' "
                  "sentences in the prompt, and \"Which of <A> and <B> is in this photo?\" (A; "
                  "the answer's first-named of the two counts). Apart from the table above, whose "
                  "numbers it does not change.", "",
                  "| Method | Rec. Pos | Rec. Neg | Rec. Mean | Which of two | which unparseable |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in paired:
            pair = results["methods"][name]["pairs"]
            rec = pair["recognition"]
            lines.append(f"| {name} | {_percent(rec.get('positive'))} | {_percent(rec.get('negative'))} "
                         f"| {_percent(rec.get('mean'))} | {_percent(pair['which']['accuracy'])} "
                         f"| {pair['which']['unparseable']} / {pair['which']['items']} |")
    lines += ["", "## Skipped items (not scored)", ""]
    for name in _method_names(results):
        skipped = results["methods"][name]["skipped"]
        if not skipped["total"]:
            lines.append(f"- {name}: none")
            continue
        parts = [f"{TASK_TITLES[r['task']]}: {r['count']} × {r['reason']}"
                 for r in skipped["reasons"]]
        lines.append(f"- {name}: {skipped['total']} ({'; '.join(parts)})")
    notes = [(name, note) for name in _method_names(results) for note in _method_notes(results["methods"][name])]
    if notes:
        lines += ["", "## Method notes", ""]
        lines += [f"- {name}: {note}" for name, note in notes]
    lines += ["", "## Unparseable answers (counted as wrong)", ""]
    for name in _method_names(results):
        unparseable = results["methods"][name]["unparseable"]
        by_task = ", ".join(f"{TASK_TITLES[t]} {n}" for t, n in unparseable["by_task"].items())
        example = ""
        if unparseable["examples"]:
            first = unparseable["examples"][0]
            example = f"; e.g. {first['key']}: {json.dumps(first['answer'])}"
        lines.append(f"- {name}: {unparseable['total']} ({by_task}){example}")
    lines.append("")
    return "\n".join(lines)


def _method_notes(method: Mapping[str, Any]) -> list[str]:
    """results.md: what a reader must know about a method's numbers (its details' note, where
    its negatives came from, how many "no"s retrieval gave without the model)."""
    notes = [(method.get("details") or {}).get("note")]
    if method.get("negatives"):
        notes.append(f"trained with negatives from {method['negatives']}")
    decided = method["recognition"].get("decided_by_retrieval") or {}
    if decided.get("answers"):
        notes.append(f"{decided['no']} of its {decided['of_no_answers']} recognition \"no\" answers were "
                     f"decided by retrieval alone, without the model ({decided['correct']} of them correct)")
    return [note for note in notes if note]


def _retrieval_lines(found: Mapping[str, Any]) -> list[str]:
    """results.md: the "who is in this photo" section."""
    lines = ["", "## Who is in this photo (retrieval)", "",
             f"Every query photo ({found['photos']}) searched for all {found['identities']} test "
             f"identities' retrieval keys ({found['crops']} crops, "
             + (f"the {found['verify']} best candidates verified by asking the model"
                if found.get("verify") else f"cosine >= {found['threshold']:g}")
             + f", at most {found['top_k']} per photo).", "",
             "| Precision | Recall | F1 | Top-1 | found / true / correct |", "|---:|---:|---:|---:|---:|",
             f"| {_percent(found['precision'])} | {_percent(found['recall'])} | {_percent(found['f1'])} "
             f"| {_percent(found['top1_accuracy'])} | {found['predicted']} / {found['actual']} / "
             f"{found['true_positive']} |"]
    best = found.get("best_threshold")
    if best and not found.get("verify"):
        lines += ["", f"Calibrated on this set: threshold {best['threshold']:.4f} gives precision "
                      f"{_percent(best['precision'])}, recall {_percent(best['recall'])}, F1 "
                      f"{_percent(best['f1'])} (set it with `--set retrieval.threshold=...` or the "
                      f"recipe's `retrieval:` section; choose it on another set than the one reported)."]
    return lines


_CHART_METRICS = (("positive", "Rec. Pos"), ("negative", "Rec. Neg"), ("mean", "Rec. Mean"),
                  ("text_qa", "Text QA"), ("visual_qa", "Visual QA"))
_CHART_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                  (140, 86, 75), (227, 119, 194), (127, 127, 127))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without a scalable default font
        return ImageFont.load_default()


def draw_chart(results: Mapping[str, Any], path: str | Path) -> None:
    """results.png: grouped bars, one group per accuracy metric, one bar per method."""
    methods = [row for row in table_rows(results) if not row["paper"]]
    width, height = 960, 540
    left, right, top, bottom = 80, 200, 70, 80
    plot_w, plot_h = width - left - right, height - top - bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(20), _font(14), _font(11)

    draw.text((left, 18), f"plvmctl eval: recipe {results['recipe']}", fill="black",
              font=title_font)
    for tick in range(0, 101, 20):  # y grid and tick labels
        y = top + plot_h - plot_h * tick / 100
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), str(tick), fill="black", font=font, anchor="rm")
    draw.line([(left, top), (left, top + plot_h)], fill="black")
    draw.line([(left, top + plot_h), (left + plot_w, top + plot_h)], fill="black")

    group_w = plot_w / len(_CHART_METRICS)
    bar_w = group_w * 0.8 / max(1, len(methods))
    for g, (key, label) in enumerate(_CHART_METRICS):
        group_x = left + g * group_w + group_w * 0.1
        for m, row in enumerate(methods):
            x0 = group_x + m * bar_w
            value = row[key]
            colour = _CHART_COLOURS[m % len(_CHART_COLOURS)]
            if value is None:
                draw.text((x0 + bar_w / 2, top + plot_h - 4), "n/a", fill="gray", font=small,
                          anchor="md")
                continue
            y = top + plot_h - plot_h * value
            draw.rectangle([x0 + 1, y, x0 + bar_w - 1, top + plot_h], fill=colour)
            draw.text((x0 + bar_w / 2, y - 2), f"{100 * value:.0f}", fill="black", font=small,
                      anchor="md")
        draw.text((left + g * group_w + group_w / 2, top + plot_h + 8), label, fill="black",
                  font=font, anchor="ma")
    draw.text((left + plot_w / 2, height - 24), "metric", fill="black", font=font, anchor="mm")

    y_label = Image.new("RGB", (160, 24), "white")  # rotated y-axis label
    ImageDraw.Draw(y_label).text((80, 12), "accuracy (%)", fill="black", font=font, anchor="mm")
    y_label = y_label.rotate(90, expand=True)
    image.paste(y_label, (14, top + plot_h // 2 - y_label.height // 2))

    legend_x, legend_y = left + plot_w + 20, top
    draw.text((legend_x, legend_y), "method", fill="black", font=font)
    for m, row in enumerate(methods):
        y = legend_y + 26 + m * 24
        colour = _CHART_COLOURS[m % len(_CHART_COLOURS)]
        draw.rectangle([legend_x, y, legend_x + 16, y + 16], fill=colour)
        draw.text((legend_x + 24, y + 8), row["method"], fill="black", font=font, anchor="lm")

    write_image_atomic(path, image)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> None:
    """results.json, results.md and results.png in `out_dir` (each written atomically)."""
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "results.json", results)
    write_text_atomic(out_dir / "results.md", render_markdown(results))
    draw_chart(results, out_dir / "results.png")
