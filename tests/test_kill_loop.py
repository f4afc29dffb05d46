"""A bounded kill loop: `encode`, `concepts reindex` and `eval` run as real processes and are
SIGKILLed at random moments of their work, round after round, into one store and one report
folder. After every kill: no file under a real name is half-written (every concept loads,
every JSON file parses, every item log holds whole lines but perhaps its last), and the same
command, run again, completes; after the reruns the store's key index is fresh and complete.

Slow (about 20 s a process on a busy machine). The seed and the kill moments are printed as
one JSON line per round, so a failing round can be replayed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from plvmctl.store import ConceptStore
from plvmctl.concept_index import StoreIndex, open_store_index

from test_evaluate import make_testset

pytestmark = pytest.mark.slow

ROUNDS = 3  # kills per command
SEED = 27
ROOT = Path(__file__).resolve().parents[1]


def plvmctl(*args) -> list[str]:
    return [sys.executable, "-m", "plvmctl", "--recipe", "tiny", *map(str, args)]


def start(command: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def run(command: list[str]) -> float:
    """Run `command` to its end; its wall time. It must succeed."""
    started = time.monotonic()
    process = start(command)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{out}\n{err}"
    return time.monotonic() - started


def kill_at(command: list[str], seconds: float) -> bool:
    """Start `command`, SIGKILL it after `seconds`; whether it was still running then."""
    process = start(command)
    try:
        process.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return True


def real_files(folder: Path) -> list[Path]:
    """Files under names a reader uses (temporary files are hidden: `.name.xxxx.tmp`)."""
    return [p for p in folder.rglob("*") if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def check_nothing_half_written(store: Path, out: Path) -> None:
    concepts = ConceptStore(store)
    for name in concepts.names():
        concepts.load(name)  # a PlvmError here is a half-written concept under its real name
    table = StoreIndex(concepts).table_path
    if table.exists():
        json.loads(table.read_text())
    for path in real_files(out):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            Image.open(path).verify()
        elif path.suffix == ".jsonl":
            lines = path.read_text().split("\n")
            for line in lines[:-2]:  # an append-only log: only its last line may be cut short
                json.loads(line)


def temporary_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_killed_writers_leave_every_file_whole_and_the_next_run_completes(tmp_path, photos, runtime):
    store, out = tmp_path / "store", tmp_path / "eval"
    testset = make_testset(tmp_path / "set")
    commands = {
        "encode": lambda turn: plvmctl("--store", store, "encode", photos[f"plain{turn % 2}.png"],
                                        "--name", f"c{turn % 3}", "--force"),
        "reindex": lambda turn: plvmctl("--store", store, "concepts", "reindex"),
        "eval": lambda turn: plvmctl("--store", store, "eval", "--testset", testset,
                                      "--method", "plvm", "--out", out),
    }
    # An uninterrupted first run of each: the state the kills start from, and how long each
    # takes (a kill lands at a random moment of the second half, where the writes are).
    durations = {name: run(make(0)) for name, make in commands.items()}
    rng = random.Random(SEED)
    landed = 0
    for turn in range(1, ROUNDS + 1):
        for name, make in commands.items():
            command = make(turn)
            moment = rng.uniform(0.5, 1.0) * durations[name]
            killed = kill_at(command, moment)
            landed += killed
            print(json.dumps({"round": turn, "command": name, "kill_after_s": round(moment, 2),
                              "killed": killed, "temporary_files": temporary_files(tmp_path)}))
            check_nothing_half_written(store, out)
            run(command)  # the fault is gone: the same command completes
            check_nothing_half_written(store, out)

    assert landed > 0, "no kill landed while a command ran: the loop tested nothing"
    concepts = ConceptStore(store)
    index = open_store_index(concepts, StoreIndex(concepts).table()["encoder"], rebuild=False)
    assert index.count == len(concepts.names()) == 3
    results = json.loads((out / "results.json").read_text())
    assert results["method_order"] == ["plvm"]
