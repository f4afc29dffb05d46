"""`plvm-auto`: PLVM's concepts, but the photo's concepts are found by retrieval, not named.

Each photo is searched for the test identities' retrieval keys (recognise.py: whole view and
windows, the recipe's `retrieval` threshold and top K). The found concepts, best first, get
their sentences in the prompt of every question about that photo. A recognition question
("Is <name> in this photo?") is answered from what was found: when <name> was not found the
answer is "No." without asking the model; when it was, the model is asked with the found
concepts (it among them) in the prompt. Other questions keep their named concept as well
(`ask --auto`'s rule). Each answer records the found concepts and boxes as `seen`, and an
answer retrieval gave alone says so (`decided_by`: the report counts those "no"s apart).

With a negative pool (`context.negatives`: --negatives, or the test set's negatives/ folder)
its people are encoded too and searched with the test identities: a store that, like a real
one, holds people who are not in the test set.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from ...answers import RECOGNITION_QUESTION
from ...errors import PlvmError
from ..base import MethodContext, PreparedMethod
from ..plvm.adapter import encode_references

NOT_FOUND_ANSWER = "No."


@dataclass
class Decided:
    """An answer retrieval gave without the model."""

    request: Any
    answer: str | None = None
    error: str | None = None
    notes: dict[str, dict] = field(default_factory=dict)  # as AskResult's: {"seen": {name: box}}
    logprobs: list[float] | None = None
    num_tokens: list[int] | None = None
    decided_by: str = "retrieval"

    @property
    def ok(self) -> bool:
        return self.error is None


class AutoEngine:
    """Wraps an engine: finds each photo's concepts first, then asks with them."""

    def __init__(self, runtime, engine, engine_api, index, config):
        self.runtime, self.engine, self.engine_api = runtime, engine, engine_api
        self.index, self.config = index, config
        self._found: dict[str, list] = {}

    def found(self, image) -> list | None:
        """The concepts found in `image` (cached per path); None when it cannot be read."""
        from ...images import load_image
        from ...recognise import look

        key = str(image)
        if key not in self._found:
            try:
                self._found[key] = look(self.runtime, self.index, [load_image(image)], self.config,
                                        self.engine)[0].found
            except PlvmError:
                return None
        return self._found[key]

    def prefetch(self, images: Sequence) -> None:
        """Look at many photos in batches (all crops of a batch through the encoder together)."""
        from ...images import load_image
        from ...recognise import look

        todo = [str(i) for i in dict.fromkeys(str(i) for i in images if i is not None) if i not in self._found]
        readable = []
        for path in todo:
            try:
                readable.append((path, load_image(path)))
            except PlvmError:
                pass
        if readable:
            for (path, _), looked in zip(readable, look(self.runtime, self.index, [i for _, i in readable],
                                                               self.config, self.engine)):
                self._found[path] = looked.found

    def _plan(self, requests):
        """Per request: a Decided answer, or the request to pass on with its found concepts."""
        recognition = re.compile("^" + re.escape(RECOGNITION_QUESTION).replace(re.escape("{name}"),
                                                                                "([A-Za-z0-9_-]+)") + "$")
        self.prefetch([r.image for r in requests])
        plan = []
        for request in requests:
            found = self.found(request.image) if request.image is not None else []
            if found is None:  # unreadable: the engine reports why
                plan.append(request)
                continue
            names = [f.name for f in found]
            boxes = {f.name: f.box for f in found}
            named = recognition.match(request.question)
            if named and named.group(1) not in names:
                plan.append(Decided(request, NOT_FOUND_ANSWER, notes={"seen": boxes}))
                continue
            passed = self.engine_api.AskRequest(request.question, request.image, concepts=tuple(names))
            plan.append((passed, names, boxes))
        return plan

    def _run(self, requests, call):
        plan = self._plan(requests)
        passed = [p if not isinstance(p, tuple) else p[0] for p in plan if not isinstance(p, Decided)]
        answered = iter(call(passed, [i for i, p in enumerate(plan) if not isinstance(p, Decided)]) if passed else [])
        results = []
        for request, step in zip(requests, plan):
            if isinstance(step, Decided):
                results.append(step)
                continue
            result = next(answered)
            result.request = request
            if isinstance(step, tuple):
                result.notes = {**getattr(result, "notes", {}), "seen": dict(step[2])}  # found, and where
            results.append(result)
        return results

    def ask(self, requests, **kwargs):
        return self._run(requests, lambda passed, _: self.engine.ask(passed, **kwargs))

    def score_options(self, requests, options, **kwargs):
        # a recognition question is never scored by options in eval; a Decided one has no scores
        return self._run(requests, lambda passed, where: self.engine.score_options(
            passed, [options[i] for i in where], **kwargs))


def prepare_plvm_auto(context: MethodContext) -> PreparedMethod:
    """PLVM concepts of every reference (and of the negative pool's people), their keys
    indexed; questions go through AutoEngine."""
    from ...concept_index import KeyIndex
    from ...recognise import retrieval_config

    concepts, unavailable, seconds = encode_references(context)
    tokens = [float(concept.num_context) for concept in concepts.values()]
    distractors = {}
    for reference in context.negatives.people() if context.negatives else []:
        if reference.name not in concepts and reference.name not in unavailable:
            try:
                distractors[reference.name] = context.runtime.encode_concept(reference.name, reference.path)
            except PlvmError:
                continue  # an unreadable photo of the pool is only one distractor fewer
    searched = {**concepts, **distractors}
    config = retrieval_config(context.runtime.recipe)
    index = KeyIndex.from_concepts(searched, context.runtime.encoder_fingerprint)
    engine = AutoEngine(context.runtime, context.engine_api.Engine(context.runtime, searched),
                        context.engine_api, index, config)
    return PreparedMethod(
        name="plvm-auto",
        engine=engine,
        seconds_per_concept=seconds / len(concepts) if concepts else None,
        tokens_per_concept=sum(tokens) / len(tokens) if tokens else None,
        unavailable=unavailable,
        details={"threshold": config.threshold, "top_k": config.top_k, "crops": config.crops,
                 "verify": config.verify, "verify_by": config.verify_by, "distractors": len(distractors),
                 "distractors_from": context.negatives.origin if distractors else None,
                 "note": ("the concepts in each photo are found by retrieval (whole view and "
                          + (f"windows, the {config.verify} best candidates verified by the model, "
                             + ("one question each" if config.verify_by == "each" else "in one question")
                             if config.verify else f"windows, cosine >= {config.threshold:g}")
                          + f", at most {config.top_k}); "
                          "a recognition question whose concept was not found is answered "
                          f"'{NOT_FOUND_ANSWER}' without the model"
                          + (f"; the store also holds {len(distractors)} people who are not in the test "
                             f"set ({context.negatives.origin})" if distractors else ""))},
    )
