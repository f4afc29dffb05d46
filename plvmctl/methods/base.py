"""What every method shares: the references it is given, its context, what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import PlvmError


@dataclass(frozen=True)
class Reference:
    """One concept to add: its name (used as `<name>`) and its reference photo."""

    name: str
    path: Path


@dataclass(frozen=True)
class NegativePool:
    """Where a method's photos of other people come from: never the test identities.

    `index` (hard + random negatives, `plvmctl index build`) and/or `folder` (photos);
    `origin` says which in words, for the report.
    """

    index: str | None
    folder: Path | None
    origin: str

    def digest(self) -> str:
        """What the pool holds: the index's and the folder's file digests."""
        from ..fingerprint import weights_digest

        parts = [weights_digest(where) if where and Path(where).exists() else str(where)
                 for where in (self.index, self.folder)]
        return ",".join(parts)

    def people(self) -> list[Reference]:
        """The folder's photos as references named after their files (plvm-auto's distractors)."""
        from ..concept import concept_name
        from ..train.yollava import list_photos

        return [Reference(concept_name(photo.stem), photo) for photo in list_photos(self.folder)] \
            if self.folder else []


def negative_pool(method: str, config, given: Path | None, testset_folder: Path | None) -> NegativePool:
    """The negatives of a trained method: the folder given on the command line, else the
    recipe's `METHOD.index` / `METHOD.negatives_dir` (`config`: the method's settings, or None),
    else the test set's `negatives/` folder; with none of them, PlvmError (the other test
    identities are never used)."""
    if given is not None:
        pool = NegativePool(None, Path(given), f"the folder given with --negatives ({given})")
    elif config is not None and (config.index or config.negatives_dir):
        folder = Path(config.negatives_dir) if config.negatives_dir else None
        pool = NegativePool(config.index, folder, f"the recipe's {method}.index {config.index}" if config.index
                            else f"the recipe's {method}.negatives_dir {config.negatives_dir}")
    elif testset_folder is not None:
        pool = NegativePool(None, Path(testset_folder), f"the test set's negatives/ folder ({testset_folder})")
    else:
        raise PlvmError(f"{method} trains on photos of other people and none are given: pass --negatives DIR "
                        f"(photos of people not in the test set), set {method}.index or {method}.negatives_dir "
                        "in the recipe, or use a test set with a negatives/ folder (`plvmctl toy testset` "
                        "writes one); the test identities are never used as negatives")
    if pool.folder is not None and not pool.folder.is_dir():
        raise PlvmError(f"{method}: negatives folder not found: {pool.folder}")
    return pool


@dataclass
class MethodContext:
    """What a method factory gets.

    `engine_api` is anything with `Engine` and `AskRequest` attributes: the module
    `plvmctl.engine` in real runs, a fake in tests. `negatives` is the pool a trained method
    takes its negatives from (`negative_pool`); plvm-auto also encodes its people as
    concepts that are not in the test set.
    """

    runtime: Any
    references: list[Reference]
    cache_dir: Path
    engine_api: Any
    batch_size: int | None = None
    progress: bool = False
    negatives: NegativePool | None = None


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
    `context.negatives` (`negative_pool`: never a test identity). A cached concept is reused
    while the model, the positives, the settings and the negative pool are those it was made
    with; its seconds are the ones stored in it. A concept that cannot be made is reported in
    `unavailable`.
    """
    def train_one(names, positives, negatives, folder):
        [name] = names
        result = train(name, positives[name], negatives[name], folder / name)
        return {name: result.concept}, {name: result.seconds["total"]}

    return train_in_groups(context, method, config, train_one)


def train_in_groups(context: MethodContext, method: str, config, train_group, *, group_size: int = 1,
                    digest=None) -> TrainedConcepts:
    """Concepts trained `group_size` identities at a time (in the references' order) by
    `train_group(names, positives, negatives, folder)` → ({name: concept}, {name: seconds}),
    `positives` and `negatives` mapping each name to its photos; cached in
    `cache_dir/METHOD/NAME.concept` (the run folders beside them).

    Positives and negatives as in `train_per_identity` (a joint trainer also sees the photos of
    its group's other members). A group is reused from the cache when every member is there,
    made for this model, these positives, these settings (`digest(config)`, default
    `config_digest`) and this negative pool and, for a concept
    that records it (`trained_with`), with the same group; else the whole group is trained
    again. A member whose photos cannot be read, or a group whose training fails, is reported
    in `unavailable`.
    """
    from tqdm import tqdm

    from ..concept import Concept
    from ..train.common import config_digest, photos_digest
    from ..train.yollava import gather_negatives, reference_photos

    runtime = context.runtime
    folder = context.cache_dir / method
    made = TrainedConcepts({}, {}, [], folder)
    pool = context.negatives
    if pool is None:
        raise PlvmError(f"{method} needs a negative pool (methods.base.negative_pool)")
    settings, pool_digest = (digest or config_digest)(config), pool.digest()
    references = list(context.references)
    groups = [references[start:start + group_size] for start in range(0, len(references), group_size)]
    bar = tqdm(total=len(references), desc=f"{method}: train concepts", unit="concept",
               disable=not context.progress)
    for group in groups:
        positives: dict[str, list] = {}
        for reference in group:
            try:
                positives[reference.name] = reference_photos(reference.path)
            except PlvmError as error:
                made.unavailable[reference.name] = f"concept could not be made: {error}"
        names = list(positives)
        cached: dict[str, Concept] = {}
        for name in names:
            path = folder / f"{name}.concept"
            try:
                concept = Concept.load(path) if path.is_file() else None
            except PlvmError:
                concept = None  # a damaged cache entry is only trained again
            extra = concept.meta.extra if concept is not None else {}
            if concept is not None and concept.meta.base_model == runtime.backbone.fingerprint \
                    and extra.get("positives_sha256") == photos_digest(positives[name]) \
                    and extra.get("config_sha256") == settings \
                    and extra.get("negatives_sha256") == pool_digest \
                    and extra.get("trained_with", ",".join(names)) == ",".join(names):
                cached[name] = concept.renamed(name)
        if names and len(cached) == len(names):
            for name in names:
                made.concepts[name] = cached[name]
                made.seconds.append(float(cached[name].meta.extra.get("seconds", "nan")))
            bar.update(len(group))
            continue
        try:
            # reads hard_negatives, random_negatives, exclude_threshold and seed, which every
            # per-concept trainer's settings have under these names
            negatives = {name: gather_negatives(runtime, positives[name], config, index=pool.index,
                                                negatives_dir=pool.folder).photos for name in names}
            run = folder if len(names) == 1 and group_size == 1 else folder / f"group-{names[0]}-{len(names)}"
            concepts, seconds = train_group(names, positives, negatives, run) if names else ({}, {})
        except PlvmError as error:
            for name in names:
                made.unavailable[name] = f"concept could not be made: {error}"
            bar.update(len(group))
            continue
        for name in names:
            concepts[name].meta.extra["negatives_sha256"] = pool_digest  # reused only with this pool
            concepts[name].save(folder / f"{name}.concept")
            made.concepts[name] = concepts[name]
            made.seconds.append(seconds[name])
        bar.update(len(group))
    bar.close()
    return made
