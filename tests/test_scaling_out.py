"""Two real processes (torchrun, gloo, CPU) against one: ask --batch, find --json, index build
and eval give one process's output, a dead rank's work is resumed, and `train aligner` follows
one process's loss curve with the same global batch, resuming under either process count.

Each launch starts two Python processes that import torch and load the tiny recipe: slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.shards import parts_folder

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def environment(**extra: str) -> dict[str, str]:
    """This tree and the tests folder importable, one thread, offline, no launcher variables."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def torchrun(*args, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N ARGS` (a free port on this machine)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(processes), *map(str, args)],
                          cwd=cwd, env=environment(), capture_output=True, text=True, timeout=600)


def plvmctl(*args, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """One `python -m plvmctl ARGS` process (env: RANK and WORLD_SIZE to play one rank)."""
    return subprocess.run([sys.executable, "-m", "plvmctl", *map(str, args)], cwd=cwd,
                          env=environment(**env), capture_output=True, text=True, timeout=600)


def in_process(*args):
    """The one-process run, with one torch thread as every torchrun rank has (torchrun sets
    OMP_NUM_THREADS=1): another thread count sums floats in another order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return CliRunner().invoke(main, [*map(str, args)])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def store(tmp_path, photos):
    store = tmp_path / "store"
    for name, photo in (("avril", "plain0.png"), ("bob", "photo.jpg")):
        assert in_process("--recipe", "tiny", "--store", store, "encode", photos[photo], "--name", name).exit_code == 0
    return store


# -- ask --batch -------------------------------------------------------------------------------
def test_ask_batch_two_processes_equal_one_and_resume_a_dead_rank(tmp_path, photos, store):
    lines = [{"image": str(photos[name]), "question": question} for name, question in [
        ("plain1.png", "Is <avril> here?"), ("photo.jpg", "Where is <bob>?"), ("rgba.png", "Describe it."),
        ("corrupt.jpg", "Is <avril> here?"), ("plain2.png", "Is <avril> with <bob>?"),
        ("gray.png", "What is <avril> doing?")]]
    lines.insert(2, {"image": None, "question": "What colour is <bob>'s hair?"})
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ask = ["-m", "plvmctl", "--recipe", "tiny", "--store", store, "ask", "--batch", queries, "--batch-size", "2"]
    one = in_process(*ask[2:], "--out", tmp_path / "one.jsonl")
    assert one.exit_code == 1  # the corrupt photo

    two = torchrun(*ask, "--out", tmp_path / "two.jsonl", cwd=tmp_path)
    assert two.returncode != 0 and "6 answered, 1 failed" in two.stdout  # rank 0 reports, exit 1
    assert two.stdout.count("answered") == 1
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert not parts_folder(tmp_path / "two.jsonl").exists()

    # rank 1 of 2 ran alone (rank 0 died): its partial file stays; two processes resume from it
    alone = plvmctl(*ask[2:], "--out", tmp_path / "again.jsonl", cwd=tmp_path, RANK="1", WORLD_SIZE="2")
    assert alone.returncode == 0, alone.stderr
    partial = [json.loads(line) for line in (parts_folder(tmp_path / "again.jsonl") / "rank-1.jsonl").open()]
    assert partial and len(partial) < len(lines)
    rerun = torchrun(*ask, "--out", tmp_path / "again.jsonl", cwd=tmp_path)
    assert "6 answered, 1 failed" in rerun.stdout, rerun.stderr
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()


# -- find --json and index build -------------------------------------------------------------
def test_find_json_two_processes_equal_one(tmp_path, photos, store):
    album = [photos[name] for name in ("plain1.png", "rgba.png", "text.png", "plain2.png", "photo.jpg")]
    find = ["--recipe", "tiny", "--store", store, "find", *album, "--json", "--threshold", "0.5"]
    one = in_process(*find)
    two = torchrun("-m", "plvmctl", *find, cwd=tmp_path)
    assert two.returncode != 0  # text.png is no photo, as with one process
    assert two.stdout == one.stdout and any(json.loads(line)["found"] for line in one.stdout.splitlines())


def test_index_build_two_processes_equal_one(tmp_path, photos):
    folder = tmp_path / "album"
    folder.mkdir()
    for name in ("plain0.png", "plain1.png", "plain2.png", "plain3.png", "photo.jpg", "gray.png", "rgba.png"):
        (folder / name).write_bytes(photos[name].read_bytes())
    build = ["--recipe", "tiny", "index", "build", folder, "--shard-size", "2", "--no-progress"]
    assert in_process(*build, "--out", tmp_path / "one.index").exit_code == 0
    two = torchrun("-m", "plvmctl", *build, "--out", tmp_path / "two.index", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("7 vectors") == 1
    assert (tmp_path / "two.index").read_bytes() == (tmp_path / "one.index").read_bytes()


# -- eval ----------------------------------------------------------------------------------------
def asked_lines(folder: Path) -> dict[str, list[str]]:
    return {path.stem: path.read_text().splitlines() for path in sorted(folder.glob("asked-*.txt"))}


def method(log: Path) -> str:
    """The method an item log belongs to: items/NAME.jsonl or items/NAME.jsonl.parts/rank-R.jsonl."""
    return (log.parent.name if log.parent.name.endswith(".parts") else log.name).split(".")[0]


def test_eval_two_processes_equal_one_and_resume_a_killed_rank(tmp_path):
    from test_evaluate import make_testset
    from two_rank_eval import METHODS

    root = make_testset(tmp_path / "set")
    script = TESTS / "two_rank_eval.py"
    one = subprocess.run([sys.executable, script, root, tmp_path / "one", tmp_path / "asked-one"],
                         env=environment(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = torchrun(script, root, tmp_path / "two", tmp_path / "asked-two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    for name in METHODS:  # the merged logs are one process's, byte for byte
        assert (tmp_path / "two" / "items" / f"{name}.jsonl").read_bytes() == \
            (tmp_path / "one" / "items" / f"{name}.jsonl").read_bytes()
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")}
    for name in METHODS:
        for key in ("recognition", "text_qa", "visual_qa", "asked_this_run"):
            assert results["two"]["methods"][name][key] == results["one"]["methods"][name][key]
    asked = asked_lines(tmp_path / "asked-two")
    assert set(asked) == {"asked-0", "asked-1"} and all(asked.values())
    assert not set(asked["asked-0"]) & set(asked["asked-1"])  # each item asked by one rank
    assert sorted(asked["asked-0"] + asked["asked-1"]) == sorted(asked_lines(tmp_path / "asked-one")["asked-0"])

    killed = torchrun(script, root, tmp_path / "three", tmp_path / "asked-three", "--die", cwd=tmp_path)
    assert killed.returncode != 0  # rank 1 died, torchrun stopped rank 0
    items = tmp_path / "three" / "items"
    logged_before = [f"{method(path)}\t{record['key']}\t{record['mode']}"
                     for path in [*items.glob("*.jsonl"), *items.glob("*.parts/rank-*.jsonl")]
                     for record in map(json.loads, path.read_text().splitlines())]
    assert any(".parts" in str(path) for path in items.glob("*.parts/rank-1.jsonl"))  # rank 1's answers
    rerun = subprocess.run([sys.executable, script, root, tmp_path / "three", tmp_path / "asked-rerun"],
                           env=environment(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    again = asked_lines(tmp_path / "asked-rerun").get("asked-0", [])
    everything = sorted(asked_lines(tmp_path / "asked-one")["asked-0"])
    assert not set(again) & set(logged_before)  # what the dead run logged is not asked again
    assert sorted(again + logged_before) == everything
    for name in METHODS:
        assert sorted((tmp_path / "three" / "items" / f"{name}.jsonl").read_text().splitlines()) == \
            sorted((tmp_path / "one" / "items" / f"{name}.jsonl").read_text().splitlines())
    assert not list((tmp_path / "three" / "items").glob("*.parts"))


def test_eval_under_accelerate_launch_splits_the_items_too(tmp_path):
    pytest.importorskip("accelerate")
    from test_evaluate import make_testset

    root = make_testset(tmp_path / "set")
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                               "--dynamo_backend", "no", "--main_process_port", "0",
                               TESTS / "two_rank_eval.py", root, tmp_path / "out", tmp_path / "asked"],
                              cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr
    asked = asked_lines(tmp_path / "asked")
    assert set(asked) == {"asked-0", "asked-1"} and all(asked.values())
    assert not set(asked["asked-0"]) & set(asked["asked-1"])
    assert (tmp_path / "out" / "results.json").is_file()


# -- train aligner ---------------------------------------------------------------------------------
def losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in row]


def test_train_aligner_two_processes_follow_one_and_resume_under_either_count(tmp_path):
    from test_train_aligner import write_world

    manifest = write_world(tmp_path / "world")
    settings = ["--recipe", "tiny", "--device", "cpu", "--set", "train.grad_accum=2", "--set", "train.lr=1e-3",
                "--set", "train.checkpoint_every=2", "--set", "train.warmup_steps=0"]

    def train(out: Path, steps: int, processes: int, *resume: str):
        args = [*settings, "--set", f"train.batch_size={4 // processes}", "train", "aligner", "--data", manifest,
                "--out", out, "--steps", steps, *resume]
        if processes == 1:
            result = in_process(*args)
            assert result.exit_code == 0, result.output
        else:
            result = torchrun("-m", "plvmctl", *args, cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            assert result.stdout.count(str(out / "aligner")) == 1  # rank 0 reports

    train(tmp_path / "one", 4, 1)
    train(tmp_path / "two", 4, 2)
    expected = losses(tmp_path / "one")
    assert len(expected) == 4 and expected[-1] != expected[0]
    assert losses(tmp_path / "two") == pytest.approx(expected, rel=1e-5)
    written = sorted(p.relative_to(tmp_path / "one").as_posix() for p in (tmp_path / "one").rglob("*"))
    assert sorted(p.relative_to(tmp_path / "two").as_posix() for p in (tmp_path / "two").rglob("*")) == written

    train(tmp_path / "two-then-one", 2, 2)
    train(tmp_path / "two-then-one", 4, 1, "--resume")
    assert losses(tmp_path / "two-then-one") == pytest.approx(expected, rel=1e-5)
    train(tmp_path / "one-then-two", 2, 1)
    train(tmp_path / "one-then-two", 4, 2, "--resume")
    assert losses(tmp_path / "one-then-two") == pytest.approx(expected, rel=1e-5)


def test_eval_spreads_a_per_concept_methods_training_over_the_ranks(tmp_path):
    from plvmctl.concept import Concept
    from plvmctl.lab import toy

    root = toy.write_testset(tmp_path / "set", 3, seed=0, queries_per_identity=2, progress=False)
    settings = ["--recipe", "tiny", "--device", "cpu"] + [
        arg for key, value in (("embedding_steps", 2), ("recognition_per_photo", 1), ("qa_per_photo", 1),
                               ("qa_max_new_tokens", 3), ("negative_rows", 4), ("head_steps", 50))
        for arg in ("--set", f"myvlm.{key}={value}")]
    evaluate = ["eval", "--testset", root, "--method", "myvlm", "--limit", "4"]
    one = in_process(*settings, *evaluate, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = torchrun("-m", "plvmctl", *settings, *evaluate, "--out", tmp_path / "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two" / "items" / "myvlm.jsonl").read_bytes() == \
        (tmp_path / "one" / "items" / "myvlm.jsonl").read_bytes()
    made = {run: sorted((tmp_path / run / "cache" / "myvlm").glob("*.concept")) for run in ("one", "two")}
    assert [p.name for p in made["two"]] == [p.name for p in made["one"]] and len(made["one"]) == 3
    for mine, theirs in zip(made["one"], made["two"]):  # trained once, by one rank, the same
        a, b = Concept.load(mine), Concept.load(theirs)
        assert a.word.equal(b.word) and a.head.equal(b.head)
