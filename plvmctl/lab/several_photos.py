"""Concepts from several photos, measured: PLVM and Yo'LLaVA with 1, 2 and 4 reference photos,
clean and hard, on the same photos.

Two toy test sets are drawn from the same held-out identities and query photos (`plvmctl toy
testset`): one with 4 clean references per identity (`--references 4`: ref_img.png and three
portraits with other shirts and expressions) and one with 4 hard ones besides the primary
(`--references 5 --hard-references`: crowd crops, small subjects, covered faces). A condition
is a view of one of them (`write_view`, symbolic links) in which every identity's `ref_img*`
are the condition's photos and nothing else changes:

    clean-N   ref_img.png, ref_img2.png ... of the clean set (N of them)
    hard-N    ref_img2.png ... ref_img<N+1>.png of the hard set (hard ones only)

So `eval --method plvm yollava` on a view makes PLVM's concept of those N photos
(plvmctl/references.py, through the `plvm` method) and trains Yo'LLaVA on the same N photos
(its positives are every `ref_img*`). Used by `make results` (docs/results.md) and by
bench/several_photos.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import PlvmError
from ..evaluate import load_testset, recipe_mcq_mode, run_evaluation

COUNTS = (1, 2, 4)
KINDS = ("clean", "hard")
SET_FOLDER = "validation_recognition"
QUESTION_FILES = ("query_ques.json", "non_query_ques.json")
SHARED = ("negatives", "toy_world.json", "README.md")  # linked into every view as they are


def write_testsets(out: Path, seed: int, identities: int, queries: int) -> dict[str, Path]:
    """The clean and the hard test set of `seed` under `out` (written once, then reused)."""
    from .toy import write_testset

    made = {}
    for kind, references in (("clean", 4), ("hard", 5)):
        folder = Path(out) / f"seed{seed}-{kind}"
        if not (folder / "toy_world.json").is_file():
            write_testset(folder, identities, seed, queries_per_identity=queries, progress=False,
                          references=references, hard_references=kind == "hard")
        made[kind] = folder
    return made


def condition_photos(identity, kind: str, count: int) -> list[Path]:
    """The `count` reference photos of `kind` of a test identity (module docstring)."""
    chosen = list(identity.references if kind == "clean" else identity.references[1:])
    if len(chosen) < count:
        raise PlvmError(f"{identity.folder} has {len(chosen)} {kind} references, {count} wanted")
    return chosen[:count]


def _link(target: Path, link: Path) -> None:
    link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()))


def write_view(source: Path, out: Path, kind: str, count: int, identities: int | None = None) -> Path:
    """The test set `source` seen with the condition's reference photos (`kind`-`count`), for its
    first `identities` identities (by name; all by default), written once into `out`."""
    if (out / "view.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        if (source / name).exists():
            _link(source / name, out / name)
    chosen = sorted(load_testset(source).identities, key=lambda identity: identity.folder.name)[:identities]
    kept = {identity.folder.name for identity in chosen}
    (out / SET_FOLDER).mkdir(exist_ok=True)
    for identity in chosen:
        mine = out / SET_FOLDER / identity.folder.name
        mine.mkdir(exist_ok=True)
        for photo in identity.queries:
            _link(photo, mine / photo.name)
        for number, photo in enumerate(condition_photos(identity, kind, count), 1):
            _link(photo, mine / ("ref_img.png" if number == 1 else f"ref_img{number}.png"))
    for name in QUESTION_FILES:
        rows = json.loads((source / SET_FOLDER / name).read_text(encoding="utf-8"))
        rows = [row for row in rows if row["ref_img"].split("/")[1] in kept]
        (out / SET_FOLDER / name).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    (out / "view.json").write_text(json.dumps({"source": str(source), "kind": kind, "count": count,
                                               "identities": sorted(kept)}, indent=1), encoding="utf-8")
    return out


def summary_row(method: dict[str, Any]) -> dict[str, Any]:
    """The figures a condition reports for one method of an evaluation's results."""
    recognition = method["recognition"]
    return {"recognition": {key: round(recognition[key], 4) for key in ("positive", "negative", "mean")},
            "recognition_items": recognition["positive_total"] + recognition["negative_total"],
            "text_mcq": round(method["text_qa"]["accuracy"], 4),
            "visual_mcq": round(method["visual_qa"]["accuracy"], 4),
            "seconds_per_concept": (round(method["seconds_per_concept"], 4)
                                    if method.get("seconds_per_concept") is not None else None)}


def measure(runtime, out: Path, sets: dict[str, Path], plan: Sequence[tuple[str, int, Sequence[str], int | None]], *,
            neg_per_identity: int, progress: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate each (kind, count, methods, identities) of `plan` on its view (under
    `out/views`, answers under `out/eval`, resumed as `eval` resumes); returns
    {"kind-count[-on-M]": {method: summary_row}}."""
    measured: dict[str, dict[str, Any]] = {}
    for kind, count, methods, identities in plan:
        label = f"{kind}-{count}" + (f"-on-{identities}" if identities else "")
        view = write_view(sets[kind], out / "views" / label, kind, count, identities)
        results = run_evaluation(runtime, load_testset(view), list(methods), out / "eval" / label,
                                 neg_per_identity=neg_per_identity, seed=0, mcq=recipe_mcq_mode(runtime.recipe),
                                 progress=progress)
        measured[label] = {method: summary_row(results["methods"][method]) for method in methods}
    return measured
