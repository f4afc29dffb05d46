"""Concurrent `encode`s into one store keep working: several processes save concepts into one
store at once, each save updating the store's key index; every concept is written, and the
index ends fresh and holding all of them (its updates take turns on STORE/.retrieval/.lock,
so none is lost)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from plvmctl.concept import ConceptStore
from plvmctl.concept_index import StoreIndex, open_store_index

WRITERS = 3
CONCEPTS_EACH = 4
ROOT = Path(__file__).resolve().parents[1]

SAVE = """
import sys
from plvmctl.concept import Concept, ConceptStore
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
