"""Disk space is checked before big writes: an evaluation report and a pocket build that
clearly cannot fit are refused in one line before any model loads or any step trains."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from click.testing import CliRunner

from plvmctl.cli.evaluate import eval_command, report_bytes
from plvmctl.errors import PlvmError
from plvmctl.evaluate import load_testset
from plvmctl.lab.pocket import build_pocket

from test_evaluate import FakeApp, FakeRuntime, make_testset

Usage = namedtuple("Usage", "total used free")


@pytest.fixture()
def free_bytes(monkeypatch):
    """Make every disk report `free_bytes.value` bytes free."""
    class Free:
        value = 0

    monkeypatch.setattr("plvmctl.fileio.shutil.disk_usage",
                        lambda path: Usage(1 << 40, 1 << 40, Free.value))
    return Free


def test_report_size_counts_every_pair_and_question_per_method(tmp_path):
    testset = load_testset(make_testset(tmp_path / "set"))
    # 3 query photos x 3 identities, 4 visual and 2 text questions: 15 items a method
    assert report_bytes(testset, 2, None) == (1 << 20) + 2 * 15 * 1024
    assert report_bytes(testset, 1, 2) == (1 << 20) + (2 + 2 + 2) * 1024


def test_an_eval_that_cannot_fit_is_refused_before_any_model_loads(tmp_path, free_bytes):
    class Unloadable(FakeRuntime):
        def encode_concept(self, name, reference):
            raise AssertionError("the model was used before the free space was checked")

    root = make_testset(tmp_path / "set")
    out = tmp_path / "out"
    free_bytes.value = 100 * 1024
    result = CliRunner().invoke(eval_command, ["--testset", str(root), "--method", "plvm",
                                               "--out", str(out)], obj=FakeApp(Unloadable("fake")))
    assert isinstance(result.exception, PlvmError)
    assert str(result.exception) == (f"not enough free space for the evaluation report in {out}: "
                                     f"about 1 MB needed, 100 KB free")
    assert not out.exists()


def test_a_pocket_build_that_cannot_fit_is_refused_before_training(tmp_path, free_bytes):
    free_bytes.value = 1024 * 1024  # far less than the ~10 MB committed pocket
    with pytest.raises(PlvmError, match=r"^not enough free space for the pocket checkpoint in "):
        build_pocket(tmp_path / "pocket", "smoke", work_dir=tmp_path / "work", echo=None)
    assert not (tmp_path / "work").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging folder either
