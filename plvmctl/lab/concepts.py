"""Concept folders from the toy world, the input `plvmctl train mcllava` (and yollava, myvlm)
takes: one folder of photos per concept, photos of several concepts together in each of their
folders, a folder of negatives, and held-out query photos with the truth.

    OUT/<name>/p<i>.png          portraits of the concept (held-out identities: never trained on)
    OUT/<name>/with-<j>.png      a scene of this concept with others of the run (same bytes in
                                 each of their folders: that is how the trainer sees "together")
    OUT/negatives/n<i>.png       portraits of other held-out identities
    OUT/queries/q<i>.png         scenes to ask about; OUT/queries.json: who is in each
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..fileio import write_json_atomic
from . import toy


def write_concept_folders(out: str | Path, concepts: int = 3, *, photos: int = 4, together: int = 1,
                          negatives: int = 20, queries: int = 4, seed: int = 0, portrait_size: int = 64,
                          scene_size: int = 96) -> dict:
    """Write the folders above for `concepts` held-out identities; returns
    {"concepts": {name: folder}, "negatives": folder, "queries": [{"photo", "people"}]}.

    Queries: for each concept, `queries` scenes that show it (with 0-2 strangers) and
    `queries` that do not (strangers only); the same seed gives the same files."""
    out = Path(out)
    rng = random.Random(f"toy-concepts-{seed}")
    pool = list(toy.heldout_identities())
    chosen = rng.sample(pool, concepts + negatives)
    people, others = chosen[:concepts], chosen[concepts:]
    strangers = [i for i in pool if i not in chosen]
    folders = {}
    for identity in people:
        folder = out / identity.name.lower()
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(photos):
            toy.render_portrait(identity, rng, size=portrait_size).save(folder / f"p{number}.png")
        folders[identity.name.lower()] = folder
    for number in range(together if concepts > 1 else 0):
        group = rng.sample(people, min(len(people), 2 + number % 2, 3))
        scene, _ = toy.random_scene(group[0], rng, group[1:], n_people=len(group), size=scene_size)
        for identity in group:
            scene.save(folders[identity.name.lower()] / f"with-{number}.png")
    negative_folder = out / "negatives"
    negative_folder.mkdir(parents=True, exist_ok=True)
    for number, identity in enumerate(others):
        toy.render_portrait(identity, rng, size=portrait_size).save(negative_folder / f"n{number}.png")
    query_folder = out / "queries"
    query_folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for identity in people:
        for shows in [True] * queries + [False] * queries:
            subject = identity if shows else rng.choice(strangers)
            scene, info = toy.random_scene(subject, rng, strangers, size=scene_size)
            path = query_folder / f"q{len(rows)}.png"
            scene.save(path)
            rows.append({"photo": str(path), "about": identity.name.lower(),
                         "people": [p.identity.name.lower() for p in info.people],
                         "places": {p.identity.name.lower(): p.position for p in info.people}})
    write_json_atomic(out / "queries.json", {"queries": rows})
    return {"concepts": folders, "negatives": negative_folder, "queries": rows}


def read_queries(out: str | Path) -> list[dict]:
    """The query rows `write_concept_folders` wrote into OUT/queries.json."""
    return json.loads((Path(out) / "queries.json").read_text(encoding="utf-8"))["queries"]
