"""Retrieval keys in .concept files and the store's index of them: written at encode time,
round-tripped, given to old files by reindex, kept in step on encode/rm, never trusted stale."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from helpers import copied_concept
from plvmctl.cli import main
from plvmctl.concept import Concept
from plvmctl.concept_index import (
    KEY_PART,
    KeyIndex,
    StoreIndex,
    choose_index_factory,
    concept_key,
    open_store_index,
    read_key,
)
from plvmctl.errors import PlvmError
from plvmctl.images import load_image
from plvmctl.store import ConceptStore


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread


def test_encode_writes_the_reference_cls_as_a_unit_key_and_it_round_trips(runtime, photos, tmp_path):
    concept = runtime.encode_concept("avril", photos["plain0.png"])
    key, encoder = concept_key(concept)
    cls = runtime.encoder.encode([load_image(photos["plain0.png"])])[0, 0]
    assert torch.allclose(key, torch.nn.functional.normalize(cls.float(), dim=0), atol=1e-6)
    assert encoder == runtime.encoder_fingerprint and len(encoder) == 16
    assert concept.meta.extra["reference_path"] == str(photos["plain0.png"].resolve())
    path = concept.save(tmp_path / "avril.concept")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "2" and KEY_PART in handle.keys()
    loaded = Concept.load(path)
    assert torch.equal(concept_key(loaded)[0], key) and concept_key(loaded)[1] == encoder
    read, made_by = read_key(path)
    assert np.allclose(read, key.numpy()) and made_by == encoder
    # batch encoding gives each concept its own photo's key
    a, b = runtime.encode_concepts([("a", photos["plain0.png"]), ("b", photos["plain1.png"])])
    assert torch.allclose(concept_key(a)[0], key, atol=1e-5)
    assert not torch.allclose(concept_key(b)[0], key, atol=1e-3)


def test_a_version_1_concept_still_loads_without_a_key(runtime, tmp_path):
    path = copied_concept(runtime.backbone, "old", 5).save(tmp_path / "old.concept")
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["format_version"] == "1"
    assert concept_key(Concept.load(path)) is None and read_key(path) is None


def test_the_index_is_exact_for_small_stores_and_ivf_for_large_ones():
    assert choose_index_factory(1000, 768) == "Flat"
    assert choose_index_factory(50_000, 64) == "Flat"
    assert choose_index_factory(100_000, 768).startswith("IVF") and choose_index_factory(100_000, 768).endswith(",Flat")
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(3000, 16)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    names = [f"c{i}" for i in range(3000)]
    for exact in (1 << 24, 1000):  # Flat, then IVF forced by a small limit
        index = KeyIndex.build(names, keys, "enc", exact_floats=exact)
        hits = index.search(keys[[5, 77]], 3)
        assert hits[0][0][0] == "c5" and hits[1][0][0] == "c77"
        assert hits[0][0][1] == pytest.approx(1.0, abs=1e-5)  # exact cosines, IVF included
    assert index.factory.startswith("IVF") and index.nprobe >= 16
    with pytest.raises(PlvmError, match="another reference encoder"):
        index.search(np.zeros((1, 8), np.float32), 1)


def _encode(runtime, store: ConceptStore, name: str, photo) -> None:
    store.save(runtime.encode_concept(name, photo), force=True)


def test_the_store_index_follows_encode_and_rm_and_is_rebuilt_when_stale(runtime, photos, tmp_path):
    store = ConceptStore(tmp_path / "store")
    _encode(runtime, store, "a", photos["plain0.png"])
    _encode(runtime, store, "b", photos["plain1.png"])
    store.save(copied_concept(runtime.backbone, "nokey", 5))
    files = StoreIndex(store)
    assert files.table() is None  # no index until one is wanted
    said = []
    index = open_store_index(store, runtime.encoder_fingerprint, say=said.append)
    assert said and "rebuilt" in said[0] and "1 without a usable key" in said[0]
    assert sorted(index.names.values()) == ["a", "b"] and files.status().fresh
    table = files.table()
    assert table["concepts"]["nokey"] == {**table["concepts"]["nokey"], "id": None, "note": "no retrieval key"}
    first_file = table["file"]

    # encode and rm update it in place: still fresh, no rebuild
    _encode(runtime, store, "c", photos["plain2.png"])
    assert files.status().fresh and "c" in files.load().names.values()
    assert not (files.folder / first_file).exists()  # the old generation is gone
    store.remove("a")
    assert files.status().fresh and sorted(files.load().names.values()) == ["b", "c"]
    _encode(runtime, store, "b", photos["plain3.png"])  # replaced: its old row goes
    loaded = files.load()
    assert sorted(loaded.names.values()) == ["b", "c"] and loaded.count == 2
    key_b = read_key(store.path_for("b"))[0]
    assert loaded.search(key_b[None], 1)[0][0] == ("b", pytest.approx(1.0, abs=1e-5))
    said.clear()
    open_store_index(store, runtime.encoder_fingerprint, say=said.append)
    assert said == []  # fresh: used as it is

    # a change behind the index's back (a file copied in, one touched) makes it stale
    runtime.encode_concept("d", photos["plain0.png"]).save(store.path_for("d"))
    status = files.status()
    assert not status.fresh and "<d> is not in the index" in status.reason
    with pytest.raises(PlvmError, match="stale.*<d> is not in the index.*reindex"):
        open_store_index(store, runtime.encoder_fingerprint, rebuild=False)
    index = open_store_index(store, runtime.encoder_fingerprint, say=said.append)
    assert "d" in index.names.values() and files.status().fresh
    stat = store.path_for("c").stat()
    os.utime(store.path_for("c"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert "<c> changed" in files.status().reason
    # a damaged index.json is no index
    files.table_path.write_text("{not json")
    assert files.table() is None and not files.status().fresh
    assert sorted(open_store_index(store, runtime.encoder_fingerprint).names.values()) == ["b", "c", "d"]
    # keys of another encoder are never mixed in
    with pytest.raises(PlvmError, match="no concept .* has a retrieval key of this reference encoder"):
        open_store_index(store, "another-encoder", say=said.append)
    assert "another reference encoder" in said[-1]
    assert StoreIndex(store).table()["concepts"]["b"]["id"] is None


def test_an_index_of_keyless_concepts_takes_the_first_key_encoded(runtime, photos, tmp_path):
    store = ConceptStore(tmp_path / "store")
    store.save(copied_concept(runtime.backbone, "nokey", 5))
    with pytest.raises(PlvmError, match="no concept"):
        open_store_index(store, runtime.encoder_fingerprint)
    _encode(runtime, store, "a", photos["plain0.png"])
    assert StoreIndex(store).status().fresh
    assert list(open_store_index(store, runtime.encoder_fingerprint).names.values()) == ["a"]


def test_reindex_gives_old_concepts_keys_from_their_photos_or_reports_them(runtime, photos, tmp_path):
    store = tmp_path / "store"
    concepts = ConceptStore(store)
    old = copied_concept(runtime.backbone, "old", 5)  # version 1, no key, photo unknown ...
    old.meta.reference_sha256 = __import__("hashlib").sha256(photos["plain2.png"].read_bytes()).hexdigest()
    old.save(concepts.path_for("old"))
    orphan = copied_concept(runtime.backbone, "orphan", 5)
    orphan.save(concepts.path_for("orphan"))
    runner = CliRunner()
    common = ["--recipe", "tiny", "--device", "cpu", "--store", str(store)]
    assert runner.invoke(main, common + ["encode", str(photos["plain0.png"]), "--name", "new"]).exit_code == 0
    result = runner.invoke(main, common + ["concepts", "reindex", "--photos", str(photos["plain2.png"].parent)])
    assert result.exit_code == 0, result.output
    assert "<old>: key from" in result.output and "plain2.png" in result.output
    assert "<orphan>: no key" in result.output
    assert "2 concepts indexed" in result.output
    key, encoder = concept_key(Concept.load(concepts.path_for("old")))
    cls = runtime.encoder.encode([load_image(photos["plain2.png"])])[0, 0]
    assert torch.allclose(key, torch.nn.functional.normalize(cls.float(), dim=0), atol=1e-5)
    assert encoder == runtime.encoder_fingerprint
    assert StoreIndex(concepts).status().fresh
    table = json.loads((store / ".retrieval" / "index.json").read_text())
    assert table["concepts"]["orphan"]["id"] is None and table["concepts"]["old"]["id"] is not None
    # a concept that lost its key gets it back from its recorded reference path
    new = Concept.load(concepts.path_for("new"))
    del new.parts[KEY_PART]
    new.save(concepts.path_for("new"))
    result = runner.invoke(main, common + ["concepts", "reindex"])
    assert result.exit_code == 0, result.output
    assert "<new>: key from" in result.output and "plain0.png" in result.output
    assert concept_key(Concept.load(concepts.path_for("new"))) is not None
    gone = runner.invoke(main, common + ["concepts", "rm", "new"])
    assert gone.exit_code == 0 and StoreIndex(concepts).status().fresh
    assert "new" not in StoreIndex(concepts).load().names.values()
