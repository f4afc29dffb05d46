"""The .concept format and the store: safetensors + metadata, atomic, checked on load."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from plvmctl.concept import Concept, ConceptMeta, validate_name
from plvmctl.errors import PlvmError
from plvmctl.store import ConceptStore


def _concept(name="avril", k=4, hidden=8, fingerprint="abc", seed=0):
    generator = torch.Generator().manual_seed(seed)
    meta = ConceptMeta(method="plvm", base_model=fingerprint, base_model_name="tiny",
                       aligner_id="random", reference_sha256="f" * 64)
    return Concept(name, torch.randn(hidden, generator=generator), torch.randn(hidden, generator=generator),
                   torch.randn(k, hidden, generator=generator), meta)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    concept = _concept()
    path = concept.save(tmp_path / "avril.concept")
    loaded = Concept.load(path)
    assert torch.equal(loaded.word, concept.word) and torch.equal(loaded.context, concept.context)
    assert loaded.meta.base_model == "abc" and loaded.meta.reference_sha256 == "f" * 64
    assert loaded.meta.created and loaded.meta.plvmctl_version
    assert loaded.num_context == 4


def test_file_is_plain_safetensors_with_string_metadata(tmp_path):
    path = _concept().save(tmp_path / "a.concept")
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_size])
    assert header["__metadata__"]["format"] == "plvmctl.concept"
    assert header["__metadata__"]["k"] == "4"
    assert set(header) - {"__metadata__"} == {"word", "head", "context"}


@pytest.mark.parametrize("name", ["a b", "<x>", "", "a/b", "x" * 65, "image", "é"])
def test_bad_names_are_refused(name):
    with pytest.raises(PlvmError):
        validate_name(name)


def test_store_refuses_to_overwrite_without_force(tmp_path):
    store = ConceptStore(tmp_path)
    store.save(_concept(seed=1))
    before = store.path_for("avril").read_bytes()
    with pytest.raises(PlvmError, match="already exists"):
        store.save(_concept(seed=2))
    assert store.path_for("avril").read_bytes() == before
    store.save(_concept(seed=2), force=True)
    assert store.path_for("avril").read_bytes() != before


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    store = ConceptStore(tmp_path)
    store.save(_concept(seed=1))
    before = store.path_for("avril").read_bytes()

    def broken(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("plvmctl.fileio.os.write", broken)
    with pytest.raises(PlvmError, match=r"cannot write .*avril.concept: No space left on device"):
        store.save(_concept(seed=2), force=True)
    assert store.path_for("avril").read_bytes() == before
    assert os.listdir(tmp_path) == ["avril.concept"]  # no temp file left behind


def test_store_list_load_remove(tmp_path):
    store = ConceptStore(tmp_path)
    for name in ("b", "a"):
        store.save(_concept(name))
    assert store.names() == ["a", "b"]
    with pytest.raises(PlvmError, match=r"unknown concept <zoe> .*known: <a>, <b>"):
        store.load("zoe")
    store.remove("a")
    assert store.names() == ["b"]


def test_corrupt_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.concept"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(PlvmError, match="not a valid .concept"):
        Concept.load(bad)
    foreign = tmp_path / "foreign.concept"
    save_file({"word": torch.zeros(2)}, str(foreign), metadata={"format": "other"})
    with pytest.raises(PlvmError, match="not a plvmctl concept"):
        Concept.load(foreign)
    newer = tmp_path / "newer.concept"
    save_file({"word": torch.zeros(2), "head": torch.zeros(2), "context": torch.zeros(1, 2)}, str(newer),
              metadata={"format": "plvmctl.concept", "format_version": "9"})
    with pytest.raises(PlvmError, match="format version '9'"):
        Concept.load(newer)


def test_concept_for_another_model_is_refused():
    concept = _concept(fingerprint="abc")
    concept.check_compatible("abc", 8)
    with pytest.raises(PlvmError, match="made for model tiny .*fingerprint abc"):
        concept.check_compatible("def", 8, "other-model")
    with pytest.raises(PlvmError, match="hidden size 8"):
        concept.check_compatible("abc", 16)
