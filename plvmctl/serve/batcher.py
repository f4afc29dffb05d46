"""One model worker thread that gathers concurrent requests into the engine's batched `ask`.

Request handlers (on the event loop and its thread pool) decode their photos and load their
concepts themselves, then `submit` an AskJob: the question, its photos and its concepts go
with it, so the worker reads no store and no file. The worker takes the first job waiting,
then gathers more for at most `max_wait_ms` or until `max_batch` rows, and answers them in as
few `ask` calls as it can: one per decoding (jobs that decode alike), and never two owners'
different concepts of one name in one call (names are per user). A sampled job with a seed
runs alone, so its seed gives the same answer every time.

Each job has a concurrent.futures.Future: a handler awaits it (asyncio.wrap_future), and a
client that goes away cancels it; a cancelled job is dropped before it runs, freeing its row.
Anything else the model must do (encoding a reference photo) is a CallJob, run alone on the
same thread, so one thread owns the model.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from ..concept import Concept
from ..engine import AskRequest
from ..methods import make_engine
from .chat import Decoding
from .settings import ServeSettings

log = logging.getLogger(__name__)
_STOP = object()


@dataclass
class AskJob:
    owner: str  # whose concepts these are
    request: AskRequest
    concepts: dict[str, Concept]
    decoding: Decoding
    future: Future = field(default_factory=Future)


@dataclass
class CallJob:
    function: Callable
    future: Future = field(default_factory=Future)


@dataclass
class Group:
    """Jobs answered by one `ask` call."""

    decoding: Decoding
    jobs: list[AskJob] = field(default_factory=list)
    owners: dict[str, str] = field(default_factory=dict)  # concept name → owner
    alone: bool = False

    def takes(self, job: AskJob) -> bool:
        return (not self.alone and job.decoding == self.decoding
                and all(self.owners.get(name, job.owner) == job.owner for name in job.concepts))

    def add(self, job: AskJob) -> None:
        self.jobs.append(job)
        self.owners.update({name: job.owner for name in job.concepts})


def group_jobs(jobs: list[AskJob]) -> list[Group]:
    """Jobs in arrival order → the fewest groups that can each be one `ask` call."""
    groups: list[Group] = []
    for job in jobs:
        alone = job.decoding.sampled and job.decoding.seed is not None
        target = None if alone else next((g for g in groups if g.takes(job)), None)
        if target is None:
            target = Group(job.decoding, alone=alone)
            groups.append(target)
        target.add(job)
    return groups


class Batcher:
    """The model's one thread: `submit` jobs from any thread, `start` and `stop` it."""

    def __init__(self, runtime, settings: ServeSettings, engine_factory=make_engine):
        self.runtime = runtime
        self.settings = settings
        self.engine_factory = engine_factory
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken while gathering, not asks
        self._thread = threading.Thread(target=self._run, name="plvmctl-model", daemon=True)
        self.counts = {"answered": 0, "dropped": 0, "batches": 0, "calls": 0}

    # -- from request handlers ---------------------------------------------------------------
    def submit(self, job: AskJob | CallJob) -> Future:
        self._queue.put(job)
        return job.future

    def call(self, function: Callable) -> Future:
        """Run `function()` on the model thread; its result or exception on the future."""
        return self.submit(CallJob(function))

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + len(self._held)

    def start(self) -> "Batcher":
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish every job submitted so far, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # -- the model thread --------------------------------------------------------------------
    def _next(self):
        return self._held.popleft() if self._held else self._queue.get()

    def _gather(self, first: AskJob) -> list[AskJob]:
        """`first` and the asks that arrive within max_wait_ms, at most max_batch of them;
        anything else taken meanwhile is held for the next round, in order."""
        jobs = [first]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        held = []
        while len(jobs) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, AskJob):
                jobs.append(job)
            else:
                held.append(job)
        self._held.extend(held)
        return jobs

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is _STOP:
                if self._held or not self._queue.empty():  # a late job: finish it, then stop
                    self._queue.put(_STOP)
                    continue
                return
            if isinstance(job, CallJob):
                self._call(job)
            else:
                self._answer(self._gather(job))

    def _call(self, job: CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            self.counts["dropped"] += 1
            return
        self.counts["calls"] += 1
        try:
            job.future.set_result(job.function())
        except BaseException as error:  # the handler reports it
            job.future.set_exception(error)

    def _answer(self, jobs: list[AskJob]) -> None:
        live = []
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                live.append(job)
            else:
                self.counts["dropped"] += 1
        for group in group_jobs(live):
            self._ask(group)

    def _ask(self, group: Group) -> None:
        decoding = group.decoding
        base = self.runtime.recipe.generation
        generation = dataclasses.replace(base, do_sample=decoding.sampled,
                                         temperature=decoding.temperature if decoding.sampled else base.temperature,
                                         top_p=decoding.top_p if decoding.sampled else base.top_p,
                                         seed=decoding.seed if decoding.seed is not None else base.seed)
        concepts = {name: concept for job in group.jobs for name, concept in job.concepts.items()}
        try:
            engine = self.engine_factory(self.runtime, concepts, generation=generation)
            results = engine.ask([job.request for job in group.jobs], batch_size=len(group.jobs),
                                 max_new_tokens=decoding.max_tokens)
        except Exception as error:
            log.exception("batch of %d failed", len(group.jobs))
            for job in group.jobs:
                job.future.set_exception(error)
            return
        self.counts["batches"] += 1
        self.counts["answered"] += len(group.jobs)
        for job, result in zip(group.jobs, results):
            job.future.set_result(result)
