"""What every method shares: its record in the registry (`Method`), the references an eval adapter
is given, its context, what it returns, and the training of a trained method's concepts for the
test identities."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..concept import concept_name
from ..errors import PlvmError
from ..fingerprint import weights_digest
from ..train.common import config_digest
from ..train.per_concept import NegativeSettings, TrainedConcepts, TrainGroup, list_photos, train_in_groups

if TYPE_CHECKING:
    import click


@dataclass(frozen=True)
class Section:
    """A method's recipe section: its name and the settings dataclass it is read into."""

    name: str
    settings: type

    def read(self, recipe):
        """The recipe's section as `settings`, checked."""
        config = recipe.section(self.name, self.settings)
        config.validate()
        return config


@dataclass(frozen=True)
class Method:
    """One method, as the command line, the evaluation, the engine and the recipe see it."""

    name: str  # `--method NAME`, `plvmctl train NAME`
    prepare: MethodFactory | None  # the eval adapter; None: not available in this build
    page: str  # its documentation page, relative to the project root
    train_command: click.Command | None = None  # None by design: nothing to train per concept
    section: Section | None = None
    cache: str | None = None  # file or folder name in an evaluation's cache/
    hook: type | None = None  # ask-time hook class (`Engine(hooks=...)`)
    # trained on photos of other people: `eval` gives it a negative pool, from the index or
    # negatives_dir its section names
    trains_on_negatives: bool = False


@dataclass(frozen=True)
class Reference:
    """One concept to add: its name (used as `<name>`) and its reference photo; `photos`, when
    it has several (a test set's `ref_img*`), all of them, `path` first."""

    name: str
    path: Path
    photos: tuple[Path, ...] = ()


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
        parts = [weights_digest(where) if where and Path(where).exists() else str(where)
                 for where in (self.index, self.folder)]
        return ",".join(parts)

    def people(self) -> list[Reference]:
        """The folder's photos as references named after their files (plvm-auto's distractors)."""
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


def train_per_identity(context: MethodContext, method: str, config: NegativeSettings, train) -> TrainedConcepts:
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

    return train_references(context, method, config, train_one)


def train_references(context: MethodContext, method: str, config: NegativeSettings, train_group: TrainGroup, *,
                     group_size: int = 1, digest=None) -> TrainedConcepts:
    """The context's references trained `group_size` at a time by `train_group` and cached in
    `cache_dir/METHOD/` (`train.per_concept.train_in_groups`): `config` is the method's
    settings (what gathers the negatives; `digest(config)`, default `config_digest`, is what
    a cached concept must have been made with), the negatives come from `context.negatives`.
    """
    pool = context.negatives
    if pool is None:
        raise PlvmError(f"{method} needs a negative pool (methods.base.negative_pool)")
    settings_digest, pool_digest = (digest or config_digest)(config), pool.digest()
    return train_in_groups(context.runtime, [(reference.name, reference.path) for reference in context.references],
                           context.cache_dir / method, config, train_group, settings_digest=settings_digest,
                           negatives_index=pool.index, negatives_folder=pool.folder, negatives_digest=pool_digest,
                           group_size=group_size, label=f"{method}: train concepts", progress=context.progress)
