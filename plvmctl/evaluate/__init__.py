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

The package, read from the bottom up:

    testset.py   a test set on disk: identities, photos, published rows, who is in each photo
    items.py     the questions to ask (EvalItem) and how each task is answered
    itemlog.py   OUT/items/<method>.jsonl: answers appended as they come, read back per item
    metrics.py   the scores, from an item log
    resume.py    which methods of an earlier run folder may be resumed (OUT/items/run.json)
    who.py       "who is in this photo": every query photo searched for all test identities
    report.py    results.json, results.md and results.png
    run.py       run_evaluation: prepare, ask, score, report
    item_stats.py  beyond the headline numbers: McNemar, per-question and per-trait readings

This module re-exports the names the command line, the laboratory, bench/ and the tests use.
"""

from .itemlog import ItemLog, logged_items, predict
from .items import (
    CAPTION_TASK,
    MCQ_MODES,
    PAIR_KINDS,
    PAIR_TASK,
    RECOGNITION_MODE,
    TASK_TITLES,
    TASKS,
    EvalItem,
    answer_mode,
    build_items,
    caption_items,
    item_concepts,
    pair_items,
    recipe_mcq_mode,
    recognition_items,
)
from .metrics import caption_metrics, mcq_metrics, pair_metrics, recognition_metrics, score_method, set_metrics
from .report import (PAPER_FIGURES, caption_lines, draw_chart, method_row, pair_lines, render_markdown, table_rows,
                     write_report)
from .resume import RUN_FILE, check_run_folder
from .run import load_engine_api, run_evaluation
from .testset import (DEFAULT_TESTSET, SET_FOLDER, Identity, McqRow, TestSet, group_photos, load_testset,
                      photo_truth)
from .who import retrieval_task

__all__ = [
    "CAPTION_TASK", "DEFAULT_TESTSET", "MCQ_MODES", "PAIR_KINDS", "PAIR_TASK", "PAPER_FIGURES", "RECOGNITION_MODE",
    "RUN_FILE", "SET_FOLDER", "TASKS", "TASK_TITLES", "EvalItem", "Identity", "ItemLog", "McqRow",
    "TestSet", "answer_mode", "build_items", "caption_items", "caption_lines", "caption_metrics", "check_run_folder",
    "draw_chart", "group_photos", "item_concepts", "load_engine_api", "load_testset", "logged_items", "mcq_metrics",
    "method_row", "pair_items", "pair_lines", "pair_metrics", "photo_truth", "predict", "recipe_mcq_mode",
    "recognition_items", "recognition_metrics", "render_markdown", "retrieval_task", "run_evaluation",
    "score_method", "set_metrics", "table_rows", "write_report",
]
