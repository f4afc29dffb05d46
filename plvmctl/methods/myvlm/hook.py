"""MyVLM at ask time: a concept's head looks at the photo, and when it fires the concept's
visual tokens join the prompt (`SeenHook`, run by the engine `methods.make_engine` builds)."""

from __future__ import annotations

from ...engine import Engine, Prepared, photo_key
from ...errors import PlvmError
from ...photo_crops import crop_features
from .concept_head import ConceptHead


class SeenHook:
    """MyVLM at ask time: a concept with visual tokens is recognised first. For each request
    whose question names it and that has a photo, its concept head (concept_head.py) looks at
    the photo (the whole photo, or its crops with the best one counting), and when it fires the
    concept's visual tokens go right after that row's image tokens; `notes["seen"]` maps each
    such concept to the crop it fired on, in the question's order. Without a photo, or when the
    head does not fire, the concept is only its word."""

    key = "seen"

    def __init__(self):
        self._heads: dict[str, ConceptHead | None] = {}

    def head(self, engine: Engine, name: str) -> ConceptHead | None:
        """The concept head of `name` when it has visual tokens, else None."""
        if name not in self._heads:
            concept = engine.concept(name)
            head = ConceptHead.from_concept(concept) if concept.num_visual else None
            if concept.num_visual and head is None:
                raise PlvmError(f"concept <{name}> has visual tokens but no concept head")
            self._heads[name] = head
        return self._heads[name]

    def prepare(self, engine: Engine, prepared: list[Prepared], errors: dict[int, str]) -> list[Prepared]:
        """Each item's concepts whose head fires on one of its photos (the box is that of the
        best crop of all its photos).

        Crop features are computed once per distinct photo, feature source and crop setting,
        all crops together in batches; an item whose recognition fails gets the error and is
        dropped.
        """
        wanted: dict[tuple[str, str], list[tuple[Prepared, str]]] = {}  # (source, crops) -> (item, name)
        failed: set[int] = set()
        seen: dict[int, dict] = {}
        for item in prepared:
            if not item.images:
                continue
            try:
                for name in item.names:
                    head = self.head(engine, name)
                    if head is not None:
                        wanted.setdefault((head.features, head.crops), []).append((item, name))
            except PlvmError as error:
                errors[item.index] = str(error)
                failed.add(item.index)
        for (source, crops), pairs in wanted.items():
            pairs = [(item, name) for item, name in pairs if item.index not in failed]
            photos = list({item.index: item for item, _ in pairs}.values())
            if not photos:
                continue
            keys = {item.index: [photo_key(image) for image in item.images] for item in photos}
            distinct = list({key: image for item in photos
                             for key, image in zip(keys[item.index], item.images)}.items())
            try:
                found = crop_features(engine.runtime, [image for _, image in distinct], source, crops)
            except (PlvmError, RuntimeError, ValueError) as error:
                for item in photos:
                    errors[item.index] = f"concept head: {str(error).splitlines()[0]}"
                    failed.add(item.index)
                continue
            features = {key: photo for (key, _), photo in zip(distinct, found)}
            for item, name in pairs:
                try:
                    head = self.head(engine, name)
                    scores, boxes = head.best([features[key] for key in keys[item.index]])
                    number = int(scores.argmax())
                    if float(scores[number]) >= head.threshold:
                        seen.setdefault(item.index, {})[name] = boxes[number]
                except PlvmError as error:
                    errors[item.index] = str(error)
                    failed.add(item.index)
        for item in prepared:  # the order of the question, whatever the feature sources
            fired = seen.get(item.index, {})
            if fired:
                ordered = sorted(fired, key=item.names.index)
                item.after_image += ordered
                item.notes[self.key] = {name: fired[name] for name in ordered}
        return [item for item in prepared if item.index not in failed]
