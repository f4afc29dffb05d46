"""The concept store: a folder of `NAME.concept` files, its retrieval index kept in step."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .concept import NAME_PATTERN, SUFFIX, Concept, validate_name
from .concept_index import INDEX_FOLDER, TABLE_FILE, StoreIndex
from .errors import PlvmError


class ConceptStore:
    """A folder of `NAME.concept` files: the default is ./concepts."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path_for(self, name: str) -> Path:
        return self.root / f"{validate_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob(f"*{SUFFIX}") if NAME_PATTERN.match(p.stem))

    def __contains__(self, name: str) -> bool:
        return NAME_PATTERN.match(name or "") is not None and self.path_for(name).is_file()

    def check_writable(self, name: str, force: bool = False) -> Path:
        """The path for `name`; PlvmError if a concept is there and `force` is not given."""
        path = self.path_for(name)
        if path.exists() and not force:
            raise PlvmError(f"concept {name!r} already exists at {path} (use --force to replace it)")
        return path

    def save(self, concept: Concept, force: bool = False) -> Path:
        path = concept.save(self.check_writable(concept.name, force))
        self._refresh_index(concept.name)
        return path

    def _refresh_index(self, name: str) -> None:
        """Keep the store's retrieval index (STORE/.retrieval, concept_index.py) in step, when
        there is one; a failed update only leaves it stale, which its users detect."""
        if not (self.root / INDEX_FOLDER / TABLE_FILE).is_file():
            return
        try:
            StoreIndex(self).refresh(name)
        except (PlvmError, OSError, RuntimeError) as error:
            logging.getLogger(__name__).warning("concept index not updated (%s); it will be "
                                                "rebuilt on next use", error)

    def load(self, name: str) -> Concept:
        if name not in self:
            known = self.names()
            listing = ", ".join(f"<{n}>" for n in known) if known else "none yet"
            raise PlvmError(f"unknown concept <{name}> in {self.root} (known: {listing})")
        concept = Concept.load(self.path_for(name))
        if concept.name != name:
            concept = concept.renamed(name)
        return concept

    def remove(self, name: str) -> Path:
        if name not in self:
            raise PlvmError(f"unknown concept <{name}> in {self.root}")
        path = self.path_for(name)
        path.unlink()
        self._refresh_index(name)
        return path
