"""Faults end in one line and lose nothing: every write point, made to fail in turn.

`Faults` makes the n-th write, file fsync, rename or folder fsync under a test's folder fail
with ENOSPC or EIO (by patching os.write, os.fsync and os.replace, the primitives every
fileio writer goes through). For each operation the suite first counts its write points, then
fails each in turn and checks: one-line PlvmError naming the path and the OS's reason, no
temporary file left, every file either byte-identical to before or (only when the fault hit
the folder fsync after the rename) complete, the store still loads, and the same operation
succeeds once the fault is gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from plvmctl import image_index
from plvmctl.cli import main
from plvmctl.store import ConceptStore
from plvmctl.concept_index import StoreIndex, open_store_index
from plvmctl.errors import PlvmError, WriteError
from plvmctl.locks import hold
from plvmctl.train.common import capture_rng_state, find_checkpoint, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = ("write", "fsync", "replace", "dirsync")
CODES = (errno.ENOSPC, errno.EIO)


class Faults:
    """Counts the write points under `root` and fails the `fail_at`-th one of `kind`."""

    def __init__(self, monkeypatch, root: Path, kind: str | None = None, fail_at: int = 0,
                 code: int = errno.ENOSPC):
        self.root, self.kind, self.fail_at, self.code = str(root), kind, fail_at, code
        self.counts = dict.fromkeys(KINDS, 0)
        real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

        def fd_path(fd: int) -> str:
            return os.readlink(f"/proc/self/fd/{fd}")

        def point(kind: str, path: str) -> None:
            if not path.startswith(self.root):
                return
            self.counts[kind] += 1
            if kind == self.kind and self.counts[kind] == self.fail_at:
                raise OSError(self.code, os.strerror(self.code))

        def write(fd, data):
            point("write", fd_path(fd))
            return real_write(fd, data)

        def fsync(fd):
            path = fd_path(fd)
            point("dirsync" if os.path.isdir(path) else "fsync", path)
            return real_fsync(fd)

        def replace(src, dst, **kwargs):
            point("replace", str(src))
            return real_replace(src, dst, **kwargs)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def temporary_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def walk(monkeypatch, folder: Path, prepare, operation, loads, raises: bool = True,
         renamed=lambda kind, fail_at: kind == "dirsync") -> int:
    """Fail every write point of `operation` in turn (see the module docstring); returns how
    many faults were injected. `prepare(folder)` makes the state before; `loads(folder)`
    checks that what is there can be used; `raises=False` for operations that only warn;
    `renamed(kind, fail_at)`: the fault comes after a rename, so a file may be new."""
    shutil.rmtree(folder, ignore_errors=True)
    prepare(folder)
    with monkeypatch.context() as patch:
        counter = Faults(patch, folder)
        operation(folder)
    assert any(counter.counts.values())
    injected = 0
    for kind in KINDS:
        for fail_at in range(1, counter.counts[kind] + 1):
            for code in CODES:
                shutil.rmtree(folder, ignore_errors=True)
                prepare(folder)
                before = snapshot(folder)
                with monkeypatch.context() as patch:
                    Faults(patch, folder, kind, fail_at, code)
                    try:
                        operation(folder)
                    except PlvmError as error:
                        message = str(error)
                        assert "\n" not in message and os.strerror(code) in message, message
                        assert str(folder) in message, message
                    else:
                        assert not raises, f"no error with {kind} #{fail_at} failing"
                injected += 1
                where = f"{kind} #{fail_at} ({os.strerror(code)})"
                assert temporary_files(folder) == [], where
                after = snapshot(folder)
                if not renamed(kind, fail_at):  # before the rename: nothing may change ...
                    for name, data in after.items():
                        if name in before and not name.endswith(".jsonl"):
                            assert data == before[name], f"{name} changed after {where}"
                loads(folder)  # ... and whatever is there is usable
                operation(folder)  # the fault is gone: the same operation succeeds
                assert temporary_files(folder) == [], where
                loads(folder)
    return injected


# -- the concept store: encode, rm, reindex, the key index -----------------------------------


@pytest.fixture(scope="module")
def concepts(runtime, photos):
    return {name: runtime.encode_concept(name, photos[f"plain{i}.png"])
            for i, name in enumerate(("avril", "bo", "cy"))}


def _store_with_index(concepts):
    def prepare(folder: Path) -> None:
        store = ConceptStore(folder)
        for name in ("avril", "bo"):
            store.save(concepts[name])
        StoreIndex(store).build()
    return prepare


def _store_loads(runtime):
    def loads(folder: Path) -> None:
        store = ConceptStore(folder)
        for name in store.names():
            store.load(name)
        index = open_store_index(store, runtime.encoder_fingerprint)
        assert index.count == len(store.names())
    return loads


def test_encode_survives_a_fault_at_every_write(monkeypatch, tmp_path, runtime, concepts):
    """The concept file is written first (a fault there is the command's error); the key
    index after it (a fault there only leaves the index stale, and it is rebuilt on use)."""
    def encode(folder: Path) -> None:
        ConceptStore(folder).save(concepts["cy"], force=True)

    assert walk(monkeypatch, tmp_path / "store", _store_with_index(concepts), encode,
                _store_loads(runtime), raises=False) >= 16


def test_a_full_disk_during_encode_is_the_error_of_the_command(monkeypatch, tmp_path, concepts):
    store = ConceptStore(tmp_path / "store")
    store.save(concepts["avril"])
    before = snapshot(store.root)
    with monkeypatch.context() as patch:
        Faults(patch, store.root, "write", 1, errno.ENOSPC)
        with pytest.raises(WriteError, match=r"cannot write .*avril.concept: No space left on device$"):
            store.save(concepts["avril"], force=True)
    assert snapshot(store.root) == before


def test_rm_and_reindex_survive_a_fault_at_every_write(monkeypatch, tmp_path, runtime, concepts):
    def remove(folder: Path) -> None:
        store = ConceptStore(folder)
        if "bo" in store:
            store.remove("bo")

    walk(monkeypatch, tmp_path / "rm", _store_with_index(concepts), remove,
         _store_loads(runtime), raises=False)

    def reindex(folder: Path) -> None:
        StoreIndex(ConceptStore(folder)).build(runtime.encoder_fingerprint)

    assert walk(monkeypatch, tmp_path / "reindex", _store_with_index(concepts), reindex,
                _store_loads(runtime)) >= 8


# -- training checkpoints ------------------------------------------------------------------


def test_a_training_checkpoint_survives_a_fault_at_every_write(monkeypatch, tmp_path):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def save_module(module, folder: Path) -> None:
        from safetensors.torch import save

        from plvmctl.fileio import write_bytes_atomic
        write_bytes_atomic(folder / "model.safetensors", save(dict(module.state_dict())))

    def checkpoint(step: int):
        def write(folder: Path) -> None:
            save_checkpoint(folder, module=module, optimizer=optimizer, scheduler=scheduler,
                            rng=capture_rng_state(), state={"step": step}, save_module=save_module)
        return write

    def loads(folder: Path) -> None:
        found = find_checkpoint(folder)
        assert found is not None
        state, _ = load_checkpoint(found)
        assert state["step"] in (1, 2)

    assert walk(monkeypatch, tmp_path / "run", checkpoint(1), checkpoint(2), loads) >= 16


# -- FAISS image indexes -------------------------------------------------------------------


def test_index_build_survives_a_fault_at_every_write(monkeypatch, tmp_path):
    rng = np.random.default_rng(0)
    vectors = {}
    for name, count in (("first", 30), ("second", 60)):
        data = rng.standard_normal((count, 8)).astype(np.float32)
        vectors[name] = tmp_path / f"{name}.npy"
        np.save(vectors[name], data / np.linalg.norm(data, axis=1, keepdims=True))

    def prepare(folder: Path) -> None:
        image_index.build_index(vectors["first"], folder / "i.index", progress=False)

    def rebuild(folder: Path) -> None:
        image_index.build_index(vectors["second"], folder / "i.index", progress=False)

    def loads(folder: Path) -> None:
        try:
            assert image_index.open_index(folder / "i.index").info.count in (30, 60)
        except PlvmError as error:  # the new index beside the old sidecar: refused, not used
            assert "and its sidecar" in str(error)

    def renamed(kind: str, fail_at: int) -> bool:  # the index is renamed first, the sidecar last
        return kind == "dirsync" or (kind, fail_at) in {("fsync", 2), ("replace", 2)}

    assert walk(monkeypatch, tmp_path / "out", prepare, rebuild, loads, renamed=renamed) >= 16


# -- the command line: one line, -v for the traceback -----------------------------------------


def test_a_full_disk_and_a_store_below_a_file_are_one_line(monkeypatch, tmp_path, photos):
    runner = CliRunner()
    photo = str(photos["plain0.png"])
    (tmp_path / "file").write_text("a regular file")
    result = runner.invoke(main, ["--recipe", "tiny", "--store", str(tmp_path / "file" / "store"),
                                  "encode", photo, "--name", "a"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"error: cannot write {tmp_path / 'file' / 'store' / 'a.concept'}: Not a directory"]

    store = tmp_path / "store"
    with monkeypatch.context() as patch:
        Faults(patch, store, "write", 1, errno.ENOSPC)
        quiet = runner.invoke(main, ["--recipe", "tiny", "--store", str(store), "encode", photo,
                                     "--name", "a"])
        Faults(patch, store, "write", 1, errno.ENOSPC)
        loud = runner.invoke(main, ["--recipe", "tiny", "-v", "--store", str(store), "encode",
                                    photo, "--name", "a"])
    assert quiet.exit_code == 1 and loud.exit_code == 1
    assert quiet.output.strip().splitlines() == [
        f"error: cannot write {store / 'a.concept'}: No space left on device"]
    assert "Traceback" in loud.output and loud.output.strip().endswith("No space left on device")
    assert list(store.iterdir()) == []


# -- locks ---------------------------------------------------------------------------------

HOLD = """
import sys, time
from plvmctl.locks import hold
with hold(sys.argv[1], "it"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_ones_lock_is_taken(tmp_path):
    lock = tmp_path / "out" / ".lock"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PlvmError, match=rf"the run is in use by process {holder.pid} "):
            with hold(lock, "the run"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock.read_text().strip() == str(holder.pid)  # what a SIGKILL leaves behind
    with hold(lock, "the run"):
        assert lock.read_text().strip() == str(os.getpid())



def test_an_index_build_that_cannot_fit_says_so_before_building(monkeypatch, tmp_path):
    data = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", data)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    with pytest.raises(PlvmError, match=r"not enough free space for an index of 50 vectors .* 100 B free"):
        image_index.build_index(tmp_path / "v.npy", tmp_path / "i.index", progress=False)
    assert not (tmp_path / "i.index").exists()


def test_a_full_disk_while_logging_eval_items_names_the_log_and_keeps_the_lines(monkeypatch, tmp_path):
    from plvmctl.evaluate import ItemLog

    path = tmp_path / "items" / "m.jsonl"
    log = ItemLog(path)
    log.append([{"key": "a", "mode": "yes", "answer": "yes"}])
    log.close()
    before = path.read_bytes()

    log = ItemLog(path)
    with monkeypatch.context() as patch:
        Faults(patch, tmp_path, "write", 1)  # the disk is full at the log's next write
        with pytest.raises(WriteError, match=rf"cannot write {path}: No space left on device$"):
            log.append([{"key": "b", "mode": "yes", "answer": "no"}])
    log.close()
    assert path.read_bytes() == before  # nothing reached the file
    assert ItemLog(path).done("a", "yes") and not ItemLog(path).done("b", "yes")


def test_a_killed_writers_temporaries_are_swept_by_the_next_write_and_a_live_ones_kept(tmp_path):
    from plvmctl.fileio import atomic_folder, write_text_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        target = tmp_path / "a.concept"
        target.write_text("old")
        stale = tmp_path / f".a.concept.{dead.pid}.x1y2.tmp"
        working = tmp_path / f".a.concept.{alive.pid}.z3w4.tmp"
        other = tmp_path / f".b.concept.{dead.pid}.q5r6.tmp"  # another target's: not this write's business
        for path in (stale, working, other):
            path.write_text("half")
        stale_folder = tmp_path / f".run.{dead.pid}.k7m8.tmp"
        stale_folder.mkdir()

        write_text_atomic(target, "new")
        with atomic_folder(tmp_path / "run") as folder:
            (folder / "x").write_text("done")

        assert target.read_text() == "new"
        assert not stale.exists() and not stale_folder.exists()
        assert working.read_text() == "half" and other.read_text() == "half"
        assert (tmp_path / "run" / "x").read_text() == "done"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == sorted(
            [working.name, other.name])
    finally:
        alive.kill()
        alive.wait()


def test_an_evaluation_survives_a_fault_at_every_write(monkeypatch, tmp_path):
    """`eval` into a folder that holds an earlier run: every write of its item logs and its
    report fails in turn; what was logged stays usable, and the next run finishes the job."""
    from test_evaluate import FakeApi, FakeRuntime, make_testset

    from plvmctl.evaluate import ItemLog, run_evaluation

    root = make_testset(tmp_path / "set")

    def evaluate(methods):
        return lambda folder: run_evaluation(FakeRuntime(), root, methods, folder, progress=False,
                                             engine_api=FakeApi())

    def loads(folder: Path) -> None:
        for log in (folder / "items").glob("*.jsonl"):
            ItemLog(log).close()  # every whole line parses; a torn last one is skipped
        for report in (folder / "results.json", folder / "items" / "run.json"):
            if report.exists():
                json.loads(report.read_text())

    injected = walk(monkeypatch, tmp_path / "out", evaluate(["plvm"]), evaluate(["plvm", "llava-none"]), loads,
                    renamed=lambda kind, fail_at: True)  # several files: each is old or whole, and loads
    assert injected >= 8
    done = run_evaluation(FakeRuntime(), root, ["plvm", "llava-none"], tmp_path / "out", progress=False,
                          engine_api=FakeApi())
    assert all(method["asked_this_run"] == 0 for method in done["methods"].values())
