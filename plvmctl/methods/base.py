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
