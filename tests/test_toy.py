"""Tests of the toy world: identities, the fixed split, rendering, questions, data sets, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from plvmctl.cli.toy import toy
from plvmctl.lab import toy as toy_world
from plvmctl.data import templates
from plvmctl.lab.toy import (
    EXPRESSIONS,
    POSITIONS,
    TRAITS,
    Background,
    Identity,
    PersonInScene,
    SceneInfo,
    all_identities,
    attribute_qa,
    generate_training_data,
    heldout_identities,
    is_heldout,
    one_trait_neighbours,
    random_scene,
    render_portrait,
    render_scene,
    scene_qa,
    scene_qa_about,
    trait_differences,
    training_identities,
    write_testset,
)
from plvmctl.errors import PlvmError

REAL_VAL = Path("/work/shared/testsets/plvm-val/validation_recognition")
BASE = Identity("round", "light", "brown", "short", "none", "none", "brown")


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def pixels_changed(a, b, threshold: int = 40) -> int:
    """How many pixels differ by more than `threshold` (sum over RGB)."""
    diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).sum(axis=2)
    return int((diff > threshold).sum())


def with_trait(identity: Identity, trait: str, value: str) -> Identity:
    traits = identity.traits()
    traits[trait] = value
    return Identity(**traits)


# ----------------------------------------------------------------------------- identities


def test_identity_space_and_split_sizes():
    expected = int(np.prod([len(values) for values in TRAITS.values()]))
    assert len(all_identities()) == expected >= 1000
    train, held = set(training_identities()), set(heldout_identities())
    assert not train & held
    assert train | held == set(all_identities())
    assert 0.15 < len(held) / expected < 0.25


def test_split_is_a_stable_hash_of_the_id_not_seeded_and_not_python_hash():
    for identity in all_identities()[::97]:
        bucket = int.from_bytes(hashlib.sha256(identity.identity_id.encode()).digest()[:8], "big") % 100
        assert is_heldout(identity) == (bucket < 20)
    # Another interpreter with another string-hash salt computes the very same split.
    code = (
        "import hashlib; from plvmctl.lab.toy import heldout_identities as h; "
        "print(hashlib.sha256(','.join(i.identity_id for i in h()).encode()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    ).stdout.strip()
    here = hashlib.sha256(",".join(i.identity_id for i in heldout_identities()).encode()).hexdigest()
    assert other == here


def test_names_are_unique_and_folder_safe():
    names = [identity.name for identity in all_identities()]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", name) for name in names)
    assert BASE.name == Identity(*BASE.identity_id.split("-")).name  # stable


def test_identity_id_round_trip_and_errors():
    for identity in all_identities()[::501]:
        assert Identity.from_id(identity.identity_id) == identity
    with pytest.raises(PlvmError):
        Identity.from_id("round-tan")
    with pytest.raises(PlvmError):
        Identity.from_id("round-tan-purple-short-none-none-brown")


def test_hard_negatives_exist_within_each_part():
    for part in (training_identities(), heldout_identities()):
        sample = random.Random(0).sample(list(part), 60)
        with_neighbours = 0
        for identity in sample:
            neighbours = one_trait_neighbours(identity, part)
            assert all(len(trait_differences(identity, other)) == 1 for other in neighbours)
            assert all(is_heldout(other) == is_heldout(identity) for other in neighbours)
            with_neighbours += bool(neighbours)
        assert with_neighbours >= 50
        # Every trait (including the subtle ones) separates some pair inside the part.
        seen = Counter()
        for identity in sample:
            for other in one_trait_neighbours(identity, part):
                seen[trait_differences(identity, other)[0]] += 1
        assert set(seen) == set(TRAITS)


# ----------------------------------------------------------------------------- rendering


def test_rendering_is_deterministic_and_seed_dependent():
    pool = training_identities()
    subject = pool[123]
    first = random_scene(subject, random.Random(7), pool)
    again = random_scene(subject, random.Random(7), pool)
    other = random_scene(subject, random.Random(8), pool)
    assert png_bytes(first[0]) == png_bytes(again[0])
    assert first[1].to_dict() == again[1].to_dict()
    assert png_bytes(first[0]) != png_bytes(other[0])
    assert png_bytes(render_portrait(subject, random.Random(3))) == png_bytes(render_portrait(subject, random.Random(3)))


def test_images_are_rgb_with_requested_sizes():
    image = render_portrait(BASE, random.Random(0), size=48)
    assert image.mode == "RGB" and image.size == (48, 48)
    scene, info = random_scene(BASE, random.Random(0), all_identities(), size=80)
    assert scene.mode == "RGB" and scene.size == (80, 80) and info.size == 80
    with pytest.raises(PlvmError):
        render_portrait(BASE, random.Random(0), size=8)


@pytest.mark.parametrize("trait", list(TRAITS))
def test_every_trait_value_changes_the_pixels(trait):
    """Two identities differing in one trait give clearly different portraits AND scenes."""
    for a in TRAITS[trait]:
        for b in TRAITS[trait]:
            if a >= b:
                continue
            first, second = with_trait(BASE, trait, a), with_trait(BASE, trait, b)
            portrait_a = render_portrait(first, random.Random(1))
            portrait_b = render_portrait(second, random.Random(1))
            assert pixels_changed(portrait_a, portrait_b) >= 4, (trait, a, b)
            scene_a = render_scene([PersonInScene(first, "blue", "neutral", "left")], Background("white"))
            scene_b = render_scene([PersonInScene(second, "blue", "neutral", "left")], Background("white"))
            assert pixels_changed(scene_a, scene_b) >= 2, (trait, a, b)


def test_each_expression_draws_a_different_mouth():
    mouths = {}
    for expression in EXPRESSIONS:
        image = render_scene([PersonInScene(BASE, "green", expression, "middle")], Background("grey"))
        mouths[expression] = np.asarray(image)[40:60, 38:58]  # around the mouth of the middle person
    for a in EXPRESSIONS:
        for b in EXPRESSIONS:
            if a < b:
                assert pixels_changed(mouths[a], mouths[b]) >= 2, (a, b)


def test_random_scene_people_come_from_the_subjects_part():
    rng = random.Random(5)
    for subject in (training_identities()[10], heldout_identities()[10]):
        for _ in range(30):
            _, info = random_scene(subject, rng, all_identities())  # a mixed pool is filtered
            ids = [person.identity for person in info.people]
            assert subject in ids and len(set(ids)) == len(ids)
            assert 1 <= len(ids) <= 3
            assert len({person.position for person in info.people}) == len(ids)
            assert all(is_heldout(identity) == is_heldout(subject) for identity in ids)
    _, info = random_scene(BASE, rng, [BASE], n_people=3)  # nobody else available
    assert [person.identity for person in info.people] == [BASE]
    with pytest.raises(PlvmError):
        random_scene(BASE, rng, all_identities(), n_people=4)


def test_scene_info_round_trips_and_re_renders_identically():
    image, info = random_scene(training_identities()[42], random.Random(11), training_identities(), n_people=3)
    data = json.loads(json.dumps(info.to_dict()))
    again = SceneInfo.from_dict(data)
    assert again.to_dict() == info.to_dict()
    assert png_bytes(again.render()) == png_bytes(image)


# ----------------------------------------------------------------------------- questions


def test_scene_qa_answers_match_the_scene_and_yes_no_is_balanced():
    rng = random.Random(2)
    answers = Counter()
    for k in range(300):
        subject = training_identities()[k * 37]
        _, info = random_scene(subject, rng, training_identities())
        qa = scene_qa(info, rng)
        assert qa and all("<sks>" not in question for question, _ in qa)
        assert qa[0][1] == str(len(info.people))
        assert qa[-1][1] == info.background.colour
        for question, answer in qa:
            if question.startswith(("What colour is the shirt of the person", "What is the shirt colour")):
                where = {"left": "left", "middle": "middle", "right": "right"}
                position = next(p for p in where if p in question)
                assert answer == info.person_at(position).shirt
            if answer in ("Yes", "No") and "hair?" in question:
                answers[answer] += 1
    assert 0.4 < answers["Yes"] / (answers["Yes"] + answers["No"]) < 0.6


def test_attribute_qa_follows_the_traits():
    identity = Identity("square", "dark", "red", "curly", "glasses", "beard", "green")
    qa = dict(attribute_qa(identity))
    assert qa["What colour is <sks>'s hair?"] == "red"
    assert qa["What is <sks>'s hairstyle?"] == "curly"
    assert qa["What is <sks>'s skin tone?"] == "dark"
    assert qa["What is the shape of <sks>'s face?"] == "square"
    assert qa["What accessory does <sks> wear?"] == "glasses"
    assert qa["Does <sks> wear glasses?"] == "Yes" and qa["Is <sks> wearing a hat?"] == "No"
    assert qa["Does <sks> have a beard?"] == "Yes"
    assert qa["What colour are <sks>'s eyes?"] == "green"
    assert all("<sks>" in question for question in qa)
    yes_no = [answer for answer in qa.values() if answer in ("Yes", "No")]
    assert "Yes" in yes_no and "No" in yes_no


def test_scene_qa_about_the_subject():
    rng = random.Random(4)
    subject = training_identities()[99]
    _, info = random_scene(subject, rng, training_identities(), n_people=2)
    me = info.find(subject)
    qa = scene_qa_about(subject, info, rng)
    assert all("<sks>" in question for question, _ in qa)
    assert qa[0][1] == me.position and qa[1][1] == me.shirt and qa[3][1] == me.expression
    assert qa[4][1] == "1" and qa[5][1] == "No"
    stranger = next(identity for identity in training_identities() if info.find(identity) is None)
    with pytest.raises(PlvmError):
        scene_qa_about(stranger, info, rng)


def test_templates():
    assert len(templates.RECOGNITION_QUESTIONS) >= 15
    assert len(templates.POSITIVE_ANSWERS) >= 15 and len(templates.NEGATIVE_ANSWERS) >= 15
    assert all(answer.startswith("Yes") for answer in templates.POSITIVE_ANSWERS)
    assert all(answer.startswith("No") for answer in templates.NEGATIVE_ANSWERS)
    assert all("<sks>" in question for question in templates.RECOGNITION_QUESTIONS)
    assert len(set(templates.RECOGNITION_QUESTIONS)) == len(templates.RECOGNITION_QUESTIONS)
    assert len(templates.ATTRIBUTE_QUESTIONS) >= 10
    assert all("<sks>" in question for question in templates.ATTRIBUTE_QUESTIONS)
    assert templates.fill("Is <sks> here with <sks>?", "bob") == "Is <bob> here with <bob>?"
    assert templates.fill("Is <sks> here?", "<bob>") == "Is <bob> here?"


# ----------------------------------------------------------------------------- training data


def test_generate_training_data(tmp_path):
    manifest_path = generate_training_data(tmp_path / "a", 4, 3, seed=1, progress=False)
    root = manifest_path.parent
    rows = [json.loads(line) for line in manifest_path.read_text().splitlines()]
    assert len(rows) == 4 and len({row["name"] for row in rows}) == 4
    subjects = {row["identity"] for row in rows}
    for row in rows:
        identity = Identity.from_id(row["identity"])
        assert identity.name == row["name"] and not is_heldout(identity)
        assert row["reference"] == f"images/{row['name']}/ref.png" and (root / row["reference"]).is_file()
        assert len(row["queries"]) == len(row["scenes"]) == 3
        for query, scene in zip(row["queries"], row["scenes"]):
            assert (root / query).is_file()
            people = [person["identity"] for person in scene["people"]]
            assert row["identity"] in people
            assert not any(is_heldout(Identity.from_id(person)) for person in people)
            assert not (set(people) - {row["identity"]}) & subjects  # clean negatives
        # what "compare" answers are written from: the traits as words, and who is in each photo
        assert row["traits"] == identity.trait_words() and row["traits"]["hair"] == identity.hair_colour
        for scene, people in zip(row["scenes"], row["people"]):
            places = [person["place"] for person in people]
            assert places == sorted(places, key=POSITIONS.index)
            assert sorted((p["position"], Identity.from_id(p["identity"]).trait_words()) for p in scene["people"]) \
                == sorted((p["place"], p["traits"]) for p in people)
        assert row["attributes"] and {"question", "answer"} == set(row["attributes"][0])
    qa_rows = [json.loads(line) for line in (root / "scene_qa.jsonl").read_text().splitlines()]
    assert {row["image"] for row in qa_rows} >= {q for row in rows for q in row["queries"]}
    assert any(row["image"].startswith("scenes/") for row in qa_rows)
    assert all((root / row["image"]).is_file() and "<sks>" not in row["question"] for row in qa_rows)

    same = generate_training_data(tmp_path / "b", 4, 3, seed=1, progress=False).parent
    assert tree_bytes(root) == tree_bytes(same)
    other = generate_training_data(tmp_path / "c", 4, 3, seed=2, progress=False)
    assert other.read_bytes() != manifest_path.read_bytes()


def test_generate_training_data_rejects_bad_counts(tmp_path):
    with pytest.raises(PlvmError):
        generate_training_data(tmp_path, 0, 3, seed=0, progress=False)
    with pytest.raises(PlvmError):
        generate_training_data(tmp_path, len(training_identities()) + 1, 1, seed=0, progress=False)


# ----------------------------------------------------------------------------- test set


def check_testset(root: Path, n_identities: int, queries: int) -> None:
    """Everything a plvm-val consumer relies on, plus the toy truth from the sidecar."""
    folder = root / "validation_recognition"
    sidecar = json.loads((root / "toy_world.json").read_text())
    names = sorted(path.name for path in folder.iterdir() if path.is_dir())
    assert names == sorted(sidecar["identities"]) and len(names) == n_identities
    for name in names:
        identity = Identity.from_id(sidecar["identities"][name])
        assert identity.name == name and is_heldout(identity)
        files = sorted(path.name for path in (folder / name).iterdir())
        assert files == sorted(["ref_img.png"] + [f"query_img{k}.png" for k in range(1, queries + 1)])
    visual = json.loads((folder / "query_ques.json").read_text())
    text = json.loads((folder / "non_query_ques.json").read_text())
    assert len(visual) == n_identities * queries and text
    visual_keys = {"ref_img", "query_img", "question", "multiple_choice", "correct_answer"}
    text_keys = {"ref_img", "question", "multiple_choice", "correct_answer"}
    if REAL_VAL.is_dir():
        visual_keys = set(json.loads((REAL_VAL / "query_ques.json").read_text())[0])
        text_keys = set(json.loads((REAL_VAL / "non_query_ques.json").read_text())[0])
    for row in visual + text:
        assert set(row) == (visual_keys if "query_img" in row else text_keys)
        assert "<sks>" in row["question"]
        options = row["multiple_choice"]
        assert 2 <= len(options) <= 4 and list(options) == list("ABCD")[: len(options)]
        assert row["correct_answer"] in options
        assert len(set(options.values())) == len(options)
        for key in ("ref_img", "query_img"):
            if key in row:
                assert row[key].startswith("validation_recognition/") and (root / row[key]).is_file()
    for row in visual:
        name = row["ref_img"].split("/")[1]
        assert row["query_img"].split("/")[1] == name
        identity = Identity.from_id(sidecar["identities"][name])
        info = SceneInfo.from_dict(sidecar["scenes"][row["query_img"]])
        me = info.find(identity)
        assert me is not None  # the subject is in the referenced photo
        assert all(is_heldout(person.identity) for person in info.people)
        others = {person.identity.name for person in info.people} - {name}
        assert not others & set(names)  # distractors are never test subjects
        assert png_bytes(info.render()) == (root / row["query_img"]).read_bytes()
        truth = {"Where": me.position, "What is the color": me.shirt,
                 "What is <sks>'s facial": me.expression, "How many": str(len(info.people))}
        expected = next(value for prefix, value in truth.items() if row["question"].startswith(prefix))
        assert row["multiple_choice"][row["correct_answer"]] == expected
    for row in text:
        identity = Identity.from_id(sidecar["identities"][row["ref_img"].split("/")[1]])
        assert row["multiple_choice"][row["correct_answer"]] in identity.traits().values()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_write_testset_layout_and_heldout_only(tmp_path, seed):
    root = write_testset(tmp_path / "val", 3, seed, queries_per_identity=4, progress=False)
    assert root == tmp_path / "val"
    check_testset(root, 3, 4)
    assert f"seed: {seed}" in (root / "README.md").read_text()


def test_write_testset_is_deterministic_and_refuses_too_many(tmp_path):
    a = write_testset(tmp_path / "a", 2, 5, queries_per_identity=2, progress=False)
    b = write_testset(tmp_path / "b", 2, 5, queries_per_identity=2, progress=False)
    assert tree_bytes(a) == tree_bytes(b)
    c = write_testset(tmp_path / "c", 2, 6, queries_per_identity=2, progress=False)
    assert tree_bytes(a) != tree_bytes(c)
    with pytest.raises(PlvmError):
        write_testset(tmp_path / "d", len(heldout_identities()) + 1, 0, progress=False)


def test_write_testset_rerun_leaves_no_stale_files(tmp_path):
    write_testset(tmp_path, 3, 0, queries_per_identity=3, progress=False)
    write_testset(tmp_path, 2, 1, queries_per_identity=2, progress=False)
    check_testset(tmp_path, 2, 2)


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_and_testset(tmp_path):
    runner = CliRunner()
    out = tmp_path / "train"
    result = runner.invoke(toy, ["generate", "--out", str(out), "--identities", "2", "--photos", "2", "--seed", "3"])
    assert result.exit_code == 0, result.output
    manifest = Path(result.stdout.strip())  # progress bars go to stderr
    assert manifest == out / "manifest.jsonl" and manifest.is_file()

    result = runner.invoke(toy, ["generate", "--out", str(out), "--identities", "2", "--photos", "2"])
    assert result.exit_code != 0
    message = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(message) == 1 and message[0].startswith("error:") and "--force" in message[0]

    result = runner.invoke(toy, ["generate", "--out", str(out), "--identities", "2", "--photos", "1", "--force"])
    assert result.exit_code == 0, result.output

    val = tmp_path / "val"
    result = runner.invoke(toy, ["testset", "--out", str(val), "--identities", "2", "--queries", "3"])
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == val
    check_testset(val, 2, 3)
    result = runner.invoke(toy, ["testset", "--out", str(val), "--identities", "2"])
    assert result.exit_code != 0 and result.stderr.strip().startswith("error:")

    result = runner.invoke(toy, ["testset", "--out", str(tmp_path / "big"), "--identities", "999999"])
    assert result.exit_code == 1 and not isinstance(result.exception, PlvmError)
    assert "held-out" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_help_texts():
    runner = CliRunner()
    for args in (["--help"], ["generate", "--help"], ["testset", "--help"]):
        result = runner.invoke(toy, args)
        assert result.exit_code == 0 and "--" in result.output
    assert "held out" in runner.invoke(toy, ["--help"]).output


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hard", [False, True])
def test_testset_references_add_photos_and_change_nothing_else(tmp_path, hard):
    from plvmctl.evaluate.testset import load_testset

    write_testset(tmp_path / "one", 3, seed=2, queries_per_identity=2, progress=False)
    write_testset(tmp_path / "four", 3, seed=2, queries_per_identity=2, progress=False, references=4,
                  hard_references=hard)
    one, four = _files(tmp_path / "one"), _files(tmp_path / "four")
    added = sorted(set(four) - set(one))
    assert len(added) == 3 * 3 and all(re.search(r"/ref_img[234]\.png$", path) for path in added)
    assert {path for path in one if one[path] != four[path]} == {"toy_world.json", "README.md"}
    world = json.loads(four["toy_world.json"])
    assert sorted(world.pop("references")) == added and world == json.loads(one["toy_world.json"])
    kinds = Counter(row["kind"] for row in json.loads(four["toy_world.json"])["references"].values())
    assert set(kinds) == ({"crowd-crop", "small", "covered"} if hard else {"clean"})
    testset = load_testset(tmp_path / "four")
    assert all(len(identity.references) == 4 and identity.reference.name == "ref_img.png"
               for identity in testset.identities)


def test_hard_references_show_the_subject_among_others(tmp_path):
    write_testset(tmp_path, 4, seed=1, queries_per_identity=1, progress=False, references=4, hard_references=True)
    world = json.loads((tmp_path / "toy_world.json").read_text())
    for path, described in world["references"].items():
        name = path.split("/")[1]
        if described["kind"] in ("crowd-crop", "small"):
            people = [person["name"] for person in described["scene"]["people"]]
            assert name in people and len(people) >= 2
    with pytest.raises(PlvmError, match="--references 2 or more"):
        write_testset(tmp_path / "x", 2, seed=1, progress=False, hard_references=True)


def test_training_data_with_mcq_rows_adds_them_and_changes_nothing_else(tmp_path):
    """mcq_per_trait: that many multiple-choice rows per identity and text-MCQ trait, asked as
    the evaluation asks and answered "value letter"; every other byte is the data without."""
    plain = generate_training_data(tmp_path / "plain", 3, 1, seed=1, progress=False, extra_scenes=0)
    with_mcq = generate_training_data(tmp_path / "mcq", 3, 1, seed=1, progress=False, extra_scenes=0,
                                      mcq_per_trait=2)
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    more = [json.loads(line) for line in with_mcq.read_text().splitlines()]
    for row, other in zip(rows, more):
        added = other["attributes"][len(row["attributes"]):]
        assert other["attributes"][:len(row["attributes"])] == row["attributes"]
        assert {key: value for key, value in other.items() if key != "attributes"} == \
            {key: value for key, value in row.items() if key != "attributes"}
        identity = next(i for i in toy_world.training_identities() if i.name == row["name"])
        traits = [trait for trait in toy_world._TEXT_QUESTIONS for _ in range(2)]
        assert len(added) == len(traits) == 2 * 6
        for trait, mcq in zip(traits, added):
            options = dict(line.split(". ", 1) for line in mcq["question"].splitlines()[1:-1])
            value, letter = mcq["answer"].rsplit(" ", 1)
            assert options[letter] == value == getattr(identity, trait)


def test_training_data_with_visual_mcq_asks_about_the_subject_in_each_photo(tmp_path):
    """visual_mcq_per_photo: that many multiple-choice rows per query photo under "visual",
    answered "value letter" from the photo's scene; every other field is the data without."""
    plain = generate_training_data(tmp_path / "plain", 3, 2, seed=1, progress=False, extra_scenes=0)
    with_visual = generate_training_data(tmp_path / "visual", 3, 2, seed=1, progress=False, extra_scenes=0,
                                         visual_mcq_per_photo=3)
    rows = [json.loads(line) for line in plain.read_text().splitlines()]
    more = [json.loads(line) for line in with_visual.read_text().splitlines()]
    templates = {template: kind for kind, (template, _) in toy_world._VISUAL_QUESTIONS.items()}
    for row, other in zip(rows, more):
        assert {key: value for key, value in other.items() if key != "visual"} == row
        assert [item["image"] for item in other["visual"]] == [query for query in row["queries"] for _ in range(3)]
        identity = next(i for i in toy_world.training_identities() if i.name == row["name"])
        for item in other["visual"]:
            scene = toy_world.SceneInfo.from_dict(row["scenes"][row["queries"].index(item["image"])])
            person = scene.find(identity)
            options = dict(line.split(". ", 1) for line in item["question"].splitlines()[1:-1])
            value, letter = item["answer"].rsplit(" ", 1)
            kind = templates[item["question"].splitlines()[0]]
            assert options[letter] == value == toy_world._visual_answer(kind, person, scene)
        assert len({item["question"].splitlines()[0] for item in other["visual"][:3]}) == 3  # kinds in turn
