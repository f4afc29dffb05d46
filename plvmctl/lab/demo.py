"""The offline demo: the pocket model, two toy people, the real command line.

    python -m plvmctl.lab.demo [--out runs/demo]

Draws two held-out identities of the toy world (never seen in any training), writes each
one's reference portrait and two photos: one with the first person (and a stranger), one
with both people. Then it runs the real CLI exactly as a user would, through subprocesses:

    plvmctl --recipe pocket --store DIR encode REF --name NAME        (twice)
    plvmctl --recipe pocket --store DIR ask PHOTO1 PHOTO2 "Is <b> in this photo?"
    plvmctl --recipe pocket --store DIR ask PHOTO1 PHOTO2 "Is <a> in this photo?"
    plvmctl --recipe pocket --store DIR ask --no-image "What is <a>'s hair color?"

and prints each command, the answer and the truth (from the toy world's own record of what
it drew). Everything is local: no network, a few MB of weights, well under a minute.
"""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click

from . import toy
from ..errors import PlvmError
from .pocket import ASSETS


def _pick_people(seed: int) -> tuple[toy.Identity, toy.Identity, random.Random]:
    """Two held-out identities that look clearly different (hair colour and accessory)."""
    rng = random.Random(f"plvmctl-demo-{seed}")
    pool = list(toy.heldout_identities())
    first = rng.choice(pool)
    others = [p for p in pool if p.hair_colour != first.hair_colour and p.accessory != first.accessory
              and p.hair_style != first.hair_style]
    return first, rng.choice(others), rng


def _scene(people: list[toy.PersonInScene], rng: random.Random) -> tuple:
    background = toy.Background(rng.choice(tuple(toy.BACKGROUND_COLOURS)), rng.choice(toy.BACKGROUND_PATTERNS))
    info = toy.SceneInfo(people=people, background=background, subject=people[0].identity.identity_id)
    return toy.render_scene(people, background), info


def write_demo_photos(out: Path, seed: int = 0) -> dict:
    """References and photos of two held-out people; returns names, paths and the truth."""
    first, second, rng = _pick_people(seed)
    stranger = rng.choice([p for p in toy.heldout_identities() if p not in (first, second)])
    out.mkdir(parents=True, exist_ok=True)
    paths = {"ref_a": out / "ref_a.png", "ref_b": out / "ref_b.png",
             "photo_1": out / "photo_1.png", "photo_2": out / "photo_2.png"}
    toy.render_portrait(first, rng).save(paths["ref_a"])
    toy.render_portrait(second, rng).save(paths["ref_b"])
    left, right = rng.sample(["left", "right"], 2)
    image_1, info_1 = _scene([toy.random_person(first, "middle", rng),
                              toy.random_person(stranger, left, rng)], rng)
    image_1.save(paths["photo_1"])
    image_2, info_2 = _scene([toy.random_person(first, left, rng),
                              toy.random_person(second, right, rng)], rng)
    image_2.save(paths["photo_2"])
    return {"a": first, "b": second, "paths": paths, "info_1": info_1, "info_2": info_2}


def _run(command: list[str]) -> tuple[str, float]:
    # The pocket model is so small that one CPU thread is fastest (a second one mostly waits,
    # and on a busy machine it made every call several times slower); a user's own
    # OMP_NUM_THREADS wins.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise PlvmError(f"`{shlex.join(command)}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip(), seconds


def run_demo(out: Path, seed: int = 0, recipe: str = "pocket", echo=print) -> list[dict]:
    """Write the photos, run the CLI, print and return one row per command."""
    if recipe == "pocket" and not (ASSETS / "backbone" / "config.json").is_file():
        raise PlvmError(f"the pocket model is missing ({ASSETS}); build it with `make pocket`")
    world = write_demo_photos(out, seed)
    a, b = world["a"].name.lower(), world["b"].name.lower()
    paths = world["paths"]
    store = out / "concepts"
    base = [sys.executable, "-m", "plvmctl", "--recipe", recipe, "--store", str(store)]
    person_a = world["info_2"].find(world["a"])
    where_a = person_a.position
    rows = [
        (["encode", str(paths["ref_a"]), "--name", a, "--force"], None),
        (["encode", str(paths["ref_b"]), "--name", b, "--force"], None),
        # one call, two photos: <b> is absent from photo 1 and present in photo 2, <a> in both
        (["ask", str(paths["photo_1"]), str(paths["photo_2"]), f"Is <{b}> in this photo?"], "No / Yes"),
        (["ask", str(paths["photo_1"]), str(paths["photo_2"]), f"Is <{a}> in this photo?"],
         f"Yes / Yes (<{a}> is {world['info_1'].find(world['a']).position}, then {where_a})"),
        (["ask", "--no-image", f"What is <{a}>'s hair color?"], world["a"].hair_colour),
    ]
    echo(f"people (held-out, never trained on): <{a}> = {world['a'].describe()}")
    echo(f"                                     <{b}> = {world['b'].describe()}")
    echo(f"photos: {paths['ref_a']}, {paths['ref_b']} (references); {paths['photo_1']} "
         f"(<{a}> + a stranger); {paths['photo_2']} (<{a}> and <{b}>)")
    report = []
    for arguments, truth in rows:
        command = base + arguments
        answer, seconds = _run(command)
        shown = shlex.join(["plvmctl"] + command[3:])
        echo(f"\n$ {shown}")
        lines = answer.splitlines() or [""]
        echo(f"  answer: {lines[0]}" + "".join(f"\n          {line}" for line in lines[1:]))
        if truth is not None:
            echo(f"  truth:  {truth}")
        echo(f"  ({seconds:.1f} s)")
        report.append({"command": shown, "answer": answer, "truth": truth, "seconds": round(seconds, 2)})
    return report


@click.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True,
              type=click.Path(file_okay=False), help="Folder for the photos and the concept store.")
@click.option("--seed", default=0, show_default=True, type=int, help="Which two people to draw.")
@click.option("--recipe", default="pocket", show_default=True, help="Recipe the CLI runs with.")
def main(out_dir: str, seed: int, recipe: str) -> None:
    """Run the offline pocket demo through the real `plvmctl` command line."""
    started = time.perf_counter()
    try:
        run_demo(Path(out_dir), seed, recipe)
    except PlvmError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"\ndone in {time.perf_counter() - started:.1f} s")
    if recipe == "pocket":
        click.echo("the pocket model compares each person in the photo with what the concept says before "
                   "it answers (`plvmctl -v ask ...` prints that comparison too); measured numbers on "
                   "40 held-out people: docs/results.md")


if __name__ == "__main__":
    main()
