"""`plvmctl toy ...`: generate the procedural toy world's training data and test set."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import PlvmError
from .app import ReportingGroup


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty output folder unless `force`; refuse a file in its place always."""
    if out.exists() and not out.is_dir():
        raise PlvmError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PlvmError(f"--out {out} is not empty; pass --force to replace the toy data in it")


@click.group(cls=ReportingGroup, name="toy")
def toy() -> None:
    """The toy world: procedural cartoon identities for training and testing from scratch.

    Each identity is a fixed combination of traits (face shape, skin tone, hair colour and
    style, accessory, facial hair, eye colour). About 20 % of all identities are held out for
    testing once and for all, whatever the seed: `generate` never uses them, `testset` uses
    nothing else.
    """


@toy.command("generate")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write images/, scenes/, manifest.jsonl and scene_qa.jsonl into.")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives identical files.")
@click.option("--identities", "n_identities", default=20, show_default=True, type=click.IntRange(min=1),
              help="How many training identities to draw.")
@click.option("--photos", "photos", default=8, show_default=True, type=click.IntRange(min=1),
              help="Photos (scenes with 1-3 people) per identity, besides its reference portrait.")
@click.option("--scene-size", default=96, show_default=True, type=int, help="Side of the scene photos in pixels.")
@click.option("--portrait-size", default=64, show_default=True, type=int, help="Side of the reference portraits in pixels.")
@click.option("--references", default=1, show_default=True, type=click.IntRange(min=1),
              help="Reference photos per identity: ref.png, then ref2.png ... (clean, crowd crop, small, "
                   "covered in turn), for `train.max_references` > 1.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out, replacing earlier toy training data there.")
def generate(out: Path, seed: int, n_identities: int, photos: int, scene_size: int, portrait_size: int,
             references: int, force: bool) -> None:
    """Write toy training data (training-part identities only) and print the manifest path.

    \b
    images/<Name>/ref.png    reference portrait of each identity
    images/<Name>/q<i>.png   photos (1-3 people) that contain it
    images/<Name>/ref<j>.png further reference photos (with --references 2 or more)
    scenes/s<i>.png          extra photos of random training identities
    manifest.jsonl           one identity a line: photos, what is in them, attribute Q&As
    scene_qa.jsonl           generic scene questions for pretraining a base model
    """
    from ..lab.toy import generate_training_data

    _prepare_out(out, force)
    manifest = generate_training_data(out, n_identities, photos, seed, scene_size=scene_size,
                                      portrait_size=portrait_size, references=references)
    click.echo(str(manifest))


@toy.command("testset")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write validation_recognition/ (the plvm-val layout) into.")
@click.option("--identities", "n_identities", required=True, type=click.IntRange(min=1),
              help="How many held-out identities (one folder each).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives identical files.")
@click.option("--queries", default=6, show_default=True, type=click.IntRange(min=1),
              help="Query photos per identity (query_img1.png ...), one visual question each.")
@click.option("--scene-size", default=96, show_default=True, type=int, help="Side of the query photos in pixels.")
@click.option("--portrait-size", default=64, show_default=True, type=int, help="Side of the reference photos in pixels.")
@click.option("--groups", default=None, type=click.IntRange(min=0),
              help="Photos of two or three test identities together (groups/), where `eval --pairs` asks "
                   "about several people at once  [default: as many as --identities]")
@click.option("--references", default=1, show_default=True, type=click.IntRange(min=1),
              help="Reference photos per identity: ref_img.png, then ref_img2.png ... (clean portraits).")
@click.option("--hard-references", is_flag=True,
              help="The further references are hard: crops of crowds, small subjects, covered faces.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out, replacing an earlier toy test set there.")
def testset(out: Path, n_identities: int, seed: int, queries: int, scene_size: int, portrait_size: int,
            groups: int | None, references: int, hard_references: bool, force: bool) -> None:
    """Write a test set shaped exactly like plvm-val, from held-out identities only; print --out.

    \b
    validation_recognition/<Name>/ref_img.png, query_img1.png ...
    validation_recognition/query_ques.json       visual multiple choice
    validation_recognition/non_query_ques.json   text-only multiple choice
    groups/group_img1.png ...                    two or three identities together
    README.md, toy_world.json                    provenance and the truth of every photo
    """
    from ..lab.toy import write_testset

    _prepare_out(out, force)
    folder = write_testset(out, n_identities, seed, queries_per_identity=queries, scene_size=scene_size,
                           portrait_size=portrait_size, groups=groups, references=references,
                           hard_references=hard_references)
    click.echo(str(folder))


@toy.command("concepts")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write one photo folder per concept, negatives/ and queries/ into.")
@click.option("--concepts", "n_concepts", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many held-out identities become concepts.")
@click.option("--photos", default=4, show_default=True, type=click.IntRange(min=1), help="Portraits per concept.")
@click.option("--together", default=1, show_default=True, type=click.IntRange(min=0),
              help="Scenes of two or three concepts together, saved into each of their folders.")
@click.option("--negatives", default=20, show_default=True, type=click.IntRange(min=0),
              help="Portraits of other held-out identities in negatives/.")
@click.option("--queries", default=4, show_default=True, type=click.IntRange(min=0),
              help="Query scenes per concept that show it, and as many that do not (queries.json: who is in each).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed; the same seed gives identical files.")
@click.option("--force", is_flag=True, help="Write into a non-empty --out.")
def concepts(out: Path, n_concepts: int, photos: int, together: int, negatives: int, queries: int, seed: int,
             force: bool) -> None:
    """Write toy concept folders for `train mcllava` (or yollava, myvlm); print the command.

    \b
    OUT/<name>/p<i>.png, with-<j>.png   a folder of photos per concept (with-*: several together)
    OUT/negatives/n<i>.png              other identities
    OUT/queries/q<i>.png, queries.json  photos to ask about, and who is in each
    """
    from ..lab.concepts import write_concept_folders

    _prepare_out(out, force)
    made = write_concept_folders(out, n_concepts, photos=photos, together=together, negatives=negatives,
                                 queries=queries, seed=seed)
    options = " ".join(f"--concept {name}={folder}" for name, folder in made["concepts"].items())
    click.echo(f"plvmctl train mcllava {options} --negatives {made['negatives']}")
