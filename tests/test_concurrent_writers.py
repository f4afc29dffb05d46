"""Two processes writing one thing. Concurrent `encode`s into one store keep working: several
processes save concepts into one store at once, each save updating the store's key index;
every concept is written, and the index ends fresh and holding all of them (its updates take
turns on STORE/.retrieval/.lock, so none is lost). Two runs into one run folder, or two builds
of one index, are refused instead: the second names the holder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from plvmctl.cli import main
from plvmctl.store import ConceptStore
from plvmctl.concept_index import StoreIndex, open_store_index
from plvmctl.locks import LOCK_FILE, hold

from test_evaluate import make_testset

WRITERS = 3
CONCEPTS_EACH = 4
ROOT = Path(__file__).resolve().parents[1]

SAVE = """
import sys
from plvmctl.concept import Concept
from plvmctl.store import ConceptStore
store = ConceptStore(sys.argv[1])
concepts = [Concept.load(path) for path in sys.argv[2:]]
print("ready", flush=True)
sys.stdin.readline()  # all writers start saving together
for concept in concepts:
    store.save(concept)
"""


def test_concurrent_encodes_into_one_store_keep_every_concept_and_the_index(tmp_path, runtime, photos):
    concept = runtime.encode_concept("seed", photos["plain0.png"])
    store = ConceptStore(tmp_path / "store")
    store.save(concept)
    StoreIndex(store).build(runtime.encoder_fingerprint)  # an index each save must update

    batches = []
    for writer in range(WRITERS):
        paths = []
        for number in range(CONCEPTS_EACH):
            concept.name = f"w{writer}n{number}"
            paths.append(concept.save(tmp_path / "source" / f"{concept.name}.concept"))
        batches.append(paths)

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", SAVE, str(store.root), *map(str, paths)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
               for paths in batches]
    for process in writers:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    for process in writers:
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in writers:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err

    names = sorted(store.names())
    assert len(names) == 1 + WRITERS * CONCEPTS_EACH
    for name in names:
        store.load(name)
    status = StoreIndex(store).status()
    assert status.fresh, status.reason  # no update of the index was lost
    index = open_store_index(store, runtime.encoder_fingerprint, rebuild=False)
    assert index.count == len(names)


def _photo_folder(folder: Path, photos, count: int = 4) -> Path:
    folder.mkdir(parents=True)
    for number in range(count):
        shutil.copy(photos[f"plain{number % 2}.png"], folder / f"p{number}.png")
    return folder


@pytest.mark.parametrize("command", ["train aligner", "train yollava", "train myvlm",
                                     "train mcllava", "eval", "index build"])
def test_a_second_writer_of_one_run_folder_or_index_is_refused_naming_the_holder(
        command, tmp_path, photos):
    """Two runs into one --out (or two builds of one index) would interleave their files: the
    second refuses in one line naming the process that holds the folder, before any work."""
    positives = _photo_folder(tmp_path / "avril", photos)
    negatives = _photo_folder(tmp_path / "negatives", photos)
    out = tmp_path / "run"
    vectors = tmp_path / "vectors.npy"
    np.save(vectors, np.eye(4, dtype=np.float32))
    args = {
        "train aligner": ["train", "aligner", "--out", out, "--steps", "1"],
        "train yollava": ["train", "yollava", positives, "--name", "avril", "--negatives", negatives,
                          "--out", out],
        "train myvlm": ["train", "myvlm", positives, "--name", "avril", "--negatives", negatives,
                        "--out", out],
        "train mcllava": ["train", "mcllava", "--concept", f"avril={positives}", "--concept",
                          f"bo={negatives}", "--out", out],
        "eval": ["eval", "--testset", make_testset(tmp_path / "set"), "--out", out],
        "index build": ["index", "build", vectors, "--out", out / "i.index"],
    }[command]
    lock = out / "i.index.lock" if command == "index build" else out / LOCK_FILE
    with hold(lock, "held by this test"):
        result = CliRunner().invoke(main, ["--recipe", "tiny", "--store", str(tmp_path / "store"),
                                           *map(str, args)])
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and f"is in use by process {os.getpid()} " in error, error
    assert sorted(p.name for p in out.iterdir()) == [lock.name]  # nothing else was written
