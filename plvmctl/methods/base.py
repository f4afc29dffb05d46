"""What every method shares: the references it is given, its context, what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class Reference:
    """One concept to add: its name (used as `<name>`) and its reference photo."""

    name: str
    path: Path


@dataclass
class MethodContext:
    """What a method factory gets.

    `engine_api` is anything with `Engine` and `AskRequest` attributes: the module
    `plvmctl.engine` in real runs, a fake in tests.
    """

    runtime: Any
    references: list[Reference]
    cache_dir: Path
    engine_api: Any
    batch_size: int | None = None
    progress: bool = False


@dataclass
class PreparedMethod:
    """A method ready to answer: the engine and what one concept cost to add.

    `unavailable` maps a concept name to why it could not be made (e.g. an unreadable
    reference photo); the evaluation skips that concept's items and says why.
    """

    name: str
    engine: Any
    seconds_per_concept: float | None
    tokens_per_concept: float | None
    unavailable: dict[str, str] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


MethodFactory = Callable[[MethodContext], PreparedMethod]


@dataclass
class TrainedConcepts:
    """What a per-concept training method made for the test identities."""

    concepts: dict[str, Any]
    unavailable: dict[str, str]
    seconds: list[float]
    folder: Path

    @property
    def seconds_per_concept(self) -> float | None:
        return sum(self.seconds) / len(self.seconds) if self.seconds else None


def train_per_identity(context: MethodContext, method: str, config, train) -> TrainedConcepts:
    """One concept per identity, trained by `train(name, positives, negatives, run_folder)`
    (a result with `.concept` and `.seconds["total"]`), cached in `cache_dir/METHOD/NAME.concept`.

    Positives are the reference photo and any other `ref_img*` beside it; negatives come from
    `config.index` (hard + random) or `config.negatives_dir` when set, else they are the other
    identities' reference photos (never a query photo). A cached concept is reused while the
    model, the positives and the settings are those it was made with; its seconds are the ones
    stored in it. A concept that cannot be made is reported in `unavailable`.
    """
    from tqdm import tqdm

    from ..concept import Concept
    from ..errors import PlvmError
    from ..train.common import config_digest, photos_digest
    from ..train.yollava import gather_negatives, reference_photos

    runtime = context.runtime
    folder = context.cache_dir / method
    made = TrainedConcepts({}, {}, [], folder)
    for reference in tqdm(context.references, desc=f"{method}: train concepts", unit="concept",
                          disable=not context.progress):
        path = folder / f"{reference.name}.concept"
        try:
            positives = reference_photos(reference.path)
            wanted = {"positives_sha256": photos_digest(positives), "config_sha256": config_digest(config)}
            try:
                cached = Concept.load(path) if path.is_file() else None
            except PlvmError:
                cached = None  # a damaged cache entry is only trained again
            if cached is not None and cached.meta.base_model == runtime.backbone.fingerprint and all(
                    cached.meta.extra.get(key) == value for key, value in wanted.items()):
                made.concepts[reference.name] = cached.renamed(reference.name)
                made.seconds.append(float(cached.meta.extra.get("seconds", "nan")))
                continue
            if config.index or config.negatives_dir:
                # reads hard_negatives, random_negatives, exclude_threshold and seed, which every
                # per-concept trainer's settings have under these names
                negatives = gather_negatives(runtime, positives, config, index=config.index,
                                             negatives_dir=config.negatives_dir).photos
            else:
                negatives = [other.path for other in context.references if other.name != reference.name]
            result = train(reference.name, positives, negatives, folder / reference.name)
        except PlvmError as error:
            made.unavailable[reference.name] = f"concept could not be made: {error}"
            continue
        result.concept.save(path)
        made.concepts[reference.name] = result.concept
        made.seconds.append(result.seconds["total"])
    return made
