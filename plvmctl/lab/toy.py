"""The toy world: procedural cartoon identities, their photos and questions about them.

A laboratory for showing that personalization learns: a pocket-size LLaVA-style model can be
trained from scratch on these images on a laptop CPU.

* An `Identity` is a combination of invariant traits (face shape, skin tone, hair colour, hair
  style, accessory, facial hair, eye colour). The whole identity space is their cartesian
  product; `identity_id` spells the traits, `name` is a unique made-up display name.
* The space is split ONCE AND FOR ALL into a training part and a held-out part (~20 %) by a
  stable hash of the identity id, independently of any seed: `training_identities()`,
  `heldout_identities()`, `is_heldout()`.
* Photos vary what is not identity: shirt colour, expression, position, scale, background and
  the other people in the photo (always from the same part of the split).
* Questions: generic scene questions without names (`scene_qa`), text-only attribute
  questions about `<sks>` (`attribute_qa`) and visual questions about `<sks>` in a photo
  (`scene_qa_about`).
* `generate_training_data` writes training material; `write_testset` writes an evaluation set
  with exactly the layout of the real plvm-val set, from held-out identities only.

Everything is deterministic: the same seed gives byte-identical PNG files and JSON.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw
from tqdm import tqdm

from ..answers import mcq_prompt
from ..errors import PlvmError
from ..fileio import write_image_atomic, write_json_atomic, write_text_atomic

# --------------------------------------------------------------------------------------------
# Traits
# --------------------------------------------------------------------------------------------

FACE_SHAPES: tuple[str, ...] = ("round", "oval", "square")
SKIN_TONES: dict[str, tuple[int, int, int]] = {
    "pale": (255, 226, 204),
    "light": (236, 192, 150),
    "tan": (200, 145, 95),
    "brown": (150, 98, 62),
    "dark": (88, 56, 40),
}
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 30),
    "brown": (125, 66, 18),
    "blonde": (245, 212, 90),
    "red": (215, 45, 25),
    "grey": (160, 160, 165),
    "blue": (40, 95, 230),
}
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bald", "curly", "spiky")
ACCESSORIES: tuple[str, ...] = ("none", "glasses", "hat", "earrings")
FACIAL_HAIR: tuple[str, ...] = ("none", "moustache", "beard")
EYE_COLOURS: dict[str, tuple[int, int, int]] = {
    "brown": (110, 60, 20),
    "blue": (30, 120, 255),
    "green": (30, 185, 60),
}

# The trait names, in the order they appear in an identity id, with their possible values.
TRAITS: dict[str, tuple[str, ...]] = {
    "face": FACE_SHAPES,
    "skin": tuple(SKIN_TONES),
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "accessory": ACCESSORIES,
    "facial_hair": FACIAL_HAIR,
    "eye_colour": tuple(EYE_COLOURS),
}

# The word that names each trait in descriptions and comparisons ("hair red", "style long"),
# in the order a "key value" description lists them.
TRAIT_KEYS: dict[str, str] = {"face": "face", "skin": "skin", "hair_colour": "hair", "hair_style": "style",
                              "eye_colour": "eyes", "facial_hair": "facial", "accessory": "accessory"}

# What varies from photo to photo.
SHIRT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 50, 180),
    "white": (250, 250, 250),
    "black": (30, 30, 30),
}
EXPRESSIONS: tuple[str, ...] = ("smiling", "neutral", "frowning", "surprised")
POSITIONS: tuple[str, ...] = ("left", "middle", "right")
SCALE_RANGE: tuple[float, float] = (0.85, 1.15)
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "grey": (185, 185, 190),
    "beige": (230, 210, 170),
    "cyan": (150, 225, 235),
    "pink": (245, 185, 210),
    "lime": (200, 240, 140),
}
BACKGROUND_PATTERNS: tuple[str, ...] = ("plain", "stripes", "dots", "checks")
PORTRAIT_BACKGROUNDS: tuple[str, ...] = ("white", "grey", "beige")

HELDOUT_PERCENT = 20  # share of the identity space kept for evaluation only
SUPERSAMPLE = 4  # draw at 4x and average down: smooth edges, still fast

# Fixed drawing colours (chosen apart from every hair, skin, shirt and background colour).
_MOUTH = (175, 20, 45)
_EYE_WHITE = (255, 255, 255)
_GLASSES = (15, 15, 15)
_HAT = (95, 35, 120)
_HAT_BAND = (240, 240, 240)
_EARRING = (255, 200, 0)
_EARRING_EDGE = (90, 60, 0)

# Display names: three consonant-vowel syllables, so every name has 6 letters and the
# syllables can be read back unambiguously (distinct indices -> distinct names).
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SYLLABLES: tuple[str, ...] = tuple(c + v for c in _CONSONANTS for v in _VOWELS)
_NAME_SPACE = len(_SYLLABLES) ** 3
_NAME_MULTIPLIER = 7919  # coprime with _NAME_SPACE (2^3 * 5^3 * 7^3): a bijection
_NAME_OFFSET = 104729


@dataclass(frozen=True, order=True)
class Identity:
    """One person of the toy world: only invariant traits, nothing that changes per photo."""

    face: str
    skin: str
    hair_colour: str
    hair_style: str
    accessory: str
    facial_hair: str
    eye_colour: str

    def __post_init__(self) -> None:
        for name, values in TRAITS.items():
            value = getattr(self, name)
            if value not in values:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(values)}")

    @property
    def identity_id(self) -> str:
        """Stable id spelling every trait, e.g. `round-tan-red-curly-glasses-beard-blue`."""
        return "-".join(getattr(self, name) for name in TRAITS)

    @classmethod
    def from_id(cls, identity_id: str) -> "Identity":
        """Parse an `identity_id` back into an `Identity` (PlvmError when malformed)."""
        parts = identity_id.split("-")
        if len(parts) != len(TRAITS):
            raise PlvmError(f"not a toy identity id: {identity_id!r}")
        try:
            return cls(*parts)
        except ValueError as error:
            raise PlvmError(f"not a toy identity id: {identity_id!r} ({error})") from None

    def traits(self) -> dict[str, str]:
        """The traits as a plain dict, in id order."""
        return {name: getattr(self, name) for name in TRAITS}

    @property
    def index(self) -> int:
        """Position of this identity in the cartesian product (mixed-radix number)."""
        number = 0
        for name, values in TRAITS.items():
            number = number * len(values) + values.index(getattr(self, name))
        return number

    @property
    def name(self) -> str:
        """Unique made-up display name (6 letters, capitalized), used for folders and concepts."""
        code = (self.index * _NAME_MULTIPLIER + _NAME_OFFSET) % _NAME_SPACE
        count = len(_SYLLABLES)
        syllables = [_SYLLABLES[(code // count**k) % count] for k in range(3)]
        return "".join(syllables).capitalize()

    def trait_words(self) -> dict[str, str]:
        """Every trait as key word -> value word ({"face": "round", "skin": "tan", "hair": "red", ...})."""
        return {key: getattr(self, trait) for trait, key in TRAIT_KEYS.items()}

    def keyvalue(self) -> str:
        """Every trait as "key value", in `TRAIT_KEYS` order: "face round skin pale hair black
        style short eyes blue facial none accessory glasses" (what the pocket base reads)."""
        return " ".join(f"{key} {value}" for key, value in self.trait_words().items())

    def describe(self) -> str:
        """A short English description of the traits."""
        parts = [f"a {self.face} face", f"{self.skin} skin", f"{self.hair_style} {self.hair_colour} hair"]
        if self.hair_style == "bald":
            parts[2] = f"bald with a little {self.hair_colour} hair on the sides"
        parts.append(f"{self.eye_colour} eyes")
        if self.facial_hair != "none":
            parts.append(f"a {self.hair_colour} {self.facial_hair}")
        if self.accessory != "none":
            parts.append(_ACCESSORY_PHRASE[self.accessory])
        return ", ".join(parts)


_ACCESSORY_PHRASE = {"glasses": "glasses", "hat": "a hat", "earrings": "earrings"}


def _stable_bucket(identity_id: str) -> int:
    """A number in [0, 100) from SHA-256 of the id: the same on every machine and run."""
    digest = hashlib.sha256(identity_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100


@functools.lru_cache(maxsize=None)
def is_heldout(identity: Identity) -> bool:
    """True when `identity` belongs to the held-out (evaluation-only) part of the space."""
    return _stable_bucket(identity.identity_id) < HELDOUT_PERCENT


@functools.lru_cache(maxsize=1)
def all_identities() -> tuple[Identity, ...]:
    """The whole identity space: the cartesian product of all traits, in id order."""
    return tuple(Identity(*combo) for combo in itertools.product(*TRAITS.values()))


@functools.lru_cache(maxsize=1)
def training_identities() -> tuple[Identity, ...]:
    """Identities that training data may use (about 80 % of the space)."""
    return tuple(identity for identity in all_identities() if not is_heldout(identity))


@functools.lru_cache(maxsize=1)
def heldout_identities() -> tuple[Identity, ...]:
    """Identities reserved for evaluation (about 20 % of the space); never in training data."""
    return tuple(identity for identity in all_identities() if is_heldout(identity))


def trait_differences(a: Identity, b: Identity) -> list[str]:
    """Names of the traits in which `a` and `b` differ."""
    return [name for name in TRAITS if getattr(a, name) != getattr(b, name)]


def one_trait_neighbours(identity: Identity, pool: Iterable[Identity]) -> list[Identity]:
    """Identities of `pool` that differ from `identity` in exactly one trait (hard negatives)."""
    return [other for other in pool if len(trait_differences(identity, other)) == 1]


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Background:
    """A photo background: a named colour and a simple pattern drawn in a darker shade."""

    colour: str
    pattern: str = "plain"

    def __post_init__(self) -> None:
        if self.colour not in BACKGROUND_COLOURS:
            raise ValueError(f"unknown background colour {self.colour!r}")
        if self.pattern not in BACKGROUND_PATTERNS:
            raise ValueError(f"unknown background pattern {self.pattern!r}")


@dataclass(frozen=True)
class PersonInScene:
    """One person as drawn in one photo: who, plus what varies from photo to photo."""

    identity: Identity
    shirt: str
    expression: str
    position: str
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.shirt not in SHIRT_COLOURS:
            raise ValueError(f"unknown shirt colour {self.shirt!r}")
        if self.expression not in EXPRESSIONS:
            raise ValueError(f"unknown expression {self.expression!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}")


@dataclass
class SceneInfo:
    """What is in a photo: everyone's identity, position, shirt and expression, plus background."""

    people: list[PersonInScene]
    background: Background
    subject: str | None = None  # identity id of the person the photo was made for, if any
    size: int = 96

    def to_dict(self) -> dict:
        """A JSON-able dict; `SceneInfo.from_dict` reverses it exactly."""
        return {
            "subject": self.subject,
            "size": self.size,
            "background": {"colour": self.background.colour, "pattern": self.background.pattern},
            "people": [
                {
                    "identity": person.identity.identity_id,
                    "name": person.identity.name,
                    "position": person.position,
                    "shirt": person.shirt,
                    "expression": person.expression,
                    "scale": person.scale,
                }
                for person in self.people
            ],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SceneInfo":
        """Rebuild a SceneInfo written by `to_dict`."""
        people = [
            PersonInScene(
                identity=Identity.from_id(row["identity"]),
                shirt=row["shirt"],
                expression=row["expression"],
                position=row["position"],
                scale=float(row["scale"]),
            )
            for row in data["people"]
        ]
        background = Background(data["background"]["colour"], data["background"]["pattern"])
        return cls(people=people, background=background, subject=data.get("subject"), size=int(data["size"]))

    def people_traits(self) -> list[tuple[str, dict[str, str]]]:
        """(place, trait words) of everyone in the photo, left to right."""
        ordered = sorted(self.people, key=lambda person: POSITIONS.index(person.position))
        return [(person.position, person.identity.trait_words()) for person in ordered]

    def person_at(self, position: str) -> PersonInScene | None:
        """The person at `position` (left/middle/right), or None."""
        for person in self.people:
            if person.position == position:
                return person
        return None

    def find(self, identity: Identity) -> PersonInScene | None:
        """The entry of `identity` in this photo, or None when they are not in it."""
        for person in self.people:
            if person.identity == identity:
                return person
        return None

    def render(self) -> Image.Image:
        """Draw this scene again (byte-identical to the original rendering)."""
        return render_scene(self.people, self.background, size=self.size)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _darker(colour: tuple[int, int, int], factor: float = 0.6) -> tuple[int, int, int]:
    return tuple(int(channel * factor) for channel in colour)  # type: ignore[return-value]


def _face_radii(face: str, unit: float) -> tuple[float, float, float]:
    """Half-width, half-height and superellipse exponent of a face shape."""
    if face == "round":
        return 0.5 * unit, 0.5 * unit, 2.0
    if face == "oval":
        return 0.4 * unit, 0.6 * unit, 2.0
    return 0.5 * unit, 0.52 * unit, 6.0  # square: a superellipse with rounded corners


def _superellipse(cx: float, cy: float, a: float, b: float, n: float, start: float, stop: float, steps: int = 40) -> list[tuple[float, float]]:
    """Points of |x/a|^n + |y/b|^n = 1 for angles start..stop (radians, y pointing down)."""
    points = []
    for k in range(steps + 1):
        t = start + (stop - start) * k / steps
        c, s = math.cos(t), math.sin(t)
        x = a * math.copysign(abs(c) ** (2.0 / n), c)
        y = b * math.copysign(abs(s) ** (2.0 / n), s)
        points.append((cx + x, cy + y))
    return points


def _draw_background(draw: ImageDraw.ImageDraw, background: Background, size: int) -> None:
    base = BACKGROUND_COLOURS[background.colour]
    shade = _darker(base, 0.86)
    draw.rectangle((0, 0, size, size), fill=base)
    step = size / 8
    if background.pattern == "stripes":
        for k in range(0, 8, 2):
            draw.rectangle((0, k * step, size, (k + 1) * step), fill=shade)
    elif background.pattern == "dots":
        radius = step * 0.18
        for i in range(8):
            for j in range(8):
                x, y = (i + 0.5) * step, (j + 0.5) * step
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=shade)
    elif background.pattern == "checks":
        for i in range(8):
            for j in range(8):
                if (i + j) % 2:
                    draw.rectangle((i * step, j * step, (i + 1) * step, (j + 1) * step), fill=shade)


def _draw_person(draw: ImageDraw.ImageDraw, person: PersonInScene, cx: float, cy: float, unit: float, bottom: float) -> None:
    """Draw one cartoon person whose head (width about `unit`) is centred at (cx, cy)."""
    who = person.identity
    skin = SKIN_TONES[who.skin]
    skin_edge = _darker(skin, 0.65)
    hair = HAIR_COLOURS[who.hair_colour]
    hair_edge = _darker(hair, 0.55)
    line = max(1.0, 0.045 * unit)
    a, b, n = _face_radii(who.face, unit)
    width = int(round(line))

    # Body (shirt) and neck.
    shirt = SHIRT_COLOURS[person.shirt]
    shoulder = 0.55 * unit
    draw.rounded_rectangle(
        (cx - shoulder, cy + b + 0.12 * unit, cx + shoulder, bottom + unit),
        radius=0.3 * unit, fill=shirt, outline=_darker(shirt, 0.5), width=width,
    )
    if who.hair_style == "long":  # hair falling on the shoulders, behind the head
        draw.rounded_rectangle(
            (cx - a - 0.14 * unit, cy - 0.2 * b, cx + a + 0.14 * unit, cy + b + 0.35 * unit),
            radius=0.12 * unit, fill=hair, outline=hair_edge, width=width,
        )
    draw.rectangle((cx - 0.14 * unit, cy + 0.6 * b, cx + 0.14 * unit, cy + b + 0.2 * unit), fill=skin)

    # Ears, then the head on top of them.
    ear = 0.1 * unit
    for side in (-1, 1):
        ex = cx + side * a
        draw.ellipse((ex - ear, cy - ear, ex + ear, cy + ear), fill=skin, outline=skin_edge, width=width)
    head = _superellipse(cx, cy, a, b, n, 0.0, 2 * math.pi, steps=64)
    draw.polygon(head, fill=skin, outline=skin_edge, width=width)

    # Hair on top of the head; `hair_top` is where a hat may sit.
    top = cy - b
    hair_top = top - 0.08 * unit
    cap = _superellipse(cx, cy - 0.3 * b, a + 0.05 * unit, 0.7 * b + 0.08 * unit, n, math.pi, math.pi * 2)
    if who.hair_style in ("short", "long", "spiky"):
        draw.polygon(cap, fill=hair, outline=hair_edge, width=width)
    if who.hair_style == "long":
        for side in (-1, 1):  # locks in front of the ears
            x0 = cx + side * (a + 0.02 * unit)
            x1 = cx + side * (a - 0.12 * unit)
            draw.rectangle((min(x0, x1), cy - 0.6 * b, max(x0, x1), cy + 0.7 * b), fill=hair)
    elif who.hair_style == "bald":  # a fringe of hair above the ears only
        for side in (-1, 1):
            x = cx + side * (a - 0.02 * unit)
            draw.ellipse((x - 0.09 * unit, cy - 0.5 * b, x + 0.09 * unit, cy - 0.05 * b), fill=hair, outline=hair_edge, width=width)
        hair_top = top
    elif who.hair_style == "curly":
        radius = 0.16 * unit
        for k in range(9):
            t = math.pi * (1.0 + k / 8)
            x = cx + (a + 0.02 * unit) * math.cos(t)
            y = cy - 0.1 * b + (b + 0.02 * unit) * math.sin(t) * 0.95
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=hair, outline=hair_edge, width=width)
        hair_top = top - 0.2 * unit
    elif who.hair_style == "spiky":
        spikes = 5
        for k in range(spikes):
            x = cx - 0.8 * a + 1.6 * a * k / (spikes - 1)
            base_y = top + 0.1 * unit + abs(k - 2) * 0.05 * unit
            draw.polygon(
                [(x - 0.12 * unit, base_y), (x, base_y - 0.3 * unit), (x + 0.12 * unit, base_y)],
                fill=hair, outline=hair_edge, width=width,
            )
        hair_top = top - 0.22 * unit

    # Beard: a band along the jaw from the cheeks to the chin, below the mouth.
    if who.facial_hair == "beard":
        outer = _superellipse(cx, cy, a + 0.01 * unit, b + 0.01 * unit, n, 0.0, math.pi)
        inner = _superellipse(cx, cy, a - 0.13 * unit, 0.78 * b, n, math.pi, 0.0)
        draw.polygon(outer + inner, fill=hair, outline=hair_edge, width=width)

    # Eyes with coloured irises.
    eye_y = cy - 0.12 * b
    iris = EYE_COLOURS[who.eye_colour]
    for side in (-1, 1):
        ex = cx + side * 0.45 * a
        draw.ellipse((ex - 0.11 * unit, eye_y - 0.085 * unit, ex + 0.11 * unit, eye_y + 0.085 * unit), fill=_EYE_WHITE, outline=skin_edge, width=width)
        r = 0.07 * unit
        draw.ellipse((ex - r, eye_y - r, ex + r, eye_y + r), fill=iris)

    # Moustache between nose and mouth.
    mouth_y = cy + 0.5 * b
    if who.facial_hair == "moustache":
        my = cy + 0.27 * b
        draw.polygon(
            [(cx - 0.24 * unit, my + 0.06 * unit), (cx - 0.1 * unit, my - 0.05 * unit), (cx + 0.1 * unit, my - 0.05 * unit),
             (cx + 0.24 * unit, my + 0.06 * unit), (cx, my + 0.03 * unit)],
            fill=hair, outline=hair_edge, width=width,
        )

    # Mouth by expression.
    half = 0.2 * unit
    thick = max(1, int(round(0.07 * unit)))
    if person.expression == "smiling":
        draw.arc((cx - half, mouth_y - 0.12 * unit, cx + half, mouth_y + 0.07 * unit), 15, 165, fill=_MOUTH, width=thick)
    elif person.expression == "frowning":
        draw.arc((cx - half, mouth_y - 0.02 * unit, cx + half, mouth_y + 0.15 * unit), 195, 345, fill=_MOUTH, width=thick)
    elif person.expression == "surprised":
        r = 0.075 * unit
        draw.ellipse((cx - r, mouth_y - r, cx + r, mouth_y + r), fill=_MOUTH)
    else:
        draw.line((cx - half * 0.8, mouth_y, cx + half * 0.8, mouth_y), fill=_MOUTH, width=thick)

    # Accessory.
    if who.accessory == "glasses":
        frame = max(1, int(round(0.05 * unit)))
        for side in (-1, 1):
            ex = cx + side * 0.45 * a
            draw.rectangle((ex - 0.15 * unit, eye_y - 0.12 * unit, ex + 0.15 * unit, eye_y + 0.12 * unit), outline=_GLASSES, width=frame)
            outer_x = ex + side * 0.15 * unit
            draw.line((outer_x, eye_y - 0.05 * unit, cx + side * a, eye_y - 0.08 * unit), fill=_GLASSES, width=frame)
        inner = 0.45 * a - 0.15 * unit
        draw.line((cx - inner, eye_y - 0.04 * unit, cx + inner, eye_y - 0.04 * unit), fill=_GLASSES, width=frame)
    elif who.accessory == "hat":
        brim_h = 0.07 * unit
        draw.rectangle((cx - a - 0.18 * unit, hair_top - brim_h, cx + a + 0.18 * unit, hair_top), fill=_HAT, outline=_darker(_HAT, 0.5), width=width)
        crown_w = 0.68 * a
        crown_top = hair_top - brim_h - 0.22 * unit
        draw.rectangle((cx - crown_w, crown_top, cx + crown_w, hair_top - brim_h), fill=_HAT, outline=_darker(_HAT, 0.5), width=width)
        band = hair_top - brim_h - 0.1 * unit
        draw.rectangle((cx - crown_w, band, cx + crown_w, hair_top - brim_h), fill=_HAT_BAND)
    elif who.accessory == "earrings":
        r = 0.085 * unit
        for side in (-1, 1):
            x, y = cx + side * (a + 0.02 * unit), cy + 0.25 * unit
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_EARRING, outline=_EARRING_EDGE, width=width)


def _finish(canvas: Image.Image, size: int) -> Image.Image:
    """Average the supersampled canvas down to `size` (deterministic box filter)."""
    return canvas.resize((size, size), Image.Resampling.BOX)


def _check_size(size: int, minimum: int = 32) -> None:
    if not isinstance(size, int) or size < minimum or size > 1024:
        raise PlvmError(f"image size must be an integer between {minimum} and 1024 pixels, got {size!r}")


def render_portrait(identity: Identity, rng: random.Random, size: int = 64) -> Image.Image:
    """A reference photo: `identity` alone, centred, on a plain neutral background.

    `rng` picks the shirt colour, a neutral or smiling expression and the background shade.
    """
    _check_size(size)
    person = PersonInScene(
        identity=identity,
        shirt=rng.choice(tuple(SHIRT_COLOURS)),
        expression=rng.choice(("neutral", "smiling")),
        position="middle",
    )
    background = Background(rng.choice(PORTRAIT_BACKGROUNDS), "plain")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, background, big)
    _draw_person(draw, person, cx=big / 2, cy=big * 0.49, unit=big * 0.4, bottom=big)
    return _finish(canvas, size)


def render_scene(people: Sequence[PersonInScene], background: Background, size: int = 96) -> Image.Image:
    """Draw `people` (at most one per position) in front of `background`."""
    _check_size(size)
    positions = [person.position for person in people]
    if len(set(positions)) != len(positions):
        raise ValueError(f"two people at the same position: {positions}")
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    _draw_background(draw, background, big)
    column = big / 3
    for person in people:
        cx = column * (POSITIONS.index(person.position) + 0.5)
        unit = 0.68 * column * person.scale
        _draw_person(draw, person, cx=cx, cy=big * 0.45, unit=unit, bottom=big)
    return _finish(canvas, size)


def random_person(identity: Identity, position: str, rng: random.Random) -> PersonInScene:
    """`identity` at `position` with a random shirt, expression and scale."""
    return PersonInScene(
        identity=identity,
        shirt=rng.choice(tuple(SHIRT_COLOURS)),
        expression=rng.choice(EXPRESSIONS),
        position=position,
        scale=round(rng.uniform(*SCALE_RANGE), 2),
    )


def _pick_companions(subject: Identity, pool: Sequence[Identity], k: int, rng: random.Random) -> list[Identity]:
    """Up to `k` distinct identities of `pool`, other than `subject`, from the subject's part.

    Tries a few random draws first (fast on big pools); falls back to filtering the whole pool
    when that fails, and then returns fewer than `k` if the pool has fewer suitable people.
    """
    split = is_heldout(subject)

    def suitable(identity: Identity, taken: list[Identity]) -> bool:
        return identity != subject and identity not in taken and is_heldout(identity) == split

    chosen: list[Identity] = []
    for _ in range(10 * k if pool else 0):
        if len(chosen) == k:
            return chosen
        candidate = pool[rng.randrange(len(pool))]
        if suitable(candidate, chosen):
            chosen.append(candidate)
    if len(chosen) == k:
        return chosen
    rest = [identity for identity in pool if suitable(identity, chosen)]
    return chosen + rng.sample(rest, min(k - len(chosen), len(rest)))


def random_scene(
    subject: Identity,
    rng: random.Random,
    pool: Sequence[Identity],
    n_people: int | None = None,
    size: int = 96,
) -> tuple[Image.Image, SceneInfo]:
    """A photo that contains `subject` and 0-2 other people drawn from `pool`.

    The others are always from the same part of the split as `subject` (identities of `pool`
    from the other part are ignored) and differ from `subject`; everyone has their own
    position. `n_people` (1-3) defaults to a random count, capped by what `pool` offers.
    """
    if n_people is not None and not 1 <= n_people <= 3:
        raise PlvmError(f"a toy photo holds 1 to 3 people, not {n_people}")
    wanted = n_people if n_people is not None else rng.randint(1, 3)
    companions = _pick_companions(subject, pool, wanted - 1, rng)
    wanted = 1 + len(companions)
    positions = rng.sample(POSITIONS, wanted)
    people = [random_person(identity, position, rng) for identity, position in zip([subject, *companions], positions)]
    people.sort(key=lambda person: POSITIONS.index(person.position))
    background = Background(rng.choice(tuple(BACKGROUND_COLOURS)), rng.choice(BACKGROUND_PATTERNS))
    info = SceneInfo(people=people, background=background, subject=subject.identity_id, size=size)
    return render_scene(people, background, size=size), info


# --------------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------------

QA = tuple[str, str]

_WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_ACCESSORY_ANSWER = {"none": "none", "glasses": "glasses", "hat": "hat", "earrings": "earrings"}


def _yes_no(flag: bool) -> str:
    return "Yes" if flag else "No"


def scene_qa(info: SceneInfo, rng: random.Random) -> list[QA]:
    """Generic questions about a photo, with no personal names (for pretraining the base model).

    Yes/No questions are balanced: each is asked about something present or absent with equal
    probability.
    """
    qa: list[QA] = []
    count = len(info.people)
    qa.append((rng.choice((
        "How many people are in the photo?",
        "How many people are in this image?",
        "How many people can you see in this picture?",
    )), str(count)))

    present = sorted({person.identity.hair_colour for person in info.people})
    absent = [colour for colour in HAIR_COLOURS if colour not in present]
    ask_present = rng.random() < 0.5 or not absent
    colour = rng.choice(present) if ask_present else rng.choice(absent)
    qa.append((rng.choice((
        "Is there a person with {c} hair?",
        "Does anyone in the photo have {c} hair?",
        "Can you see someone with {c} hair?",
    )).format(c=colour), _yes_no(ask_present)))

    occupied = [person.position for person in info.people]
    empty = [position for position in POSITIONS if position not in occupied]
    ask_occupied = rng.random() < 0.5 or not empty
    where = rng.choice(occupied) if ask_occupied else rng.choice(empty)
    qa.append((rng.choice((
        "Is there a person {w}?",
        "Is anyone standing {w} in the photo?",
    )).format(w=_WHERE[where]), _yes_no(ask_occupied)))

    for person in info.people:
        w = _WHERE[person.position]
        who = person.identity
        qa.append((rng.choice((
            "What colour is the shirt of the person {w}?",
            "What is the shirt colour of the person {w}?",
            "What color shirt does the person {w} wear?",
        )).format(w=w), person.shirt))
        qa.append((rng.choice((
            "What is the hair colour of the person {w}?",
            "What colour is the hair of the person {w}?",
            "What hair color does the person {w} have?",
        )).format(w=w), who.hair_colour))
        kind = rng.choice(("smiling", "expression", "accessory", "hair_style", "facial_hair"))
        if kind == "smiling":
            qa.append((rng.choice(("Is the person {w} smiling?", "Does the person {w} smile?")).format(w=w),
                       _yes_no(person.expression == "smiling")))
        elif kind == "expression":
            qa.append((rng.choice((
                "What is the facial expression of the person {w}?",
                "How does the person {w} look?",
            )).format(w=w), person.expression))
        elif kind == "accessory":
            qa.append((rng.choice((
                "What accessory does the person {w} wear?",
                "What is the person {w} wearing on the head or face?",
            )).format(w=w), _ACCESSORY_ANSWER[who.accessory]))
        elif kind == "hair_style":
            qa.append((rng.choice((
                "What is the hairstyle of the person {w}?",
                "What kind of hair does the person {w} have?",
            )).format(w=w), who.hair_style))
        else:
            qa.append((rng.choice((
                "Does the person {w} have a beard?",
                "Is the person {w} bearded?",
            )).format(w=w), _yes_no(who.facial_hair == "beard")))

    qa.append((rng.choice((
        "What colour is the background?",
        "What is the background colour?",
        "What color is the background of this photo?",
    )), info.background.colour))
    return qa


_ATTRIBUTE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "hair_colour": ("What colour is <sks>'s hair?", "What is <sks>'s hair color?", "What is the hair colour of <sks>?"),
    "hair_style": ("What is <sks>'s hairstyle?", "What kind of hair does <sks> have?", "How is <sks>'s hair styled?"),
    "skin": ("What is <sks>'s skin tone?", "What is <sks>'s skin color?"),
    "face": ("What is the shape of <sks>'s face?", "What face shape does <sks> have?"),
    "accessory": ("What accessory does <sks> wear?", "What is <sks>'s accessory?"),
    "facial_hair": ("What facial hair does <sks> have?", "Does <sks> have a beard, a moustache or neither?"),
    "eye_colour": ("What colour are <sks>'s eyes?", "What is <sks>'s eye color?"),
}


def _pick_other(values: Sequence[str], true_value: str, key: str) -> str:
    """A deterministic wrong value (chosen by hashing `key`), for balanced Yes/No questions."""
    others = [value for value in values if value != true_value]
    return others[_stable_bucket(key) % len(others)]


def attribute_qa(identity: Identity) -> list[QA]:
    """Text-only questions about `<sks>` whose answers follow from the invariant traits.

    Every phrasing of every trait, plus balanced Yes/No questions (one true, one false claim).
    """
    qa: list[QA] = []
    for trait, templates in _ATTRIBUTE_TEMPLATES.items():
        value = getattr(identity, trait)
        for template in templates:
            qa.append((template, value))
    wrong_colour = _pick_other(tuple(HAIR_COLOURS), identity.hair_colour, identity.identity_id + "/hair")
    qa.append((f"Does <sks> have {identity.hair_colour} hair?", "Yes"))
    qa.append((f"Does <sks> have {wrong_colour} hair?", "No"))
    qa.append(("Is <sks> bald?", _yes_no(identity.hair_style == "bald")))
    qa.append(("Does <sks> wear glasses?", _yes_no(identity.accessory == "glasses")))
    qa.append(("Is <sks> wearing a hat?", _yes_no(identity.accessory == "hat")))
    qa.append(("Does <sks> wear earrings?", _yes_no(identity.accessory == "earrings")))
    qa.append(("Does <sks> have a beard?", _yes_no(identity.facial_hair == "beard")))
    qa.append(("Does <sks> have a moustache?", _yes_no(identity.facial_hair == "moustache")))
    return qa


def scene_qa_about(subject: Identity, info: SceneInfo, rng: random.Random) -> list[QA]:
    """Visual questions about `<sks>` (= `subject`) in a photo that contains them."""
    me = info.find(subject)
    if me is None:
        raise PlvmError(f"{subject.name} is not in this photo")
    others = [person for person in info.people if person is not me]
    qa: list[QA] = [
        (rng.choice((
            "Where is <sks> in the photo?",
            "Where is <sks> in this image?",
            "Which side of the photo is <sks> on?",
        )), me.position),
        (rng.choice((
            "What colour is <sks>'s shirt?",
            "What color shirt is <sks> wearing?",
            "What is the colour of <sks>'s shirt in this photo?",
        )), me.shirt),
        (rng.choice(("Is <sks> smiling?", "Is <sks> smiling in this photo?")), _yes_no(me.expression == "smiling")),
        (rng.choice((
            "What is <sks>'s facial expression?",
            "What expression does <sks> have in this photo?",
        )), me.expression),
        (rng.choice((
            "How many people are with <sks>?",
            "How many other people are in the photo with <sks>?",
        )), str(len(others))),
        (rng.choice(("Is <sks> alone in this photo?", "Is <sks> by themselves in this image?")), _yes_no(not others)),
    ]
    if len(others) == 1:
        neighbour = others[0]
        qa.append((rng.choice((
            "What colour is the shirt of the person next to <sks>?",
            "What is the shirt color of the person next to <sks>?",
        )), neighbour.shirt))
        qa.append((rng.choice((
            "What is the hair colour of the person next to <sks>?",
            "What hair color does the person next to <sks> have?",
        )), neighbour.identity.hair_colour))
    return qa


# --------------------------------------------------------------------------------------------
# Writing data sets
# --------------------------------------------------------------------------------------------


def _save_png(image: Image.Image, path: Path) -> None:
    """Write `image` as PNG atomically."""
    write_image_atomic(path, image)


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    write_text_atomic(path, text)


def _clear(out_dir: Path, entries: Iterable[str]) -> None:
    """Remove earlier outputs of the same generator so no stale file survives a rerun."""
    for entry in entries:
        target = out_dir / entry
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _choose(pool: Sequence[Identity], n: int, rng: random.Random, part: str) -> list[Identity]:
    if not isinstance(n, int) or n < 1:
        raise PlvmError(f"the number of identities must be a positive integer, got {n!r}")
    if n > len(pool):
        raise PlvmError(f"asked for {n} identities but the {part} part has only {len(pool)}")
    return rng.sample(list(pool), n)


def _distractor_pool(part: Sequence[Identity], chosen: Sequence[Identity]) -> list[Identity]:
    """Identities of the same part that are not subjects, so one subject never appears in
    another subject's photos (then (reference of A, photo of B) is a clean negative)."""
    taken = set(chosen)
    rest = [identity for identity in part if identity not in taken]
    return rest if len(rest) >= 2 else list(part)


TRAINING_OUTPUTS = ("images", "scenes", "manifest.jsonl", "scene_qa.jsonl")


def generate_training_data(
    out_dir: str | Path,
    n_identities: int,
    photos_per_identity: int,
    seed: int,
    scene_size: int = 96,
    portrait_size: int = 64,
    extra_scenes: int | None = None,
    progress: bool = True,
    references: int = 1,
    mcq_per_trait: int = 0,
    visual_mcq_per_photo: int = 0,
) -> Path:
    """Write toy training data for `n_identities` training-part identities; return the manifest.

    Layout (paths in the JSON files are relative to `out_dir`):

        images/<Name>/ref.png        reference portrait
        images/<Name>/q<i>.png       photos that contain <Name> (with 0-2 other people)
        scenes/s<i>.png              extra photos of random training identities
        images/<Name>/ref<j>.png     with `references` > 1, further reference photos, j = 2..
                                     (`training_references`: clean, crowd crop, small, covered)
        manifest.jsonl               one identity a line: name, identity, reference, queries,
                                     scenes (SceneInfo dicts aligned with queries), traits,
                                     description (`Identity.keyvalue`), attributes, and
                                     "references" (the further ones) and "visual" when asked
        scene_qa.jsonl               generic scene questions {image, question, answer}

    Other people in the photos are training identities that are not subjects. `extra_scenes`
    defaults to as many as there are query photos. `mcq_per_trait` adds that many multiple-choice
    attribute rows per identity and text-MCQ trait (`mcq_attributes`); `visual_mcq_per_photo`
    that many visual multiple-choice rows per query photo, under the row's "visual"
    (`visual_mcq`). Earlier outputs of this function in `out_dir` are replaced.
    """
    _check_size(scene_size)
    _check_size(portrait_size)
    if not isinstance(photos_per_identity, int) or photos_per_identity < 1:
        raise PlvmError(f"photos per identity must be a positive integer, got {photos_per_identity!r}")
    if not isinstance(references, int) or references < 1:
        raise PlvmError(f"references per identity must be a positive integer, got {references!r}")
    rng = random.Random(f"plvmctl-toy-train-{seed}")
    part = training_identities()
    chosen = _choose(part, n_identities, rng, "training")
    distractors = _distractor_pool(part, chosen)
    extra = n_identities * photos_per_identity if extra_scenes is None else extra_scenes
    if extra < 0:
        raise PlvmError(f"extra scenes must be 0 or more, got {extra}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, TRAINING_OUTPUTS)
    manifest: list[dict] = []
    qa_rows: list[dict] = []
    for identity in tqdm(chosen, desc="toy identities", unit="id", disable=not progress):
        folder = f"images/{identity.name}"
        _save_png(render_portrait(identity, rng, size=portrait_size), out / folder / "ref.png")
        queries, scenes = [], []
        for i in range(photos_per_identity):
            image, info = random_scene(identity, rng, distractors, size=scene_size)
            relative = f"{folder}/q{i}.png"
            _save_png(image, out / relative)
            queries.append(relative)
            scenes.append(info.to_dict())
            qa_rows.extend({"image": relative, "question": q, "answer": a} for q, a in scene_qa(info, rng))
        row = {
            "name": identity.name,
            "identity": identity.identity_id,
            "reference": f"{folder}/ref.png",
            "queries": queries,
            "scenes": scenes,
            "traits": identity.trait_words(),
            "description": identity.keyvalue(),
            "people": [[{"place": place, "traits": traits} for place, traits in SceneInfo.from_dict(scene).people_traits()]
                       for scene in scenes],
            "attributes": [{"question": q, "answer": a} for q, a in attribute_qa(identity)]
                          + mcq_attributes(identity, mcq_per_trait, seed),
        }
        if visual_mcq_per_photo:
            row["visual"] = [{"image": image, **question} for number, image in enumerate(queries)
                             for question in visual_mcq(identity, SceneInfo.from_dict(scenes[number]),
                                                        visual_mcq_per_photo, f"{seed}-{number}")]
        if references > 1:
            row["references"] = training_references(out, folder, identity, references, seed, distractors,
                                                    portrait_size, scene_size)
        manifest.append(row)
    for i in tqdm(range(extra), desc="toy scenes", unit="img", disable=not progress):
        subject = rng.choice(part)
        image, info = random_scene(subject, rng, part, size=scene_size)
        relative = f"scenes/s{i}.png"
        _save_png(image, out / relative)
        qa_rows.extend({"image": relative, "question": q, "answer": a} for q, a in scene_qa(info, rng))

    _write_jsonl_atomic(out / "scene_qa.jsonl", qa_rows)
    manifest_path = out / "manifest.jsonl"
    _write_jsonl_atomic(manifest_path, manifest)
    return manifest_path


def mcq_attributes(identity: Identity, per_trait: int, seed: int) -> list[dict[str, str]]:
    """`per_trait` multiple-choice questions per trait of the text MCQ about `identity`, as the
    evaluation asks them ("What is <sks>'s hair color?\nA. red\nB. brown ..." with the MCQ
    instruction) and answered as the pocket base answers them ("brown B": the value, then its
    letter). An Aligner trained on open questions alone answers with the first option's value
    when options are in view; these rows teach its concepts to answer among options
    (bench/aligner_mcq.py: text MCQ 45 -> 66 on held-out identities). Drawn from a random stream
    of their own, so the rest of the data does not change."""
    rng = random.Random(f"plvmctl-toy-mcq-{seed}-{identity.name}")
    rows = []
    for trait, (template, values) in _TEXT_QUESTIONS.items():
        for _ in range(per_trait):
            choice, letter = _multiple_choice(values, getattr(identity, trait), rng)
            rows.append({"question": mcq_prompt(template, list(choice.items())),
                         "answer": f"{getattr(identity, trait)} {letter}"})
    return rows


def visual_mcq(identity: Identity, info: SceneInfo, count: int, seed: str) -> list[dict[str, str]]:
    """`count` multiple-choice questions about `identity` in the photo of `info`, of the visual
    MCQ's kinds (where, shirt, expression, how many) in turn from a random one, asked and
    answered as the text MCQ rows are (`mcq_attributes`: "red B"). An Aligner that only ever
    sees options without a photo learns to answer from the concept; these rows show it options
    that the photo decides. Drawn from a random stream of their own."""
    rng = random.Random(f"plvmctl-toy-visual-{seed}-{identity.name}")
    person = info.find(identity)
    if person is None:
        raise PlvmError(f"<{identity.name}> is not in the photo asked about")
    kinds = tuple(_VISUAL_QUESTIONS)
    offset = rng.randrange(len(kinds))
    rows = []
    for j in range(count):
        kind = kinds[(offset + j) % len(kinds)]
        template, values = _VISUAL_QUESTIONS[kind]
        value = _visual_answer(kind, person, info)
        choice, letter = _multiple_choice(values, value, rng)
        rows.append({"question": mcq_prompt(template, list(choice.items())), "answer": f"{value} {letter}"})
    return rows


TESTSET_FOLDER = "validation_recognition"
TESTSET_SIDECAR = "toy_world.json"
NEGATIVES_FOLDER = "negatives"
GROUPS_FOLDER = "groups"  # photos of two or three test identities together (`write_groups`)
TESTSET_OUTPUTS = (TESTSET_FOLDER, TESTSET_SIDECAR, "README.md", NEGATIVES_FOLDER, GROUPS_FOLDER)
_LETTERS = "ABCD"


def _multiple_choice(values: Sequence[str], correct: str, rng: random.Random) -> tuple[dict[str, str], str]:
    """2-4 options (as many as `values` allows) with `correct` at a random letter."""
    count = rng.randint(2, min(4, len(values)))
    wrong = rng.sample([value for value in values if value != correct], count - 1)
    options = wrong + [correct]
    rng.shuffle(options)
    choice = {letter: option for letter, option in zip(_LETTERS, options)}
    return choice, _LETTERS[options.index(correct)]


_VISUAL_QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "position": ("Where is <sks> in this photo?", POSITIONS),
    "shirt": ("What is the color of <sks>'s shirt in this photo?", tuple(SHIRT_COLOURS)),
    "expression": ("What is <sks>'s facial expression in this photo?", EXPRESSIONS),
    "count": ("How many people are in this photo, including <sks>?", ("1", "2", "3")),
}
_TEXT_QUESTIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hair_colour": ("What is <sks>'s hair color?", tuple(HAIR_COLOURS)),
    "skin": ("What is <sks>'s skin tone?", tuple(SKIN_TONES)),
    "hair_style": ("What is <sks>'s hairstyle?", HAIR_STYLES),
    "accessory": ("What accessory does <sks> wear?", ACCESSORIES),
    "facial_hair": ("What facial hair does <sks> have?", FACIAL_HAIR),
    "eye_colour": ("What is <sks>'s eye color?", tuple(EYE_COLOURS)),
}


def _visual_answer(kind: str, person: PersonInScene, info: SceneInfo) -> str:
    if kind == "position":
        return person.position
    if kind == "shirt":
        return person.shirt
    if kind == "expression":
        return person.expression
    return str(len(info.people))


def write_testset(
    out_dir: str | Path,
    n_identities: int,
    seed: int,
    queries_per_identity: int = 6,
    scene_size: int = 96,
    portrait_size: int = 64,
    progress: bool = True,
    negatives: int | None = None,
    groups: int | None = None,
    references: int = 1,
    hard_references: bool = False,
) -> Path:
    """Write a plvm-val-shaped evaluation set from held-out identities only; return `out_dir`.

    Layout under `out_dir`, exactly as the real set (the JSON paths are relative to `out_dir`
    and start with `validation_recognition/`):

        validation_recognition/<Name>/ref_img.png
        validation_recognition/<Name>/query_img1.png ... query_img<N>.png
        validation_recognition/query_ques.json      visual multiple choice, one per query photo
        validation_recognition/non_query_ques.json  text-only multiple choice, one per trait
        README.md                                   what generated it
        toy_world.json                              sidecar: identities and every photo's SceneInfo
        negatives/<Name>.png                        portraits of `negatives` (default: as many as
                                                    the test identities) training-part people
        groups/group_img<N>.png                     `groups` (default: as many as the test
                                                    identities) photos of 2-3 test identities
                                                    together, each in toy_world.json's scenes

    Other people in the query photos are held-out identities that are not test subjects, so a
    (reference, query) pair is positive exactly when both come from the same folder. The
    negatives are the photos of other people a trained baseline (Yo'LLaVA, MyVLM, MC-LLaVA)
    learns to tell its concept from, never a test identity (`write_negatives`). The group
    photos are outside validation_recognition/, so the plvm-val questions never see them; the
    questions about several people at once (`eval --pairs`) are asked on them.

    `references` > 1 adds ref_img2.png ... beside each ref_img.png (`write_references`: clean
    portraits, or with `hard_references` crops of crowds, small subjects and covered faces),
    described in toy_world.json's "references"; every other file stays as without them.
    """
    _check_size(scene_size)
    _check_size(portrait_size)
    if not isinstance(queries_per_identity, int) or queries_per_identity < 1:
        raise PlvmError(f"queries per identity must be a positive integer, got {queries_per_identity!r}")
    if not isinstance(references, int) or references < 1:
        raise PlvmError(f"references per identity must be a positive integer, got {references!r}")
    if hard_references and references < 2:
        raise PlvmError("hard references are the further ones: give --references 2 or more")
    rng = random.Random(f"plvmctl-toy-test-{seed}")
    part = heldout_identities()
    chosen = _choose(part, n_identities, rng, "held-out")
    distractors = _distractor_pool(part, chosen)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out, TESTSET_OUTPUTS)
    root = out / TESTSET_FOLDER
    visual_rows: list[dict] = []
    text_rows: list[dict] = []
    scenes: dict[str, dict] = {}
    further: dict[str, dict] = {}
    kinds = tuple(_VISUAL_QUESTIONS)
    for identity in tqdm(chosen, desc="toy test identities", unit="id", disable=not progress):
        ref = f"{TESTSET_FOLDER}/{identity.name}/ref_img.png"
        _save_png(render_portrait(identity, rng, size=portrait_size), out / ref)
        offset = rng.randrange(len(kinds))
        for j in range(1, queries_per_identity + 1):
            image, info = random_scene(identity, rng, distractors, size=scene_size)
            query = f"{TESTSET_FOLDER}/{identity.name}/query_img{j}.png"
            _save_png(image, out / query)
            scenes[query] = info.to_dict()
            kind = kinds[(offset + j) % len(kinds)]
            template, values = _VISUAL_QUESTIONS[kind]
            person = info.find(identity)
            assert person is not None  # random_scene always includes the subject
            choice, letter = _multiple_choice(values, _visual_answer(kind, person, info), rng)
            visual_rows.append({
                "ref_img": ref, "query_img": query, "question": template,
                "multiple_choice": choice, "correct_answer": letter,
            })
        for trait, (template, values) in _TEXT_QUESTIONS.items():
            choice, letter = _multiple_choice(values, getattr(identity, trait), rng)
            text_rows.append({"ref_img": ref, "question": template, "multiple_choice": choice, "correct_answer": letter})
        further.update(write_references(out, identity, references, hard_references, seed, distractors,
                                        portrait_size, scene_size))

    write_json_atomic(root / "query_ques.json", visual_rows)
    write_json_atomic(root / "non_query_ques.json", text_rows)
    groups = len(chosen) if groups is None else groups
    scenes.update(write_groups(out, chosen, groups, seed, scene_size))
    sidecar = {
        "seed": seed,
        "identities": {identity.name: identity.identity_id for identity in chosen},
        "scenes": scenes,
    }
    if further:
        sidecar["references"] = further
    write_json_atomic(out / TESTSET_SIDECAR, sidecar)
    negatives = len(chosen) if negatives is None else negatives
    write_negatives(out, negatives, seed, portrait_size)
    readme = _testset_readme(seed, len(chosen), queries_per_identity, len(visual_rows), len(text_rows),
                             scene_size, portrait_size, negatives, groups)
    if references > 1:
        readme += (f"\nEach identity has {references} reference photos (ref_img.png, ref_img2.png ...): the "
                   + ("further ones are hard (crowd crops, small subjects, covered faces)" if hard_references
                      else "further ones are clean portraits") + "; toy_world.json describes them.\n")
    write_text_atomic(out / "README.md", readme)
    return out


HARD_REFERENCE_KINDS = ("crowd-crop", "small", "covered")
_COVER = (120, 105, 90)  # the colour of what covers part of a face (a held card)


def render_reference(identity: Identity, rng: random.Random, kind: str, pool: Sequence[Identity],
                     portrait_size: int = 64, scene_size: int = 96) -> tuple[Image.Image, dict]:
    """A further reference photo of `identity` (`portrait_size` square) and what it shows:

        clean       a portrait with its own shirt and expression (`render_portrait`)
        crowd-crop  a square crop around the subject of a photo of two or three people from
                    `pool`: the neighbours' heads are partly in it
        small       a whole photo of two or three people, the subject a third of its width
        covered     a portrait with a card over a third of the face: the eyes and hair, the
                    mouth and chin, or one side

    The toy renderer draws faces from the front only: no turned heads."""
    if kind == "clean":
        return render_portrait(identity, rng, size=portrait_size), {"kind": kind}
    if kind == "covered":
        image = render_portrait(identity, rng, size=portrait_size)
        side = portrait_size
        part = rng.choice(("top", "bottom", "left", "right"))
        box = {"top": (0.2, 0.22, 0.8, 0.5), "bottom": (0.2, 0.5, 0.8, 0.78),
               "left": (0.15, 0.25, 0.47, 0.8), "right": (0.53, 0.25, 0.85, 0.8)}[part]
        ImageDraw.Draw(image).rectangle(tuple(round(v * side) for v in box), fill=_COVER)
        return image, {"kind": kind, "covered": part}
    if kind not in ("crowd-crop", "small"):
        raise PlvmError(f"unknown reference kind {kind!r}")
    image, info = random_scene(identity, rng, pool, n_people=rng.randint(2, 3), size=scene_size)
    described = {"kind": kind, "scene": info.to_dict()}
    if kind == "small":
        return image.resize((portrait_size, portrait_size), Image.Resampling.BOX), described
    person = info.find(identity)
    centre = scene_size / 3 * (POSITIONS.index(person.position) + 0.5)
    half = 0.3 * scene_size
    left = min(max(centre - half, 0.0), scene_size - 2 * half)
    top = min(max(0.45 * scene_size - half, 0.0), scene_size - 2 * half)
    crop = image.crop(tuple(round(v) for v in (left, top, left + 2 * half, top + 2 * half)))
    return crop.resize((portrait_size, portrait_size), Image.Resampling.BOX), described


def write_references(out_dir: Path, identity: Identity, count: int, hard: bool, seed: int,
                     pool: Sequence[Identity], portrait_size: int, scene_size: int) -> dict[str, dict]:
    """`validation_recognition/<Name>/ref_img2.png` ... `ref_img<count>.png` beside the primary
    reference: clean portraits, or with `hard` the hard kinds in turn (`render_reference`).
    Drawn from a random generator of their own (seed and identity), so the rest of the test set
    is the same with or without them. Returns each photo's description by its path."""
    rng = random.Random(f"plvmctl-toy-references-{seed}-{identity.identity_id}")
    start = rng.randrange(len(HARD_REFERENCE_KINDS))  # which kind comes first, then in turn
    kinds = HARD_REFERENCE_KINDS[start:] + HARD_REFERENCE_KINDS[:start]
    written = {}
    for number in range(2, count + 1):
        kind = kinds[(number - 2) % len(kinds)] if hard else "clean"
        image, described = render_reference(identity, rng, kind, pool, portrait_size, scene_size)
        relative = f"{TESTSET_FOLDER}/{identity.name}/ref_img{number}.png"
        _save_png(image, out_dir / relative)
        written[relative] = described
    return written


def training_references(out_dir: Path, folder: str, identity: Identity, count: int, seed: int,
                        pool: Sequence[Identity], portrait_size: int, scene_size: int) -> list[str]:
    """`folder/ref2.png` ... `ref<count>.png` of a training identity: the kinds clean,
    crowd-crop, small and covered in turn (`render_reference`), so an Aligner trained with
    several references sees clean and hard ones. Drawn from a random generator of their own
    (seed and identity): the rest of the training data is the same with or without them."""
    rng = random.Random(f"plvmctl-toy-train-references-{seed}-{identity.identity_id}")
    kinds = ("clean",) + HARD_REFERENCE_KINDS
    written = []
    for number in range(2, count + 1):
        image, _ = render_reference(identity, rng, kinds[(number - 2) % len(kinds)], pool, portrait_size, scene_size)
        relative = f"{folder}/ref{number}.png"
        _save_png(image, out_dir / relative)
        written.append(relative)
    return written


def write_groups(out_dir: str | Path, identities: Sequence[Identity], count: int, seed: int,
                 scene_size: int = 96) -> dict[str, dict]:
    """`out_dir/groups/group_img<N>.png`: `count` photos of two or three of `identities`
    together (each at a place of its own), drawn with `seed`; returns each photo's scene
    (`SceneInfo.to_dict`) by its path relative to `out_dir`. With fewer than two identities
    there is no group to draw, and none is written."""
    if not isinstance(count, int) or count < 0:
        raise PlvmError(f"the number of group photos must be 0 or more, got {count!r}")
    rng = random.Random(f"plvmctl-toy-groups-{seed}")
    folder = Path(out_dir) / GROUPS_FOLDER
    _clear(Path(out_dir), [GROUPS_FOLDER])
    scenes: dict[str, dict] = {}
    if len(identities) < 2:
        return scenes
    for index in range(1, count + 1):
        subject = rng.choice(list(identities))
        image, info = random_scene(subject, rng, identities, n_people=rng.randint(2, min(3, len(identities))),
                                   size=scene_size)
        relative = f"{GROUPS_FOLDER}/group_img{index}.png"
        _save_png(image, Path(out_dir) / relative)
        scenes[relative] = info.to_dict()
    return scenes


def write_negatives(out_dir: str | Path, count: int, seed: int, portrait_size: int = 64) -> Path:
    """`out_dir/negatives/<Name>.png`: one portrait each of `count` training-part people (the
    held-out part, and so every test identity, is never among them), drawn with `seed`."""
    rng = random.Random(f"plvmctl-toy-negatives-{seed}")
    folder = Path(out_dir) / NEGATIVES_FOLDER
    _clear(Path(out_dir), [NEGATIVES_FOLDER])
    for identity in _choose(training_identities(), count, rng, "training"):
        _save_png(render_portrait(identity, rng, size=portrait_size), folder / f"{identity.name}.png")
    return folder


def _testset_readme(seed: int, identities: int, queries: int, visual: int, text: int, scene_size: int,
                    portrait_size: int, negatives: int, groups: int) -> str:
    return (
        "# Toy plvm-val: a synthetic evaluation set\n\n"
        "Generated by `plvmctl toy testset` (plvmctl.lab.toy.write_testset) from the procedural\n"
        "toy world, using held-out identities only (never seen by toy training data).\n\n"
        f"- seed: {seed}\n"
        f"- identities: {identities} (one folder each under validation_recognition/)\n"
        f"- query photos per identity: {queries} ({scene_size} px); reference portraits {portrait_size} px\n"
        f"- validation_recognition/query_ques.json: {visual} visual multiple-choice questions\n"
        f"- validation_recognition/non_query_ques.json: {text} text-only multiple-choice questions\n"
        f"- negatives/: {negatives} portraits of training-part people (never test identities), the\n"
        "  negatives of the baselines that train (`plvmctl eval` uses them)\n"
        f"- groups/: {groups} photos of two or three test identities together (`plvmctl eval --pairs`\n"
        "  asks its questions about several people at once on them)\n\n"
        "The layout and JSON keys are those of the real plvm-val set. `toy_world.json` maps each\n"
        "folder name to its identity id and each query and group photo to the scene drawn in it.\n"
    )
