"""The server's concept cache: a concept is read once, and again whenever its file changes."""

from __future__ import annotations

import pytest
import torch

from helpers import copied_concept
from plvmctl.errors import PlvmError
from plvmctl.serve.concepts import ConceptCache
from plvmctl.store import ConceptStore


def test_a_replaced_or_removed_file_is_read_again(runtime, tmp_path):
    store = ConceptStore(tmp_path)
    store.save(copied_concept(runtime.backbone, "pal", token_id=5))
    cache = ConceptCache(runtime)
    first = cache.load(store, "pal")
    assert cache.load(store, "pal") is first  # kept
    store.save(copied_concept(runtime.backbone, "pal", token_id=9), force=True)  # as another server would
    second = cache.load(store, "pal")
    assert not torch.equal(second.word, first.word)
    store.remove("pal")
    with pytest.raises(PlvmError, match="unknown concept <pal>"):
        cache.load(store, "pal")
