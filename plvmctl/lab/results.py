"""docs/results.md from one command: the main table and two ablations, measured, never typed.

    python -m plvmctl.lab.results [--out-dir runs/results] [--doc docs/results.md] ...   (make results)

Steps (each one's outputs stay under --out-dir, so a repeated run skips what is finished):

    testset       the toy test set of held-out identities (`plvmctl toy testset`, seed 0),
                  written only when --testset has no validation_recognition/ yet
    several-photos  concepts from several photos (plvmctl/lab/several_photos.py): PLVM with 1,
                  2 and 4 clean and hard references of the test set's identities (seed 0), and
                  Yo'LLaVA trained on the same 1 and 4 photos for the first 10 of them
    main          `plvmctl --recipe pocket eval --pairs --captions` of every method of the main
                  table on it (as `make eval`: sampled negatives, MCQ as the recipe's eval.mcq
                  says; plus the questions of several concepts at once, on the query photos and
                  the toy set's group photos, and captions with recall and name precision)
    data          the toy training data `make pocket` trains its Aligner on (same profile)
    train-wW-kK   an Aligner trained as the first, one-photo part of the pocket one (profile
                  "full", stage 5 of plvmctl.lab.pocket) except for the Yes/No weight w or the
                  context tokens k: w in {1, 20} at k = 16 and k in {4, 8, 16} at w = 20. The
                  w = 20, k = 16 run serves both ablations. It is the pocket model's own
                  Aligner (its row the main table's `plvm`, its training the card's) only when
                  that Aligner has no part with several photos and --aligner-steps is the
                  profile's; otherwise it is trained too
    eval-wW-kK    `eval --method plvm` with that Aligner (aligner.path / aligner.num_context)
    doc           docs/results.md (and OUT/results.json), written atomically

Why the step markers: a step's outputs alone cannot say under which settings they were made
(another model, another test set, other negatives, other code). Each step writes
OUT/steps/NAME.json with its settings before it starts and marks it finished at the end. The
settings hold what decides the step's outputs: the weights' sha256, the digest of plvmctl's
source, and for an evaluation each method's answer fingerprint (plvmctl/fingerprint.py: the
resolved recipe, method settings included). A later run reuses a finished step whose settings
are the same and resumes an unfinished one (evaluation per item, training from its
checkpoint); a step made with other settings runs again, said in one line: a training from
scratch, an evaluation asking afresh the methods whose fingerprint changed (run_evaluation's
own rule). Two experiments are never mixed in one table.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import click

from ..errors import PlvmError
from ..evaluate import caption_lines, pair_lines
from ..evaluate import method_row as evaluated_row
from ..answers import DESCRIPTION_MAX_NEW_TOKENS
from ..fileio import write_json_atomic, write_text_atomic
from ..fingerprint import answer_fingerprint, first_difference, model_weights, source_digest, weights_digest

RECIPE = "pocket"
DEVICE = "cpu"  # the pocket model is made for a CPU; its timings are CPU timings
SEED = 0  # the seed of `make pocket` and of `make eval`'s test set
MIN_IDENTITIES = 40  # the issue asks for at least 40 held-out identities

TRUTH = "llava-truth"
PLVM = "plvm"
TASK_RECOGNITION = "recognition"
MAIN_METHODS = ("plvm", "llava-none", "llava-text", "yollava", "myvlm", "mcllava", TRUTH)
TRAINED_METHODS = ("yollava", "myvlm", "mcllava")  # trained concepts: --skip-trained leaves them out
METHOD_TITLES = {
    TRUTH: "pocket LVLM + the true description (what the base model can do with words)",
    "plvm": "pocket PLVM",
    "llava-none": "pocket LVLM, no prompt",
    "llava-text": "pocket LVLM + ~16-token text prompt",
    "yollava": "Yo'LLaVA on the pocket LVLM",
    "myvlm": "MyVLM on the pocket LVLM",
    "mcllava": "MC-LLaVA on the pocket LVLM",
}
YES_NO_WEIGHTS = (1.0, 20.0)  # ablated at k = PLVM_CONTEXT
CONTEXT_SIZES = (4, 8, 16)  # ablated at w = PLVM_WEIGHT
PLVM_WEIGHT = 20.0
PLVM_CONTEXT = 16

DEFAULTS = {"out_dir": "runs/results", "doc": "docs/results.md", "testset": "runs/toy-testset",
            "identities": 40, "neg_per_identity": 30, "threads": 1}


# --------------------------------------------------------------------------------------------
# The ablation plan


@dataclass(frozen=True)
class AblationRun:
    """One Aligner of the ablations: Yes/No weight w and k context tokens."""

    yes_no_weight: float
    num_context: int

    @property
    def name(self) -> str:
        return f"w{self.yes_no_weight:g}-k{self.num_context}"


def ablation_plan() -> list[AblationRun]:
    """The Aligners to train: w in YES_NO_WEIGHTS at k = 16, k in CONTEXT_SIZES at w = 20.

    The run both ablations share (w = 20, k = 16) appears once: four Aligners in all.
    """
    runs = [AblationRun(weight, PLVM_CONTEXT) for weight in YES_NO_WEIGHTS]
    runs += [AblationRun(PLVM_WEIGHT, k) for k in CONTEXT_SIZES]
    return list(dict.fromkeys(runs))


def pocket_aligner_settings() -> dict[str, Any]:
    """The pocket model's Aligner settings (`profile("full")` of plvmctl.lab.pocket)."""
    from .pocket import profile

    full = profile("full")
    return {"identities": full.identities, "photos": full.photos,
            "steps": full.aligner_steps, "profile_steps": full.aligner_steps,
            "batch_size": full.aligner_batch, "lr": full.aligner_lr,
            "val_identities": full.aligner_val_identities, "num_context": full.num_context,
            "aligner_sizes": dict(full.aligner_sizes), "references": full.aligner_references, "seed": SEED}


def aligner_train_config(run: AblationRun, settings: Mapping[str, Any], manifest: str | Path,
                         out: str | Path):
    """Stage 5 of `build_pocket` (`plvmctl.lab.pocket.aligner_train_config`) with the run's Yes/No
    weight and `settings`' step count.

    k is not a training setting: a new Aligner takes it from the recipe's aligner.num_context
    (see `training_overrides`).
    """
    from .pocket import aligner_train_config as pocket_config
    from .pocket import profile

    return pocket_config(profile("full"), manifest, out, settings["seed"],
                         yes_no_weight=run.yes_no_weight, steps=int(settings["steps"]))


def committed_training(settings: Mapping[str, Any]) -> dict[str, Any] | None:
    """The committed pocket Aligner's training as its card records it (run.json's keys:
    seconds, final_loss, validation), when it was trained with `settings`; else None."""
    from .pocket import ASSETS, CARD_FILE

    card_file = ASSETS / CARD_FILE
    if not card_file.is_file():
        return None
    card = json.loads(card_file.read_text(encoding="utf-8"))
    trained_with = card.get("settings", {})
    aligner = card.get("aligner", {})
    same = (trained_with.get("aligner_steps") == settings["steps"]
            and trained_with.get("aligner_yes_no_weight", PLVM_WEIGHT) == PLVM_WEIGHT
            and trained_with.get("num_context") == PLVM_CONTEXT
            and trained_with.get("identities") == settings["identities"]
            and not trained_with.get("aligner_several_steps")  # the ablations train the one-photo part only
            and card.get("seed") == settings["seed"])
    if not same or aligner.get("training_seconds") is None:
        return None
    return {"seconds": aligner["training_seconds"], "final_loss": aligner.get("final_loss"),
            "validation": aligner.get("validation_recognition"), "committed": True}


def training_overrides(run: AblationRun) -> list[str]:
    """Recipe overrides to train a new Aligner with k context tokens on the pocket model."""
    return ["aligner.path=null", f"aligner.num_context={run.num_context}"]


def evaluation_overrides(run: AblationRun, aligner_dir: str | Path) -> list[str]:
    """Recipe overrides to evaluate the pocket model with a trained ablation Aligner."""
    return [f"aligner.path={json.dumps(str(Path(aligner_dir).resolve()))}",
            f"aligner.num_context={run.num_context}"]


# --------------------------------------------------------------------------------------------
# Options


@dataclass
class Options:
    """What one `python -m plvmctl.lab.results` run does (the command line, checked)."""

    out_dir: Path = Path(DEFAULTS["out_dir"])
    doc: Path = Path(DEFAULTS["doc"])
    testset: Path = Path(DEFAULTS["testset"])
    identities: int = DEFAULTS["identities"]
    neg_per_identity: int = DEFAULTS["neg_per_identity"]
    skip_trained: bool = False
    skip_ablations: bool = False
    skip_several_photos: bool = False
    aligner_steps: int | None = None  # None: the pocket profile's
    limit: int | None = None
    threads: int = DEFAULTS["threads"]

    def check(self) -> None:
        """PlvmError (one line) naming the first impossible value."""
        if self.identities < 2:
            raise PlvmError(f"--identities must be at least 2 (recognition needs negatives), "
                            f"got {self.identities}")
        if self.neg_per_identity < 0:
            raise PlvmError(f"--neg-per-identity must be 0 or more, got {self.neg_per_identity}")
        if self.aligner_steps is not None and self.aligner_steps < 1:
            raise PlvmError(f"--aligner-steps must be at least 1, got {self.aligner_steps}")
        if self.limit is not None and self.limit < 1:
            raise PlvmError(f"--limit must be at least 1, got {self.limit}")
        if self.threads < 1:
            raise PlvmError(f"--threads must be at least 1, got {self.threads}")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise PlvmError(f"--out-dir {self.out_dir} exists and is not a folder")
        if self.doc.is_dir():
            raise PlvmError(f"--doc {self.doc} is a folder: name the markdown file to write")
        if self.testset.exists() and not self.testset.is_dir():
            raise PlvmError(f"--testset {self.testset} exists and is not a folder")

    @property
    def methods(self) -> list[str]:
        return [name for name in MAIN_METHODS if not (self.skip_trained and name in TRAINED_METHODS)]

    def command(self) -> str:
        """The command line that repeats this run exactly (every value spelt out)."""
        words = ["OMP_NUM_THREADS=" + str(self.threads), "python", "-m", "plvmctl.lab.results",
                 "--out-dir", str(self.out_dir), "--doc", str(self.doc),
                 "--testset", str(self.testset), "--identities", str(self.identities),
                 "--neg-per-identity", str(self.neg_per_identity)]
        if self.aligner_steps is not None:
            words += ["--aligner-steps", str(self.aligner_steps)]
        if self.limit is not None:
            words += ["--limit", str(self.limit)]
        words += ["--threads", str(self.threads)]
        if self.skip_trained:
            words.append("--skip-trained")
        if self.skip_ablations:
            words.append("--skip-ablations")
        if self.skip_several_photos:
            words.append("--skip-several-photos")
        return shlex.join(words)


# --------------------------------------------------------------------------------------------
# Steps


@dataclass
class StepRecord:
    """How long one step took, and whether an earlier run's outputs were reused."""

    name: str
    seconds: float
    reused: bool


class StepRunner:
    """Runs named steps once: OUT/steps/NAME.json holds each step's settings and wall time."""

    def __init__(self, out_dir: Path, echo: Callable[[str], None]):
        self.folder = out_dir / "steps"
        self.echo = echo
        self.records: list[StepRecord] = []

    def run(self, name: str, settings: Mapping[str, Any], work: Callable[[], None],
            done: Callable[[], bool], afresh: Callable[[], None] = lambda: None) -> StepRecord:
        """`work()` unless a finished earlier run with the same settings left `done()` true.
        When the earlier run had other settings, `afresh()` (removing what it made) comes first."""
        marker = self.folder / f"{name}.json"
        settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        previous = None
        if marker.is_file():
            try:
                previous = json.loads(marker.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                previous = None  # a damaged marker: the step runs again (its outputs resume)
        if previous is not None and previous.get("settings") != settings:
            change = first_difference(previous.get("settings") or {}, settings)
            self.echo(f"[results] step {name}: made with other settings ({change}), run afresh")
            afresh()
            previous = None
        if previous is not None and previous.get("finished") and done():
            record = StepRecord(name, float(previous.get("seconds", 0.0)), reused=True)
            self.echo(f"[results] step {name}: reused ({record.seconds:.1f} s when it ran)")
            self.records.append(record)
            return record
        write_json_atomic(marker, {"settings": settings, "finished": False})
        self.echo(f"[results] step {name} ...")
        started = time.perf_counter()
        work()
        seconds = round(time.perf_counter() - started, 1)
        write_json_atomic(marker, {"settings": settings, "finished": True, "seconds": seconds,
                                   "date": _now()})
        self.echo(f"[results] step {name}: {seconds:.1f} s")
        record = StepRecord(name, seconds, reused=False)
        self.records.append(record)
        return record


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _toy_identity_count(testset: Path) -> int | None:
    """How many identities a toy test set was written with (None: not a toy set)."""
    from .toy import TESTSET_SIDECAR

    sidecar = testset / TESTSET_SIDECAR
    if not sidecar.is_file():
        return None
    try:
        return len(json.loads(sidecar.read_text(encoding="utf-8"))["identities"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def ensure_testset(options: Options, steps: StepRunner) -> StepRecord:
    """The toy test set at --testset (seed 0), unless it is already there.

    An existing test set is used as it is; a toy one must have --identities identities, so a
    table never silently reports a different set than the command line says.
    """
    from .toy import write_testset
    from ..evaluate import SET_FOLDER

    folder = options.testset
    if (folder / SET_FOLDER).is_dir():
        count = _toy_identity_count(folder)
        if count is not None and count != options.identities:
            raise PlvmError(f"--testset {folder} is a toy test set of {count} identities, not "
                            f"{options.identities}: pass --identities {count} or another --testset")
        record = StepRecord("testset", 0.0, reused=True)
        steps.echo(f"[results] step testset: using {folder}")
        steps.records.append(record)
        return record
    if folder.is_dir() and any(folder.iterdir()):
        raise PlvmError(f"--testset {folder} is not empty and has no {SET_FOLDER}/: "
                        f"pass another --testset")
    started = time.perf_counter()
    write_testset(folder, options.identities, SEED, progress=True)
    record = StepRecord("testset", round(time.perf_counter() - started, 1), reused=False)
    steps.echo(f"[results] step testset: wrote {folder} ({record.seconds:.1f} s)")
    steps.records.append(record)
    return record


def _evaluated(folder: Path, methods: Sequence[str]) -> bool:
    """True when folder/results.json holds every method in `methods`."""
    path = folder / "results.json"
    if not path.is_file():
        return False
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return all(name in results.get("methods", {}) for name in methods)


def evaluate_step(name: str, options: Options, overrides: list[str], methods: list[str],
                  folder: Path, steps: StepRunner, several: bool = False) -> dict[str, Any]:
    """`plvmctl --recipe pocket [--set ...] eval` into `folder`; its results dict. `several`
    adds `--pairs --captions` (the questions of several concepts at once, caption recall and
    name precision)."""
    from ..evaluate import load_testset, recipe_mcq_mode, run_evaluation
    from ..recipe import load_recipe

    recipe = load_recipe(RECIPE, overrides)
    mcq = recipe_mcq_mode(recipe)
    testset = load_testset(options.testset)
    weights = model_weights(recipe)
    settings = {"recipe": RECIPE, "overrides": overrides,
                "testset": str(testset.root.resolve()), "testset_counts": testset.counts(),
                "testset_negatives": weights_digest(testset.negatives) if testset.negatives else None,
                "neg_per_identity": options.neg_per_identity, "limit": options.limit,
                "mcq": mcq, "seed": SEED, "several": several,
                "methods": {name: answer_fingerprint(recipe, name, weights) for name in methods}}

    def work() -> None:
        from ..runtime import load_runtime

        runtime = load_runtime(recipe, device=DEVICE)
        run_evaluation(runtime, testset, methods, folder, limit=options.limit,
                       neg_per_identity=options.neg_per_identity, seed=SEED, mcq=mcq,
                       progress=True, extra_methods={TRUTH: prepare_truth}, pairs=several, captions=several)

    steps.run(name, settings, work, lambda: _evaluated(folder, methods))
    return json.loads((folder / "results.json").read_text(encoding="utf-8"))


SEVERAL_PHOTOS_COMPARED = 10  # identities on which Yo'LLaVA is trained on the same photos as PLVM


def several_photos_step(options: Options, folder: Path, steps: StepRunner) -> dict[str, Any]:
    """Concepts from several photos (plvmctl/lab/several_photos.py): PLVM with 1, 2 and 4 clean
    and hard references on --identities held-out identities of seed 0 (the main test set's
    identities and query photos, more reference photos each), and PLVM against Yo'LLaVA trained
    on the same 1 and 4 photos on the first SEVERAL_PHOTOS_COMPARED of them."""
    from ..recipe import load_recipe
    from .several_photos import COUNTS, KINDS, measure, write_testsets

    recipe = load_recipe(RECIPE)
    weights = model_weights(recipe)
    compared = min(SEVERAL_PHOTOS_COMPARED, options.identities)
    methods = ["plvm"] if options.skip_trained else ["plvm", "yollava"]
    plan = [(kind, count, ["plvm"], None) for kind in KINDS for count in COUNTS]
    if not options.skip_trained:
        plan += [(kind, count, methods, compared) for kind in KINDS for count in (1, 4)]
    settings = {"recipe": RECIPE, "seed": SEED, "identities": options.identities, "compared": compared,
                "neg_per_identity": options.neg_per_identity, "plan": plan,
                "methods": {name: answer_fingerprint(recipe, name, weights) for name in methods}}
    summary_file = folder / "summary.json"

    def work() -> None:
        from ..runtime import load_runtime

        runtime = load_runtime(recipe, device=DEVICE)
        sets = write_testsets(folder / "testsets", SEED, options.identities, queries=6)
        measured = measure(runtime, folder, sets, plan, neg_per_identity=options.neg_per_identity, progress=True)
        write_json_atomic(summary_file, {"conditions": measured, "compared": compared})

    steps.run("several-photos", settings, work, summary_file.is_file,
              afresh=lambda: shutil.rmtree(folder, ignore_errors=True))
    return json.loads(summary_file.read_text(encoding="utf-8"))


def training_data_step(options: Options, settings: Mapping[str, Any], folder: Path,
                       steps: StepRunner) -> Path:
    """The toy training data of `build_pocket` (same identities, photos and seed)."""
    from .toy import generate_training_data

    manifest = folder / "manifest.jsonl"
    wanted = {"identities": settings["identities"], "photos": settings["photos"],
              "references": settings["references"], "seed": settings["seed"], "plvmctl_source": source_digest()}

    def work() -> None:
        generate_training_data(folder, settings["identities"], settings["photos"],
                               settings["seed"], extra_scenes=0, progress=True, references=settings["references"])

    steps.run("data", wanted, work, manifest.is_file, afresh=lambda: shutil.rmtree(folder, ignore_errors=True))
    return manifest


def train_step(run: AblationRun, settings: Mapping[str, Any], manifest: Path, folder: Path,
               steps: StepRunner) -> dict[str, Any]:
    """Train the run's Aligner into `folder` (resumed from its checkpoint when interrupted);
    return its run.json (steps, final loss, seconds, validation)."""
    from ..recipe import load_recipe
    from ..train.aligner import ALIGNER_DIR, RUN_FILE
    from ..train.common import find_checkpoint

    recipe = load_recipe(RECIPE, training_overrides(run))
    config = aligner_train_config(run, settings, manifest, folder)
    described = dataclasses.asdict(config)
    described.pop("out")
    described["data"] = str(Path(described["data"]).resolve())
    wanted = {"recipe": RECIPE, "overrides": training_overrides(run), "weights": model_weights(recipe),
              "plvmctl_source": source_digest(), "num_context": run.num_context, "train": described}

    def finished() -> bool:
        weights = folder / ALIGNER_DIR / "model.safetensors"
        return (folder / RUN_FILE).is_file() and weights.is_file()

    def work() -> None:
        from ..runtime import load_runtime
        from ..train.aligner import train_aligner
        from ..train.common import TrainingInterrupted

        resume = find_checkpoint(folder) is not None
        if not resume and folder.exists():
            shutil.rmtree(folder)  # a run that died before its first checkpoint: start over
        runtime = load_runtime(recipe, device=DEVICE)
        try:
            train_aligner(runtime, config, resume=resume, progress=True,
                          echo=lambda message: steps.echo(f"[results] {run.name}: {message}"))
        except TrainingInterrupted:
            raise PlvmError(f"Aligner {run.name} interrupted: run the same command again to "
                            f"continue (from its checkpoint in {folder} when one was saved)"
                            ) from None

    steps.run(f"train-{run.name}", wanted, work, finished,
              afresh=lambda: shutil.rmtree(folder, ignore_errors=True))
    return json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# The summary


def mcq_chance(rows) -> float | None:
    """Expected accuracy of a blind guess: the mean of 1 / (number of options) over `rows`."""
    usable = [row for row in rows if row.missing is None and row.options]
    if not usable:
        return None
    return sum(1.0 / len(row.options) for row in usable) / len(usable)


def method_row(results: Mapping[str, Any], method: str) -> dict[str, Any]:
    """One table row from an evaluation's results dict (accuracies as fractions), with the
    method's title and how many items were skipped or unparseable."""
    result = results["methods"][method]
    return {**evaluated_row(results, method), "title": METHOD_TITLES.get(method, method),
            "skipped": result["skipped"]["total"], "unparseable": result["unparseable"]["total"]}


def prepare_truth(context) -> Any:
    """The base LVLM given each identity's TRUE "key value" description in words, as the
    text-prompt baseline gives it the description the model wrote: what recognition from a
    written description reaches before any Aligner (the toy test set knows everyone's traits:
    toy_world.json)."""
    from ..methods import PreparedMethod, count_tokens
    from .lvlm import describe
    from .toy import TESTSET_SIDECAR, Identity

    descriptions: dict[str, str] = {}
    for reference in context.references:
        root = Path(reference.path).parents[2]  # DIR/validation_recognition/<identity>/ref_img.png
        identities = json.loads((root / TESTSET_SIDECAR).read_text(encoding="utf-8"))["identities"]
        descriptions[reference.name] = describe(Identity.from_id(identities[reference.name]), "keyvalue")
    tokens = [t for t in (count_tokens(context.runtime, text) for text in descriptions.values()) if t is not None]
    return PreparedMethod(name=TRUTH, engine=context.engine_api.Engine(context.runtime, {}, descriptions=descriptions),
                          seconds_per_concept=0.0, tokens_per_concept=sum(tokens) / max(1, len(tokens)),
                          details={"descriptions": descriptions})


def item_statistics(main: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """From the main evaluation's item logs (plvmctl/evaluate/item_stats.py), on its test set and
    protocol: PLVM against every other method on the same recognition items (exact McNemar),
    each method's accuracy per multiple-choice question as published (per trait on the toy
    set) and, on a toy set, the traits its recognition answers state wrongly."""
    from ..evaluate import build_items, load_testset
    from ..evaluate.item_stats import mcnemar, outcomes, question_accuracy, stated_traits
    from .toy import TESTSET_SIDECAR, Identity

    testset, protocol = load_testset(main["testset"]), main["protocol"]
    items = build_items(testset, limit=protocol["limit"], neg_per_identity=protocol["neg_per_identity"],
                        seed=protocol["seed"])
    logs = {name: folder / method["items_file"] for name, method in main["methods"].items()}
    correct = {name: outcomes(items, log, protocol["mcq"]) for name, log in logs.items()}
    expected = {item.key: item.expected for item in items["recognition"]}
    questions = {row.key: row.question for row in (*testset.text, *testset.visual)}
    sidecar = testset.root / TESTSET_SIDECAR
    truth = ({name: Identity.from_id(identity).trait_words() for name, identity
              in json.loads(sidecar.read_text(encoding="utf-8"))["identities"].items()}
             if sidecar.is_file() else {})
    return {
        "paired": {name: mcnemar(correct[PLVM][TASK_RECOGNITION], correct[name][TASK_RECOGNITION], expected)
                   for name in correct if name != PLVM} if PLVM in correct else {},
        "questions": {task: {name: question_accuracy(items[task], correct[name][task], questions)
                             for name in correct} for task in ("text", "visual")},
        "stated_traits": {name: found for name, log in logs.items()
                          if (found := stated_traits(items[TASK_RECOGNITION], log, truth))},
    }


def negative_origins(main: Mapping[str, Any]) -> dict[str, str]:
    """Where each trained method of the main evaluation took its negative photos from (never
    the test identities: methods.base.negative_pool), as its results.json says."""
    return {name: method["negatives"] for name, method in main["methods"].items() if method.get("negatives")}


def machine_facts(threads: int) -> dict[str, Any]:
    import torch

    return {
        "date": _now(),
        "device": DEVICE,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def build_summary(options: Options, testset, main: Mapping[str, Any],
                  ablations: list[tuple[AblationRun, dict[str, Any], dict[str, Any]]] | None,
                  aligner_settings: Mapping[str, Any] | None, steps: list[StepRecord],
                  machine: Mapping[str, Any], statistics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything docs/results.md shows, as plain data (also written to OUT/results.json)."""
    counts = main["counts"]
    summary: dict[str, Any] = {
        "command": options.command(),
        "machine": dict(machine),
        "testset": {
            "path": str(options.testset),
            "toy": _toy_identity_count(options.testset) is not None,
            "identities": counts["identities"],
            "query_photos": counts["query_photos"],
            "recognition_items": counts["recognition_items"],
            "recognition_positive": counts["recognition_positive"],
            "text_items": counts["text_items"],
            "visual_items": counts["visual_items"],
            "text_chance": mcq_chance(testset.text),
            "visual_chance": mcq_chance(testset.visual),
        },
        "protocol": {"neg_per_identity": options.neg_per_identity, "limit": options.limit,
                     "mcq": main["protocol"]["mcq"], "seed": SEED, "recipe": RECIPE},
        "main": [method_row(main, name) for name in options.methods],
        "several": {"methods": {name: {key: main["methods"][name].get(key) for key in ("pairs", "caption")}
                                for name in options.methods}},
        "main_folder": str(options.out_dir / "main"),
        "ablations_folder": str(options.out_dir / "ablations"),
        "negatives": negative_origins(main),
        "statistics": dict(statistics) if statistics else None,
        "ablations": None,
        "aligner_training": dict(aligner_settings) if aligner_settings else None,
        "steps": [dataclasses.asdict(step) for step in steps],
    }
    if ablations is not None:
        rows = []
        for run, results, trained in ablations:
            row = method_row(results, "plvm")
            validation = trained.get("validation") or {}
            row.update({"yes_no_weight": run.yes_no_weight, "num_context": run.num_context,
                        "committed": bool(trained.get("committed")),
                        "train_seconds": trained.get("seconds"),
                        "final_loss": trained.get("final_loss"),
                        "validation_mean": validation.get("val_mean"), "run": run.name})
            rows.append(row)
        summary["ablations"] = {
            "yes_no_weight": sorted((r for r in rows if r["num_context"] == PLVM_CONTEXT
                                     and r["yes_no_weight"] in YES_NO_WEIGHTS),
                                    key=lambda r: r["yes_no_weight"]),
            "num_context": sorted((r for r in rows if r["yes_no_weight"] == PLVM_WEIGHT
                                   and r["num_context"] in CONTEXT_SIZES),
                                  key=lambda r: r["num_context"]),
        }
    return summary


# --------------------------------------------------------------------------------------------
# The markdown


def _pct(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "–"
    return f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    if value is None or math.isnan(float(value)):
        return "–"
    value = float(value)
    if value.is_integer():
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{float(value):.1f}"


def _cells(row: Mapping[str, Any]) -> list[str]:
    return [_pct(row[key]) for key in ("positive", "negative", "mean", "visual_qa", "text_qa")]


_ACCURACY_HEADER = ("recognition positive | recognition negative | recognition mean | visual MCQ "
                    "| text MCQ")


def _negatives_lines(origins: Mapping[str, str]) -> list[str]:
    """The doc's line on where each trained method's negative photos came from."""
    if not origins:
        return []
    return ["- Negatives of the methods that train (photos of people who are not the concept, never a "
            "test identity): " + "; ".join(f"{name}: {origin}" for name, origin in origins.items()) + "."]


def _p_value(value: float) -> str:
    if value < 1e-300:  # below what a float holds
        return "< 1e-300"
    return f"{value:.0e}" if value < 0.001 else f"{value:.3f}"


def _statistics_lines(summary: Mapping[str, Any]) -> list[str]:
    """The doc's sections read from the main evaluation's item logs (`item_statistics`)."""
    statistics = summary.get("statistics")
    if not statistics:
        return []
    lines: list[str] = []
    if statistics["paired"]:
        lines += ["## PLVM against each method, answer by answer", "",
                  "On the recognition items of the main table that both answered: how often PLVM alone is "
                  "right and how often the other method alone is, and the exact McNemar test of \"both are "
                  "equally accurate\" (two-sided binomial at 1/2 on the items where they disagree); then the "
                  "positives alone (`plvmctl/evaluate/item_stats.py`).", "",
                  "| method | items | PLVM alone right | method alone right | p | positives | "
                  "PLVM alone right | method alone right | p |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, paired in statistics["paired"].items():
            cells = [f"`{name}`"]
            for part in (paired["all"], paired["positives"]):
                cells += [str(part["items"]), str(part["only_first"]), str(part["only_second"]),
                          _p_value(part["p_value"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Per-question and per-trait readings", "",
              "Which readings go wrong, from the main evaluation's item logs. Multiple choice: accuracy "
              "in % on each question as published (`<sks>` is the person asked about; on the toy set "
              "one text question per trait), the number of items in brackets.", ""]
    for task, title in (("text", "Text MCQ"), ("visual", "Visual MCQ")):
        table = statistics["questions"].get(task) or {}
        names = [name for name, rows in table.items() if rows]
        if not names:
            continue
        questions = sorted({question for name in names for question in table[name]})
        lines += [f"### {title}", "",
                  "| question | " + " | ".join(f"`{name}`" for name in names) + " |",
                  "|---|" + "---:|" * len(names)]
        for question in questions:
            cells = [question.replace("|", "\\|")]
            for name in names:
                row = table[name].get(question)
                cells.append(f"{_pct(row['accuracy'])} ({row['items']})" if row else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    stated = statistics.get("stated_traits") or {}
    if stated:
        keys = sorted({key for counts in stated.values() for key in counts})
        lines += ["### Traits stated wrongly inside recognition answers", "",
                  "A pocket-model recognition answer compares before its verdict (\"left red hair red same "
                  "...\"): the word after each trait key is the value it states for the person asked about, "
                  "checked against the test set's toy_world.json. % of the stated values that are wrong, the "
                  "number stated in brackets.", "",
                  "| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for name, counts in stated.items():
            cells = [f"{_pct(counts[key]['wrong'] / counts[key]['stated'])} ({counts[key]['stated']})"
                     if key in counts else "–" for key in keys]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _several_lines(summary: Mapping[str, Any]) -> list[str]:
    """The main evaluation's questions of several concepts and its captions (issue 23's
    targets: two-concept recognition, which of two, who of four F1 and left of, caption recall
    and name precision), as `plvmctl eval --pairs --captions` reports them, a level down."""
    several = summary.get("several")
    names = list(several["methods"]) if several else []
    lines = caption_lines(several, names) + pair_lines(several, names) if several else []
    if not lines:
        return []
    return (["## Several people at once", "",
             "The main evaluation asked these too (`eval --pairs --captions`: the same test set, "
             "concepts and settings); the main table's numbers do not include them."]
            + ["#" + line if line.startswith("## ") else line for line in lines] + [""])


def _several_photos_lines(summary: Mapping[str, Any]) -> list[str]:
    """Concepts from several photos (issue 26): PLVM with 1, 2, 4 clean and hard references,
    and Yo'LLaVA trained on the same photos."""
    several = summary.get("several_photos")
    if not several:
        return []
    conditions, compared = several["conditions"], several["compared"]
    everyone = {label: rows["plvm"] for label, rows in conditions.items() if "-on-" not in label}
    identities = summary["testset"]["identities"]
    lines = ["## Concepts from several photos", "",
             f"The same {identities} held-out identities and query photos (seed 0) with more reference photos each "
             "(`plvmctl toy testset --references 4`, and `--references 5 --hard-references`), written by "
             "`plvmctl/lab/several_photos.py`. `clean-N`: `ref_img.png` and N−1 further portraits with other "
             "shirts and expressions. `hard-N`: N hard references only (a crop of a crowd, a whole photo of two "
             "or three people, a covered face). A concept of N photos is what `plvmctl encode` makes of them "
             "(docs/several-photos.md). Each condition is evaluated as the main table is.", "",
             "| references | recognition mean | positive | negative | text MCQ | visual MCQ | ms per concept |",
             "|---|---|---|---|---|---|---|"]
    for label, row in everyone.items():
        recognition = row["recognition"]
        lines.append(f"| {label} | {_pct(recognition['mean'])} | {_pct(recognition['positive'])} | "
                     f"{_pct(recognition['negative'])} | {_pct(row['text_mcq'])} | {_pct(row['visual_mcq'])} | "
                     f"{_num(1000 * row['seconds_per_concept']) if row['seconds_per_concept'] is not None else '–'} |")
    if "hard-1" in everyone and "hard-4" in everyone:
        gain = 100 * (everyone["hard-4"]["recognition"]["mean"] - everyone["hard-1"]["recognition"]["mean"])
        lines += ["", f"4 hard references against 1: {gain:+.1f} points of recognition mean "
                      f"(target: +5.0, {'met' if gain >= 5.0 else 'not met'})."]
    both = {label: rows for label, rows in conditions.items() if "-on-" in label}
    if both:
        lines += ["", f"On the first {compared} identities, Yo'LLaVA (the recipe's settings) trained on the same "
                      "photos as PLVM reads, with its seconds to add a concept:", "",
                  "| references | PLVM recognition mean | Yo'LLaVA recognition mean | PLVM text / visual MCQ | "
                  "Yo'LLaVA text / visual MCQ | PLVM s per concept | Yo'LLaVA s per concept |",
                  "|---|---|---|---|---|---|---|"]
        for label, rows in both.items():
            plvm, yollava = rows["plvm"], rows.get("yollava")
            if yollava is None:
                continue
            lines.append(f"| {label.split('-on-')[0]} | {_pct(plvm['recognition']['mean'])} | "
                         f"{_pct(yollava['recognition']['mean'])} | {_pct(plvm['text_mcq'])} / {_pct(plvm['visual_mcq'])} | "
                         f"{_pct(yollava['text_mcq'])} / {_pct(yollava['visual_mcq'])} | "
                         f"{_num(plvm['seconds_per_concept'])} | {_num(yollava['seconds_per_concept'])} |")
    return lines + [""]


def render_results_markdown(summary: Mapping[str, Any]) -> str:
    """docs/results.md from a summary dict (`build_summary`): tables, command, machine, notes."""
    testset, protocol, machine = summary["testset"], summary["protocol"], summary["machine"]
    negatives = protocol["neg_per_identity"]
    lines = [
        "# Results: the pocket model on held-out identities",
        "",
        "Written by `python -m plvmctl.lab.results` (`make results`); every number below comes from "
        "that run. Do not edit by hand: run the command again.",
        "",
    ]
    if testset["identities"] < MIN_IDENTITIES or protocol["limit"] is not None:
        lines += [f"> **Smoke run**: {testset['identities']} identities"
                  + (f", at most {protocol['limit']} items per task" if protocol["limit"] else "")
                  + f". The results table is made on at least {MIN_IDENTITIES} identities "
                  "with no limit.", ""]
    lines += [
        "## What was measured",
        "",
        f"- Test set `{testset['path']}`: {testset['identities']} "
        + ("held-out identities of the toy world (never in any training data), "
           if testset["toy"] else "identities, ")
        + f"{testset['query_photos']} query photos.",
        f"- Recognition: \"Is <name> in this photo?\" on {testset['recognition_items']} "
        f"(reference, photo) pairs: {testset['recognition_positive']} positive, "
        f"{testset['recognition_items'] - testset['recognition_positive']} negative (at most "
        f"{negatives} sampled per identity, seed {protocol['seed']}); the answer is generated "
        "and read as yes / no. The pocket model compares before it answers (\"left red hair "
        "red same dark skin tan different ... mismatch. No, ...\"): its verdict is the first "
        "sentence that opens with yes or no.",
        f"- Visual MCQ ({testset['visual_items']} questions, with the photo) and text MCQ "
        f"({testset['text_items']} questions, no photo): "
        + ("the option whose letter the model finds most likely." if protocol["mcq"] == "likelihood" else
           "the answer is generated and its letter read where it stands (the pocket model says the "
           "value, then the letter: \"red B\"; `eval.mcq: generate` in recipes/pocket.yaml)."),
        "- Methods, all on the same frozen pocket LVLM and the same one reference photo per "
        "identity: PLVM encodes the photo into context tokens (reference encoder + Aligner, "
        "no training); no prompt leaves `<name>` as plain text; the text prompt puts "
        "\"<name> is {description}.\" before every question, the description written by the "
        f"base model from the photo in at most {DESCRIPTION_MAX_NEW_TOKENS} tokens"
        + ("; Yo'LLaVA trains soft tokens per identity (the recipe's yollava settings)"
           if any(row["method"] == "yollava" for row in summary["main"]) else "")
        + ("; MyVLM trains a concept head (does this photo show the person? the reference "
           "encoder's features of the photo and of windows of it, the best one against a "
           "threshold) and one concept embedding placed after the photo's image tokens when the "
           "head fires (the recipe's myvlm settings); without a photo its concept is only its "
           "name" if any(row["method"] == "myvlm" for row in summary["main"]) else "")
        + ("; MC-LLaVA trains the soft tokens of several identities together (the recipe's "
           "mcllava settings: groups of 4, k-means start, the place of the best-matching patch "
           "said in words)" if any(row["method"] == "mcllava" for row in summary["main"]) else "")
        + (f"; the true description (`{TRUTH}`, not a method: a yardstick) puts each identity's "
           "real traits in words (\"face round skin pale hair black style short ...\", from the "
           "test set's toy_world.json), which is what the base LVLM can do with a written "
           "description before any Aligner" if any(row["method"] == TRUTH for row in summary["main"])
           else "") + ".",
        *_negatives_lines(summary.get("negatives") or {}),
        "- Seconds to add a concept: wall time per concept (PLVM: one reference-encoder + "
        "Aligner pass; text prompt: the base model writing the description; Yo'LLaVA: training "
        "its soft prompt; MyVLM: training its head and embedding; MC-LLaVA: training its group's "
        "soft prompts, divided by the group's size; no prompt: nothing to add).",
        "- Tokens per concept: prompt tokens one concept adds to every question.",
        f"- Recipe `{protocol['recipe']}` (the committed pocket model). Each evaluation's own "
        f"report and per-item answers: `{summary['main_folder']}/` (main table) and "
        f"`{summary['ablations_folder']}/<run>/eval/` (ablations).",
        "",
        "## Main table",
        "",
        f"| method | {_ACCURACY_HEADER} | seconds to add a concept | tokens per concept |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["main"]:
        cells = [f"{row['title']} (`{row['method']}`)"] + _cells(row)
        cells += [_num(row["seconds_per_concept"]), _num(row["tokens_per_concept"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracies in %."]
    problems = [f"{row['method']}: {row['skipped']} skipped, {row['unparseable']} unparseable"
                for row in summary["main"] if row["skipped"] or row["unparseable"]]
    if problems:
        lines.append("Not every item was scored as asked (" + "; ".join(problems) +
                     "): unparseable answers count as wrong, skipped items are left out.")
    missing = [name for name in ("yollava",) if all(r["method"] != name for r in summary["main"])]
    if missing:
        lines.append(f"Not run this time: {', '.join(missing)} (--skip-trained).")
    lines.append("")

    lines += _statistics_lines(summary)
    lines += _several_lines(summary)
    lines += _several_photos_lines(summary)

    ablations = summary.get("ablations")
    lines += ["## Ablations", ""]
    if ablations is None:
        lines += ["Not run this time (--skip-ablations).", ""]
    else:
        training = summary.get("aligner_training") or {}
        steps = f"{training.get('steps')} steps"
        if training.get("steps") != training.get("profile_steps"):
            steps += f" (--aligner-steps; the profile has {training.get('profile_steps')})"
        lines += [
            "Each row is an Aligner trained from scratch exactly as the pocket model's one-photo part "
            f"(`plvmctl.lab.pocket` profile \"full\": {steps}, batch {training.get('batch_size')}, "
            f"lr {training.get('lr')}, {training.get('identities')} training identities × "
            f"{training.get('photos')} photos, seed {training.get('seed')}) except for the one "
            "setting varied, then evaluated as `plvm` above. "
            + ("The w = 20, k = 16 row is the committed Aligner itself (the main table's `plvm` "
               "row; its training as card.json records it). "
               if any(r.get("committed") for r in ablations["num_context"]) else
               "The w = 20, k = 16 Aligner is trained again here, so its row can differ from the main "
               "table's: the committed Aligner is also trained further with concepts of several photos. ")
            + "Validation: recognition accuracy (mean of positive and "
            f"negative, the verdict of generated answers) on {training.get('val_identities')} "
            "training-part identities held out of that Aligner's training.",
            "",
            "### Yes/No weight w (k = 16)",
            "",
            f"| w | {_ACCURACY_HEADER} | validation mean | training seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ablations["yes_no_weight"]:
            cells = [_num(row["yes_no_weight"])] + _cells(row)
            cells += [_pct(row["validation_mean"]), _seconds(row["train_seconds"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "### Context tokens k (w = 20)",
            "",
            f"| k | {_ACCURACY_HEADER} | tokens per concept | seconds to add a concept "
            "| validation mean | final training loss | training seconds |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in ablations["num_context"]:
            cells = [str(row["num_context"])] + _cells(row)
            cells += [_num(row["tokens_per_concept"]), _num(row["seconds_per_concept"]),
                      _pct(row["validation_mean"]), _num(row["final_loss"]),
                      _seconds(row["train_seconds"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Accuracies in %.", ""]

    lines += [
        "## How to read the numbers",
        "",
        "- Recognition chance is a mean of 50 %: a model that always says Yes scores 100 % "
        "positive and 0 % negative (mean 50 %), one that always says No the reverse. Compare "
        "methods by the mean; a high positive with a low negative is a Yes-sayer.",
        f"- MCQ chance (a blind guess among each question's 2 to 4 options): visual "
        f"{_pct(testset['visual_chance'])} %, text {_pct(testset['text_chance'])} % on this "
        "test set.",
        "- Seconds per concept are CPU wall times on the machine below; tokens per concept are "
        "exact.",
        "",
        "## How it was made",
        "",
        "```",
        summary["command"],
        "```",
        "",
        f"- Machine: {machine['cpu_count']} CPU cores ({machine['processor']}), torch "
        f"{machine['torch']} with {machine['torch_threads']} thread(s) "
        f"(OMP_NUM_THREADS={machine['omp_num_threads'] or 'unset'}), Python "
        f"{machine['python']}, {machine['platform']}, device {machine['device']}.",
        f"- Date: {machine['date']}.",
        *([f"- This page was written again on {summary['rendered_again']} from the run's results.json and "
           "item logs, no step run again (the same command with `--render-only`)."]
          if summary.get("rendered_again") else []),
        "",
        "| step | wall time (s) |",
        "|---|---:|",
    ]
    for step in summary["steps"]:
        note = " (reused from an earlier run: its time then)" if step["reused"] else ""
        lines.append(f"| {step['name']}{note} | {step['seconds']:.1f} |")
    lines.append("")
    return "\n".join(lines)


def rerender(options: Options, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """--doc again from a finished run's OUT/results.json and item logs (no step runs): for
    what the doc reads that the run did not yet (its step times stay the run's)."""
    path = options.out_dir / "results.json"
    if not path.is_file():
        raise PlvmError(f"{path} not found: --render-only needs a finished run's --out-dir")
    summary = json.loads(path.read_text(encoding="utf-8"))
    main = json.loads((options.out_dir / "main" / "results.json").read_text(encoding="utf-8"))
    summary["statistics"] = item_statistics(main, options.out_dir / "main")
    summary["rendered_again"] = _now()
    write_json_atomic(path, summary)
    write_text_atomic(options.doc, render_results_markdown(summary))
    echo(f"[results] wrote {options.doc} from {path}")
    return summary


# --------------------------------------------------------------------------------------------
# The whole run


def make_results(options: Options, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step of this module's docstring; write --doc and OUT/results.json."""
    import torch

    from ..evaluate import load_testset

    options.check()
    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    steps = StepRunner(out, echo)

    ensure_testset(options, steps)
    testset = load_testset(options.testset)
    several_photos = None if options.skip_several_photos else several_photos_step(options, out / "several-photos", steps)
    main = evaluate_step("main", options, [], options.methods, out / "main", steps, several=True)

    ablations = None
    aligner_settings = None
    if not options.skip_ablations:
        aligner_settings = pocket_aligner_settings()
        if options.aligner_steps is not None:
            aligner_settings["steps"] = options.aligner_steps
        manifest = training_data_step(options, aligner_settings, out / "ablations" / "toy", steps)
        # the pocket model's own Aligner is the w = 20, k = 16 run when the steps are the profile's
        committed = committed_training(aligner_settings) if options.aligner_steps is None else None
        shared = AblationRun(PLVM_WEIGHT, PLVM_CONTEXT)
        trained = {run: committed if run == shared and committed is not None
                   else train_step(run, aligner_settings, manifest,
                                   out / "ablations" / run.name / "train", steps)
                   for run in ablation_plan()}
        ablations = []
        for run in ablation_plan():
            if trained[run] is committed:
                ablations.append((run, main, committed))
                continue
            aligner_dir = out / "ablations" / run.name / "train" / "aligner"
            results = evaluate_step(f"eval-{run.name}", options,
                                    evaluation_overrides(run, aligner_dir), ["plvm"],
                                    out / "ablations" / run.name / "eval", steps)
            ablations.append((run, results, trained[run]))

    began = time.perf_counter()
    summary = build_summary(options, testset, main, ablations, aligner_settings, steps.records,
                            machine_facts(options.threads), item_statistics(main, out / "main"))
    summary["several_photos"] = several_photos
    summary["steps"].append({"name": "doc", "seconds": round(time.perf_counter() - began, 1),
                             "reused": False})
    summary["steps"].append({"name": "total (this run)",
                             "seconds": round(time.perf_counter() - started, 1), "reused": False})
    write_json_atomic(out / "results.json", summary)
    write_text_atomic(options.doc, render_results_markdown(summary))
    echo(f"[results] wrote {options.doc} and {out / 'results.json'} "
         f"in {time.perf_counter() - started:.0f} s")
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out-dir", default=DEFAULTS["out_dir"], show_default=True,
              type=click.Path(path_type=Path),
              help="Everything the run makes (evaluations, Aligners, step markers); reuse it "
                   "to resume or to skip finished steps.")
@click.option("--doc", default=DEFAULTS["doc"], show_default=True,
              type=click.Path(path_type=Path), help="The markdown file to write.")
@click.option("--testset", default=DEFAULTS["testset"], show_default=True,
              type=click.Path(path_type=Path),
              help="Test set folder (plvm-val layout); a toy one is written there if missing.")
@click.option("--identities", default=DEFAULTS["identities"], show_default=True, type=int,
              help="Held-out identities of a new toy test set (and of an existing toy one).")
@click.option("--neg-per-identity", default=DEFAULTS["neg_per_identity"], show_default=True,
              type=int, help="Sampled negative recognition pairs per identity (as `make eval`).")
@click.option("--skip-trained", is_flag=True,
              help="Leave the methods that train per concept (Yo'LLaVA, MyVLM) out of the main table.")
@click.option("--skip-ablations", is_flag=True, help="Train and evaluate no ablation Aligner.")
@click.option("--skip-several-photos", is_flag=True,
              help="Leave out concepts from several photos (PLVM with 1, 2, 4 references; Yo'LLaVA on the same).")
@click.option("--aligner-steps", default=None, type=int,
              help="Training steps of each ablation Aligner [default: the pocket profile's, 1000].")
@click.option("--limit", default=None, type=int,
              help="At most N items per task in every evaluation (smoke runs only).")
@click.option("--threads", default=DEFAULTS["threads"], show_default=True, type=int,
              help="torch CPU threads (one is fastest for the pocket model).")
@click.option("--render-only", is_flag=True,
              help="Write --doc again from the finished run in --out-dir (its results.json and item logs).")
def main(out_dir: Path, doc: Path, testset: Path, identities: int, neg_per_identity: int,
         skip_trained: bool, skip_ablations: bool, skip_several_photos: bool, aligner_steps: int | None,
         limit: int | None, threads: int, render_only: bool) -> None:
    """Measure the pocket model and write docs/results.md: one command, numbers from the run.

    \b
    Main table on held-out toy identities: pocket PLVM, the pocket LVLM with no prompt,
    with a ~16-token description written by the base model, and Yo'LLaVA, each with
    recognition positive / negative / mean, visual and text MCQ accuracy, seconds to add
    a concept and tokens per concept. Ablations: Aligners trained as the pocket one with
    Yes/No weight w = 1 vs 20 (k = 16) and k = 4 / 8 / 16 context tokens (w = 20).

    \b
    Full size takes about 20 minutes on 2 CPU cores; a repeated run with the same
    --out-dir reuses every finished step. Smoke run:
      python -m plvmctl.lab.results --out-dir /tmp/r --doc /tmp/r.md --testset /tmp/ts \\
          --identities 4 --aligner-steps 5 --skip-trained
    """
    options = Options(out_dir=out_dir, doc=doc, testset=testset, identities=identities,
                      neg_per_identity=neg_per_identity, skip_trained=skip_trained,
                      skip_ablations=skip_ablations, skip_several_photos=skip_several_photos,
                      aligner_steps=aligner_steps, limit=limit,
                      threads=threads)
    try:
        run = rerender if render_only else make_results
        run(options, echo=lambda message: click.echo(message, err=True))
    except PlvmError as error:
        raise click.ClickException(str(error)) from None


if __name__ == "__main__":
    main()
