"""Resume only what is the same: an evaluation folder answers again exactly what another
Aligner, other generation settings, another --mcq or another method setting would answer
differently, and asks nothing when nothing changed (the tiny recipe, real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from plvmctl.aligner import save_aligner
from plvmctl.evaluate import run_evaluation
from plvmctl.recipe import load_recipe
from plvmctl.runtime import load_runtime
from test_evaluate import make_testset

TASK_METRICS = ("recognition", "text_qa", "visual_qa")


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def _evaluate(testset, out, overrides=(), methods=("plvm", "llava-none"), mcq="generate"):
    runtime = load_runtime(load_recipe("tiny", ["generation.max_new_tokens=3", *overrides]), device="cpu")
    lines: list[str] = []
    results = run_evaluation(runtime, testset, list(methods), out, mcq=mcq, progress=False, echo=lines.append)
    return results, lines


def _answers(out: Path, method: str) -> dict[tuple[str, str], object]:
    records = [json.loads(line) for line in (out / "items" / f"{method}.jsonl").read_text().splitlines()]
    return {(r["key"], r["mode"]): r.get("answer", r.get("scores")) for r in records}


def _same_as_a_fresh_run(results, fresh, out, fresh_out, methods):
    for name in methods:
        assert _answers(out, name) == _answers(fresh_out, name), name
        for metric in TASK_METRICS:
            assert results["methods"][name][metric] == fresh["methods"][name][metric], (name, metric)


@pytest.fixture()
def testset(tmp_path):
    """make_testset's layout, each photo its own random pixels (so retrieval can tell them apart)."""
    root = make_testset(tmp_path / "set")
    generator = torch.Generator().manual_seed(0)
    for index, photo in enumerate(sorted((root / "validation_recognition").rglob("*_img*"))):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(photo)
    return root


def test_nothing_changed_asks_nothing(testset, tmp_path):
    first, _ = _evaluate(testset, tmp_path / "out")
    # neither the batch size nor how much of an answer `ask` prints decides an answer
    again, lines = _evaluate(testset, tmp_path / "out", ["generation.batch_size=1", "model.reasoning=comparison"])
    assert lines == []
    assert [again["methods"][m]["asked_this_run"] for m in ("plvm", "llava-none")] == [0, 0]
    assert first["methods"]["plvm"]["asked_this_run"] == len(_answers(tmp_path / "out", "plvm")) > 0
    for name in ("plvm", "llava-none"):
        for metric in TASK_METRICS:
            assert again["methods"][name][metric] == first["methods"][name][metric]


def test_another_aligner_at_the_same_path_is_asked_again(testset, tmp_path):
    runtime = load_runtime(load_recipe("tiny"), device="cpu")
    folder = tmp_path / "aligner"
    save_aligner(runtime.aligner, folder)
    _evaluate(testset, tmp_path / "out", [f"aligner.path={folder}"], methods=("plvm",))
    before = _answers(tmp_path / "out", "plvm")
    with torch.no_grad():  # the same folder, other weights: only its digest can tell
        for parameter in runtime.aligner.parameters():
            parameter.mul_(-3.0)
    save_aligner(runtime.aligner, folder)
    results, lines = _evaluate(testset, tmp_path / "out", [f"aligner.path={folder}"], methods=("plvm",))
    assert len(lines) == 1 and lines[0].startswith("plvm: asked afresh") and "weights.aligner" in lines[0]
    assert results["methods"]["plvm"]["asked_afresh_because"].startswith("weights.aligner")
    assert _answers(tmp_path / "out", "plvm") != before
    assert (tmp_path / "out" / "items" / "plvm.jsonl.previous").is_file()
    fresh, _ = _evaluate(testset, tmp_path / "fresh", [f"aligner.path={folder}"], methods=("plvm",))
    assert results["methods"]["plvm"]["asked_this_run"] == fresh["methods"]["plvm"]["asked_this_run"] > 0
    _same_as_a_fresh_run(results, fresh, tmp_path / "out", tmp_path / "fresh", ["plvm"])


def test_another_generation_setting_asks_every_method_again(testset, tmp_path):
    _evaluate(testset, tmp_path / "out")
    before = _answers(tmp_path / "out", "llava-none")
    results, lines = _evaluate(testset, tmp_path / "out", ["generation.max_new_tokens=1"])
    assert [line.split(":")[0] for line in lines] == ["plvm", "llava-none"]
    assert "recipe.generation.max_new_tokens: 3 -> 1" in lines[0]
    assert _answers(tmp_path / "out", "llava-none") != before
    fresh, _ = _evaluate(testset, tmp_path / "fresh", ["generation.max_new_tokens=1"])
    assert all(results["methods"][m]["asked_this_run"] == fresh["methods"][m]["asked_this_run"] > 0
               for m in ("plvm", "llava-none"))
    _same_as_a_fresh_run(results, fresh, tmp_path / "out", tmp_path / "fresh", ["plvm", "llava-none"])


def test_another_mcq_mode_asks_the_multiple_choice_again(testset, tmp_path):
    _evaluate(testset, tmp_path / "out", mcq="generate")
    results, lines = _evaluate(testset, tmp_path / "out", mcq="likelihood")
    # each answer is logged with its mode: the multiple-choice items are asked by likelihood,
    # the recognition answers (always generated) stay
    multiple_choice = sum(mode == "likelihood" for _, mode in _answers(tmp_path / "out", "plvm"))
    assert lines == [] and results["methods"]["plvm"]["asked_this_run"] == multiple_choice > 0
    fresh, _ = _evaluate(testset, tmp_path / "fresh", mcq="likelihood")
    for name in ("plvm", "llava-none"):
        for metric in TASK_METRICS:
            assert results["methods"][name][metric] == fresh["methods"][name][metric], (name, metric)
    assert results["methods"]["plvm"]["text_qa"]["unparseable"] == 0  # a likelihood always picks


def test_a_method_setting_asks_that_method_alone_again(testset, tmp_path):
    methods = ("plvm", "plvm-auto")
    _evaluate(testset, tmp_path / "out", ["retrieval.threshold=0.99"], methods=methods)
    before = _answers(tmp_path / "out", "plvm-auto")
    results, lines = _evaluate(testset, tmp_path / "out", ["retrieval.threshold=-1"], methods=methods)
    assert len(lines) == 1 and lines[0].startswith("plvm-auto: asked afresh")
    assert "recipe.retrieval.threshold: 0.99 -> -1" in lines[0]
    assert results["methods"]["plvm"]["asked_this_run"] == 0
    assert _answers(tmp_path / "out", "plvm-auto") != before
    fresh, _ = _evaluate(testset, tmp_path / "fresh", ["retrieval.threshold=-1"], methods=methods)
    assert results["methods"]["plvm-auto"]["asked_this_run"] == fresh["methods"]["plvm-auto"]["asked_this_run"] > 0
    _same_as_a_fresh_run(results, fresh, tmp_path / "out", tmp_path / "fresh", ["plvm-auto"])


def test_plvm_auto_counts_its_retrieval_only_noes_and_searches_other_people(testset, tmp_path):
    (testset / "negatives").mkdir()
    for index in range(3):
        Image.new("RGB", (16, 16), (60 * index, 20, 90)).save(testset / "negatives" / f"other{index}.png")
    results, _ = _evaluate(testset, tmp_path / "out", ["retrieval.threshold=0.99", "retrieval.verify=0"],
                           methods=("plvm-auto",))
    auto = results["methods"]["plvm-auto"]
    records = [json.loads(line) for line in (tmp_path / "out" / "items" / "plvm-auto.jsonl").read_text().splitlines()]
    by_retrieval = [r for r in records if r.get("decided_by") == "retrieval"]
    assert by_retrieval and all(r["answer"] == "No." and r["task"] == "recognition" for r in by_retrieval)
    decided = auto["recognition"]["decided_by_retrieval"]
    assert decided["answers"] == decided["no"] == len(by_retrieval)
    assert decided["correct"] == sum(r["expected"] == "no" for r in by_retrieval)
    assert auto["details"]["distractors"] == 3
    assert "3 people who are not in the test set" in auto["details"]["note"]
    assert "decided by retrieval alone" in (tmp_path / "out" / "results.md").read_text()


def test_a_digest_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch):
    from plvmctl.fingerprint import weights_digest

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))  # below a regular file: unwritable
    first = weights_digest(weights)
    weights.write_bytes(b"other weights")
    assert weights_digest(weights) != first


def test_how_an_answer_is_read_decides_whom_plvm_auto_finds():
    from plvmctl.fingerprint import answer_fingerprint

    plain, comparing = load_recipe("tiny"), load_recipe("tiny", ["model.reasoning=comparison"])
    weights = {"model": None, "encoder": None, "aligner": None}
    assert answer_fingerprint(plain, "plvm", weights) == answer_fingerprint(comparing, "plvm", weights)
    assert answer_fingerprint(plain, "plvm-auto", weights) != answer_fingerprint(comparing, "plvm-auto", weights)
