"""A test set in the plvm-val layout, read from disk: identities, their photos, the published
multiple-choice rows, and who stands in each query photo.

    DIR/validation_recognition/<Identity>/ref_img.png, query_img*.jpg   one folder per identity
    DIR/validation_recognition/query_ques.json       visual multiple-choice rows (with a photo)
    DIR/validation_recognition/non_query_ques.json   text-only multiple-choice rows
    DIR/negatives/                                   photos of people who are no test identity
    DIR/toy_world.json                               a toy set's scenes: everyone in each photo
    DIR/groups/                                      a toy set's photos of several test identities

Rows that reference a missing file are kept, marked `missing`, so the report can count them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..concept import concept_name
from ..errors import PlvmError

DEFAULT_TESTSET = Path("../shared/testsets/plvm-val")
SET_FOLDER = "validation_recognition"
VISUAL_FILE = "query_ques.json"
TEXT_FILE = "non_query_ques.json"
NEGATIVES_FOLDER = "negatives"  # photos of people who are not test identities (trained methods' negatives)
QUERY_SUFFIXES = (".jpg", ".jpeg", ".png")
PRIMARY_REFERENCE = "ref_img.png"
TOY_SIDECAR = "toy_world.json"  # a toy set's scenes: who stands in each photo

PLACEHOLDER = "<sks>"  # the concept in the published questions and options

LAYOUT_HINT = (f"the plvm-val layout: DIR/{SET_FOLDER}/<Identity>/ref_img.png and query_img*.jpg, "
               f"DIR/{SET_FOLDER}/{VISUAL_FILE} and {TEXT_FILE}")


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



def _toy_scenes(testset: TestSet) -> dict[str, dict]:
    """A toy set's scenes (toy_world.json: photo path relative to the root → scene), {} for a
    set without the sidecar."""
    sidecar = testset.root / TOY_SIDECAR
    if not sidecar.is_file():
        return {}
    try:
        scenes = json.loads(sidecar.read_text(encoding="utf-8")).get("scenes", {})
    except (json.JSONDecodeError, AttributeError):
        raise PlvmError(f"malformed {sidecar}: expected {{'scenes': {{photo: scene}}}}") from None
    if not isinstance(scenes, dict):
        raise PlvmError(f"malformed {sidecar}: expected {{'scenes': {{photo: scene}}}}")
    return {relative: scene for relative, scene in scenes.items() if isinstance(scene, dict)}


def _people(scene: dict) -> list[dict]:
    people = scene.get("people", [])
    return [person for person in people if isinstance(person, dict)] if isinstance(people, list) else []


def photo_truth(testset: TestSet) -> dict[Path, set[str]]:
    """Every query photo → the test identities in it: its folder's, and (on a toy set, whose
    toy_world.json says who stands in each photo) any other test identity drawn in it."""
    truth = {query: {identity.name} for identity in testset.identities for query in identity.queries}
    names = {identity.name for identity in testset.identities}
    for relative, scene in _toy_scenes(testset).items():
        photo = testset.root / relative
        if photo in truth:
            truth[photo] |= {p.get("name") for p in _people(scene) if p.get("name") in names}
    return truth


GROUPS_FOLDER = "groups"  # a toy set's photos of several test identities together
PLACES = ("left", "middle", "right")  # where a toy scene puts its people, left to right


def group_photos(testset: TestSet) -> dict[Path, tuple[tuple[str, str], ...]]:
    """A toy set's group photos (groups/, several test identities together) → the test
    identities in each as (name, place), left to right; {} for a set without them."""
    names = {identity.name for identity in testset.identities}
    groups = {}
    for relative, scene in sorted(_toy_scenes(testset).items(), key=lambda entry: _natural_key(entry[0])):
        photo = testset.root / relative
        if not relative.startswith(f"{GROUPS_FOLDER}/") or not photo.is_file():
            continue
        people = [(p["name"], p.get("position")) for p in _people(scene)
                  if p.get("name") in names and p.get("position") in PLACES]
        groups[photo] = tuple(sorted(people, key=lambda person: PLACES.index(person[1])))
    return groups


def relative_path(path: Path | None, root: Path) -> str | None:
    """`path` as the item logs and item keys write it: relative to the test set's root when
    it lies inside, else as given."""
    if path is None:
        return None
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
