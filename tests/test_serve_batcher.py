"""The batcher on its own, with a recording engine: how requests are gathered and grouped."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from plvmctl.engine import AskRequest, AskResult
from plvmctl.recipe import Recipe
from plvmctl.serve.batcher import AskJob, Batcher, group_jobs
from plvmctl.serve.chat import Decoding
from plvmctl.serve.settings import ServeSettings

GREEDY = Decoding(max_tokens=8)


class Recorder:
    """An engine factory whose engines answer each question with itself and record each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, runtime, concepts, generation=None):
        recorder = self

        class Engine:
            def ask(self, requests, batch_size=None, max_new_tokens=None):
                recorder.calls.append(([r.question for r in requests], dict(concepts), generation, max_new_tokens))
                return [AskResult(r, answer=r.question, prompt_tokens=1, completion_tokens=1) for r in requests]

        return Engine()


class FakeRuntime:
    recipe = Recipe()


def job(question, owner="alice", concepts=(), decoding=GREEDY):
    return AskJob(owner, AskRequest(question), {name: f"{owner}:{name}" for name in concepts}, decoding)


def test_groups_split_by_decoding_and_by_owners_of_a_name():
    jobs = [job("a", "alice", ["pet"]), job("b", "bob", ["pet"]), job("c", "alice", ["pet", "cat"]),
            job("d", "bob", ["dog"]), job("e", "alice", decoding=Decoding(max_tokens=3)),
            job("f", decoding=Decoding(8, temperature=1.0, seed=3)),
            job("g", decoding=Decoding(8, temperature=1.0, seed=3))]
    groups = [[j.request.question for j in g.jobs] for g in group_jobs(jobs)]
    # alice's and bob's <pet> never meet; a seeded sampled request is alone
    assert groups == [["a", "c", "d"], ["b"], ["e"], ["f"], ["g"]]


def run_with_blocker(settings, submit):
    """Start a batcher whose model thread is busy until the jobs of `submit` are queued."""
    recorder = Recorder()
    batcher = Batcher(FakeRuntime(), settings, engine_factory=recorder)
    release = threading.Event()
    blocker = batcher.call(release.wait)
    batcher.start()
    futures = submit(batcher)
    release.set()
    blocker.result(10)
    batcher.stop(10)
    return recorder, batcher, futures


def test_waiting_requests_are_answered_in_batches_of_at_most_max_batch():
    recorder, batcher, futures = run_with_blocker(
        ServeSettings(max_batch=4, max_wait_ms=0),
        lambda b: [b.submit(job(f"q{i}")) for i in range(10)])
    assert [f.result(1).answer for f in futures] == [f"q{i}" for i in range(10)]
    assert [len(questions) for questions, *_ in recorder.calls] == [4, 4, 2]
    assert batcher.counts["answered"] == 10 and batcher.counts["batches"] == 3


def test_a_cancelled_request_is_dropped_before_it_runs():
    def submit(batcher):
        futures = [batcher.submit(job(f"q{i}")) for i in range(3)]
        assert futures[1].cancel()
        return futures

    recorder, batcher, futures = run_with_blocker(ServeSettings(max_batch=8, max_wait_ms=0), submit)
    assert recorder.calls[0][0] == ["q0", "q2"]
    assert batcher.counts["dropped"] == 1
    with pytest.raises(CancelledError):
        futures[1].result(1)


def test_each_group_decodes_as_its_requests_ask():
    sampled = Decoding(max_tokens=5, temperature=0.7, top_p=0.9, seed=11)
    recorder, _, futures = run_with_blocker(
        ServeSettings(max_batch=8, max_wait_ms=0),
        lambda b: [b.submit(job("greedy")), b.submit(job("sampled", decoding=sampled))])
    (_, _, greedy, greedy_tokens), (_, _, hot, hot_tokens) = recorder.calls
    assert not greedy.do_sample and greedy_tokens == 8
    assert (hot.do_sample, hot.temperature, hot.top_p, hot.seed, hot_tokens) == (True, 0.7, 0.9, 11, 5)


def test_a_failing_engine_fails_its_requests_and_the_thread_keeps_serving():
    class Failing(Recorder):
        def __call__(self, runtime, concepts, generation=None):
            if not self.calls:
                self.calls.append("failed")
                raise RuntimeError("boom")
            return super().__call__(runtime, concepts, generation)

    batcher = Batcher(FakeRuntime(), ServeSettings(max_wait_ms=0), engine_factory=Failing()).start()
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(job("first")).result(10)
    assert batcher.submit(job("second")).result(10).answer == "second"
    batcher.stop(10)
