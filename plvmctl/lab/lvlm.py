"""Pretraining the pocket base LVLM of the toy world from scratch (nanoVLM style).

The pocket model is a real `LlavaForConditionalGeneration` (CLIP vision tower + projector +
Llama LM) at toy size with a word-level vocabulary. It is trained here once, then frozen; PLVM
later only trains an Aligner that writes soft tokens for it.

What the frozen base must be able to do, and the row kinds that teach it (no personal names
anywhere: every person is "the person on the left" or a placeholder `<name>` that is an
unknown word to the tokenizer):

* ``scene``: see the photo. The toy world's generic scene questions (`scene_qa`): how many
  people, is there a person with red hair, shirt/hair colour of the person on the left, ...
* ``recognition``: match a description against the photo. The prompt carries a description
  (`describe`: "a person with a round face, tan skin, ...") in the very place where PLVM
  later puts its concept sentence (`build_prompt(..., descriptions={name: "a person ..."})`
  renders ``a chat. <name> is a person with .... user: <image>\\nIs <name> in this photo?``),
  answered "Yes, ..." / "No, ..." with the recognition templates. Negatives are people absent
  from the photo, half of them differing from someone present in ONE trait (hard negatives),
  so the model learns to check every trait of the description.
* ``about``: visual questions about the described person (where is <name>, shirt colour,
  expression, how many people), open-ended and in the evaluation's multiple-choice format
  ("A. left" lines + the answer-with-the-letter instruction, answered with the letter).
* ``text``: text-only attribute questions about the described person (no image): the
  answer must be read off the description (hair colour, skin tone, accessory ...), open and
  multiple choice.
* reference rows (a share ``reference_share`` of recognition, about and text rows): the
  person is introduced by a reference *portrait* in the description's place, ``<name> is
  <image>.``, the way a multi-image LVLM is shown "this is <name>: [photo]". The LM would
  then match photo against photo instead of binding words to what it sees, and PLVM's
  Aligner would write its k soft tokens where the portrait's tokens were. An experiment
  (off by default; 1,200 steps with every person shown this way left recognition at chance,
  docs/research-log.md); `measure` reports these rows' accuracies under kinds with a "-ref" suffix.
* ``caption`` (off by default, `caption_rows`): "Describe the photo." answered with every
  trait drawn, place by place (`scene_caption`); dense grounding, optionally alone for the
  first `caption_steps` steps.
* ``describe``: a reference portrait and "Describe the person in this photo in one short
  sentence." -> the description. This keeps the "LLaVA + text prompt" baseline honest: the
  base model can write the descriptions that baseline feeds back to it.

Why descriptions in the preamble rather than names: the frozen LM must already know how to
use a sentence "<name> is ..." about a person, since the Aligner can only write embeddings
into that sentence; it cannot teach the LM a new skill. The LM learns the skill from words
here and the Aligner learns to say the same thing in 16 soft tokens, from a reference photo.

Before any of these, `copy_steps` steps of repeated random word sequences (`copy_warmup_loss`)
give the LM the induction heads that reading the descriptions reuses.

Every prompt is built exactly as at inference (`build_prompt` with the pocket template +
`encode_segments`), the answer is " {answer}" + EOS and only answer tokens carry loss; each
row weighs the same and half of a row's loss is on its first answer token, the one that
decides (`answer_loss`). The vision tower runs once per distinct photo of a step; the
features are scattered into every row that shows that photo (several questions per photo:
a big saving on two CPU cores). An auxiliary probe (`VisionProbe`, thrown away afterwards)
reads each third of the photo's projected features and predicts what is drawn there: the
dense labels the toy world gives for free, so the vision tower learns to see in the few
thousand steps two CPU cores allow.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from tokenizers import pre_tokenizers
from transformers import LlavaForConditionalGeneration

from ..answers import (
    BOTH_HERE_QUESTION,
    CAPTION_QUESTION,
    DESCRIPTION_PROMPT,
    LEFT_OF_QUESTION,
    MCQ_INSTRUCTION,
    RECOGNITION_QUESTION,
    WHICH_OF_QUESTION,
    WHO_OF_QUESTION,
    mcq_prompt,
    name_list,
    parse_mcq_answer,
    parse_mcq_prompt,
    parse_yes_no,
)
from ..data import templates as recognition_templates
from . import toy
from ..errors import PlvmError
from ..name_tags import TAGS_KEY, add_tags, name_tags, tag_stop_ids
from ..prompt import IMAGE_PLACEHOLDER, POCKET, build_prompt, encode_segments, split_names
from ..tiny import (
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    PAD_ID,
    PUNCTUATION,
    SPECIAL_TOKENS,
    build_word_tokenizer,
    clip_image_processor,
    tiny_llava_config,
)
from ..train.common import (
    CHECKPOINT_MODULE,
    JsonlLogger,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    lr_multiplier,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)

IGNORE = -100
KINDS = ("scene", "recognition", "about", "text", "describe", "caption", "portrait")
DESCRIBE_PROMPT = "Describe the person in this photo in one short sentence."
CAPTION_PROMPT = "Describe the photo."
RECOGNITION_ANSWERS = recognition_templates.RECOGNITION_ANSWER_STYLES
# What a "compare" recognition answer checks for every person in the photo: the traits a 96 px
# photo shows well (a linear probe reads hair colour 0.97, skin 0.90, hair style 0.79 from the
# image tokens, eye colour and facial hair barely above chance), written with their keys.
COMPARE_TRAITS: tuple[str, ...] = ("hair_colour", "skin", "hair_style")
MCQ_ANSWERS = ("letter", "value_letter")  # how a multiple-choice row is answered (`_mcq`)
GENERIC_WORDS = (
    "i you we it this that photo image picture person people man woman name unknown maybe "
    "sorry know don't see answer question left right middle one two three none nobody < >"
).split() + list(recognition_templates.COMPARE_WORDS)


# --------------------------------------------------------------------------------------------
# Descriptions and vocabulary
# --------------------------------------------------------------------------------------------


# The key word of each trait in a "keyvalue" description, in the order they are written:
# mostly the word the questions use for that trait ("What colour is <name>'s hair?").
DESCRIPTION_KEYS: dict[str, str] = toy.TRAIT_KEYS
DESCRIPTION_STYLES = ("sentence", "keyvalue")


def describe(identity: toy.Identity, style: str = "sentence") -> str:
    """What the base model reads (and writes) about a person.

    ``sentence`` (the committed pocket model's): "a person with a round face, pale skin, short
    black hair, blue eyes, glasses". ``keyvalue``: every trait as "key value", always in the
    same order: "face round skin pale hair black style short eyes blue facial none accessory
    glasses" (14 words). Answering from the sentence needs a different lookup for every trait
    (the word before "hair", two before it, a noun that is there or not ...); "key value" pairs
    need one, the induction pattern (find the question's word earlier, read the word after
    it), which the copy warm-up (`copy_steps`) teaches first. `bench/reading.py` measures
    both (docs/research-log.md).
    """
    if style == "keyvalue":
        return identity.keyvalue()
    if style == "sentence":
        return "a person with " + identity.describe()
    raise PlvmError(f"unknown description style {style!r} (known: {', '.join(DESCRIPTION_STYLES)})")


def _split_words(text: str) -> list[str]:
    splitter = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return [piece for piece, _ in splitter.pre_tokenize_str(text.lower())]


def collect_vocabulary(samples: int = 400, seed: int = 0, description: str = "sentence",
                       several_people: bool = False) -> list[str]:
    """Every word of the toy world's questions, answers, templates and descriptions.

    The generators are run over `samples` random scenes and identities of both parts (small
    renders, only the text is kept), plus the recognition templates, the evaluation's
    multiple-choice instruction, the description prompt and the pocket chat template; with
    `several_people`, the words of the questions about several people and their answers too
    ("and", "or", "both", "nobody": a base trained without them reads them as `<unk>`).
    """

    rng = random.Random(f"plvmctl-pocket-vocab-{seed}")
    texts: list[str] = [POCKET.system, POCKET.user, POCKET.assistant, MCQ_INSTRUCTION,
                        RECOGNITION_QUESTION, DESCRIPTION_PROMPT, DESCRIBE_PROMPT, CAPTION_PROMPT]
    for group in (recognition_templates.RECOGNITION_QUESTIONS, recognition_templates.POSITIVE_ANSWERS,
                  recognition_templates.NEGATIVE_ANSWERS, recognition_templates.ATTRIBUTE_QUESTIONS):
        texts.extend(group)
    for values in list(toy.TRAITS.values()) + [tuple(toy.SHIRT_COLOURS), toy.EXPRESSIONS, toy.POSITIONS,
                                                 tuple(toy.BACKGROUND_COLOURS), toy.BACKGROUND_PATTERNS]:
        texts.extend(values)
    texts.extend(template for template, _ in toy._VISUAL_QUESTIONS.values())
    texts.extend(template for template, _ in toy._TEXT_QUESTIONS.values())
    texts.extend(str(n) for n in range(11))
    texts.extend("abcd")
    pools = (toy.training_identities(), toy.heldout_identities())
    for i in range(samples):
        pool = pools[i % 2]
        subject = rng.choice(pool)
        _, info = toy.random_scene(subject, rng, pool, size=32)
        texts.extend(q + " " + a for q, a in toy.scene_qa(info, rng))
        texts.extend(q + " " + a for q, a in toy.scene_qa_about(subject, info, rng))
        texts.extend(q + " " + a for q, a in toy.attribute_qa(subject))
        texts.append(describe(subject, description))
        texts.append(scene_caption(info))
    texts.extend(GENERIC_WORDS)
    if several_people:  # `which_row`, `eval --pairs`
        for group in (recognition_templates.WHICH_QUESTIONS, recognition_templates.WHICH_ANSWERS,
                      recognition_templates.BOTH_QUESTIONS, recognition_templates.BOTH_YES,
                      recognition_templates.BOTH_NO):
            texts.extend(group)
        texts += [WHICH_OF_QUESTION, WHO_OF_QUESTION, BOTH_HERE_QUESTION, LEFT_OF_QUESTION, NEITHER_ANSWER,
                  NOBODY_ANSWER, CAPTION_QUESTION]
    specials = set(SPECIAL_TOKENS) | set(PUNCTUATION)
    words: list[str] = []
    seen: set[str] = set()
    for text in texts:
        for word in _split_words(text):
            if word not in seen and word not in specials and word != "sks":
                seen.add(word)
                words.append(word)
    return sorted(words)


# --------------------------------------------------------------------------------------------
# Sizes and settings
# --------------------------------------------------------------------------------------------


@dataclass
class LvlmSizes:
    """The pocket LLaVA's shape (96 px photos, 16 px patches -> 36 image tokens)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    image_size: int = 96
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 3


@dataclass
class LvlmTrainConfig:
    """How the base LVLM is pretrained. Each step shows `scenes_per_step` fresh photos, each
    with `rows_per_scene` questions, plus text-only and describe rows."""

    steps: int = 600
    scenes_per_step: int = 6
    rows_per_scene: int = 5
    text_rows_per_step: int = 10
    describe_rows_per_step: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    # share of each per-scene row kind (they need not sum to 1)
    scene_share: float = 0.35
    recognition_share: float = 0.35
    about_share: float = 0.30
    mcq_share: float = 0.5  # share of about/text rows asked as multiple choice
    mcq_answer: str = "letter"  # "letter" ("B") | "value_letter" ("red B": the value, then its letter; `_mcq`)
    hard_negative_share: float = 0.5
    vision_aux_weight: float = 0.5  # weight of the VisionProbe loss (0 turns it off)
    position_aux_weight: float = 0.0  # weight of the probe's per-patch column loss (0: no such head)
    reference_share: float = 0.0  # share of recognition/about/text rows whose person is shown by a portrait
    description: str = "sentence"  # how people are described: "sentence" | "keyvalue" (`describe`)
    copy_steps: int = 0  # first steps on repeated random word sequences (see `copy_warmup_loss`)
    caption_rows: int = 0  # caption rows per photo ("left hair red curly shirt blue ...", `scene_caption`)
    caption_steps: int = 0  # first steps with caption rows only (a seeing warm-up; needs caption_rows)
    reading_steps: int = 0  # first steps with text-only rows (learn to read descriptions first)
    reading_rows: int = 64  # text-only rows per reading step
    max_seconds: float = 0.0  # stop early after this much training time (0: no limit)
    recognition_answer: str = "plain"  # "plain" ("Yes, <name> is ...") | "compare" (`comparison` first)
    about_answer: str = "plain"  # questions about a named person in a photo: "plain" | "compare" (`comparison` first)
    compare_traits: tuple[str, ...] = COMPARE_TRAITS  # what a "compare" answer checks, person by person
    name_share: float = 0.0  # share of named rows whose <name> is a per-row name token (`NameTokens`)
    single_person_steps: int = 0  # first steps with one person a photo (the curriculum's first stage)
    vision_steps: int = 0  # before any LM step: the vision tower on the probe's labels alone (`vision_warmup_step`)
    portrait_rows_per_step: int = 0  # a portrait and a question about "the person" in it (`portrait_row`)
    crowd_share: float = 0.0  # share of recognition rows with 1-3 other people's descriptions too (`crowd_row`)
    which_share: float = 0.0  # per-scene share of "Which of <a> and <b> is in this photo?" rows (`which_row`)
    which_answer: str = "full"  # a which row's reasoning: "full" | "short" | "named" | "places" (`which_row`)
    which_max: int = 2  # which rows ask about 2 up to this many people (3: "Which of", 4: "Who of")
    named_caption_share: float = 0.0  # per-scene share of "Describe this photo." with concepts (`named_caption_row`)
    pair_share: float = 0.0  # per-scene share of "Are <a> and <b> both ...?" / "Is <a> left of <b>?" (`pair_row`)
    pairs_by_place: bool = False  # pair and named-caption rows reason place by place (`places_reasoning`)
    places_lookup: str = "most"  # whom a part by place names: "most" | "first" (`places_reasoning`)
    recall: bool = False  # "compare" recognition answers first restate the asked person's traits (`recall`)
    crowd_text_share: float = 0.0  # share of text rows with 1-3 other people's descriptions too (`text_row`)
    name_tags: bool = False  # every token after a name carries its vector (`plvmctl.name_tags`; saved in the config)
    dense_text_groups: int = 0  # dense text rows a step (`text_group`: many questions about one prompt)
    dense_questions: int = 8  # questions in each dense text row
    dense_several_share: float = 0.75  # share of dense text rows describing 2-4 people
    dense_weight: float = 1.0  # weight of the dense rows' loss (`dense_loss`) beside the step's rows

    @property
    def several_people(self) -> bool:
        """Whether these settings teach questions about several people: the vocabulary then
        holds their words (`collect_vocabulary`) and the pocket build measures them
        (`plvmctl.lab.several_people`)."""
        return self.name_tags or self.crowd_share > 0 or self.which_share > 0


@dataclass
class Row:
    """One training or evaluation example. `descriptions` holds every person the preamble
    describes, in the order their sentences stand there."""

    kind: str
    question: str
    answer: str
    image: int | None  # index into the step's photos, None for text-only rows
    descriptions: dict[str, str] = field(default_factory=dict)
    options: tuple[str, ...] = ()  # the possible answers (for accuracy among them)
    reference: int | None = None  # a portrait shown in the preamble as the person's description
    name_token: bool = False  # the person's <name> is a name token (`NameTokens`), not literal text
    mcq: bool = False  # a multiple-choice question in the evaluation's format (`_mcq`)

    @property
    def group(self) -> str:
        """The kind, with "-ref" when the person is shown by a reference portrait."""
        return self.kind + ("-ref" if self.reference is not None else "")

    @property
    def chance(self) -> float:
        """The accuracy of a blind guess among the possible answers."""
        return 1.0 / len(self.options) if self.options else 0.0


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------


def _absent_identity(info: toy.SceneInfo, rng: random.Random, pool: Sequence[toy.Identity],
                     hard_share: float, visible: Sequence[str] | None = None) -> toy.Identity:
    """Someone of `pool`'s part who is not in the photo; often one trait away from someone who is.

    With `visible` traits given (the "compare" answers), a negative must differ from everyone
    in the photo in at least one of them, and hard negatives change one of them: a person who
    differs only in what the photo cannot show would be a wrong label.
    """
    present = {person.identity for person in info.people}
    heldout = toy.is_heldout(info.people[0].identity)
    traits = list(visible) if visible else list(toy.TRAITS)

    def absent(candidate: toy.Identity) -> bool:
        if candidate in present:
            return False
        return not visible or not comparison(candidate, info, visible)[1]

    if rng.random() < hard_share:
        for _ in range(20):
            base = rng.choice(info.people).identity
            trait = rng.choice(traits)
            value = rng.choice([v for v in toy.TRAITS[trait] if v != getattr(base, trait)])
            candidate = dataclasses.replace(base, **{trait: value})
            if absent(candidate) and toy.is_heldout(candidate) == heldout:
                return candidate
    while True:
        candidate = pool[rng.randrange(len(pool))]
        if absent(candidate):
            return candidate


def comparison(identity: toy.Identity, info: toy.SceneInfo,
               traits: Sequence[str] = COMPARE_TRAITS) -> tuple[str, bool]:
    """The description of `identity` checked against everyone in the photo, left to right,
    trait by trait (`templates.comparison`): (the words, whether someone matches in all).

        "left red hair red same dark skin tan different long style long same mismatch right ..."

    A balanced Yes/No label depends only on whether description and photo agree, which gives a
    fresh LM no gradient until an equality circuit forms; spelled out like this, every word
    has a direct signal (copy the described value, read the photo, compare), and the final
    Yes/No only has to see whether a "match" was written (../shared/studies/pocket-recognition:
    chance -> 0.96 held out for three traits on one-person photos).
    """
    keys = [DESCRIPTION_KEYS[trait] for trait in traits]
    return recognition_templates.comparison(identity.trait_words(), info.people_traits(), keys)


def _name_token(rng: random.Random, config: LvlmTrainConfig) -> bool:
    return config.name_share > 0 and rng.random() < config.name_share


def _mcq(question: str, values: Sequence[str], correct: str, rng: random.Random,
         config: LvlmTrainConfig) -> tuple[str, str, tuple[str, ...]]:
    """(prompt in the evaluation's format, answer, the possible first answer words).

    With `mcq_answer="letter"` the answer is the correct letter ("B") and the possible first
    words are the letters. With "value_letter" it is the value, then its letter ("red B"), and
    the first word is among the option values: a fresh LM answering the letter alone stays at
    chance (the letter depends only on where the value stands among the options, no direct
    signal), while saying the value first gives every word one (bench/mcq_study.py: 0.42 vs
    0.75 held out after 1,200 steps). The evaluation reads the letter where it stands
    (`answers.parse_mcq_answer`).
    """

    if config.mcq_answer not in MCQ_ANSWERS:
        raise ValueError(f"mcq_answer must be one of {', '.join(MCQ_ANSWERS)}, got {config.mcq_answer!r}")
    choice, letter = toy._multiple_choice(values, correct, rng)
    prompt = mcq_prompt(question, list(choice.items()))
    if config.mcq_answer == "letter":
        return prompt, letter, tuple(choice)
    return prompt, f"{correct} {letter}", tuple(choice.values())


def _named(text: str, name: str) -> str:
    return text.replace(recognition_templates.PLACEHOLDER, f"<{name}>")


def _pick_kind(shares: Sequence[tuple[str, float]], point: float) -> str:
    """The kind whose slice of the cumulative shares holds `point`."""
    for kind, share in shares:
        if point < share:
            return kind
        point -= share
    return shares[-1][0]


PortraitMaker = Callable[[toy.Identity], int]  # renders a portrait, returns its photo index


def _introduce(identity: toy.Identity, rng: random.Random, config: LvlmTrainConfig,
               portrait: PortraitMaker | None) -> tuple[dict[str, str], int | None]:
    """How the prompt introduces the person: a description sentence, or (a share
    `reference_share` of the time, when photos can be added) a reference portrait in the
    sentence's place ("<name> is <image>.")."""
    if portrait is not None and config.reference_share > 0 and rng.random() < config.reference_share:
        return {identity.name: IMAGE_PLACEHOLDER}, portrait(identity)
    return {identity.name: describe(identity, config.description)}, None


def scene_rows(info: toy.SceneInfo, image: int, rng: random.Random, pool: Sequence[toy.Identity],
               config: LvlmTrainConfig, count: int, portrait: PortraitMaker | None = None) -> list[Row]:
    """`count` rows about one photo, kinds drawn by the configured shares."""
    shares = [("scene", config.scene_share), ("recognition", config.recognition_share),
              ("about", config.about_share)]
    if config.which_share > 0:
        shares.append(("which", config.which_share))
    if config.pair_share > 0:
        shares.append(("pair", config.pair_share))
    if config.named_caption_share > 0:
        shares.append(("named-caption", config.named_caption_share))
    total = sum(share for _, share in shares)
    generic = toy.scene_qa(info, rng)
    rows: list[Row] = []
    for _ in range(count):
        kind = _pick_kind(shares, rng.random() * total)
        if kind == "scene":
            question, answer = generic[rng.randrange(len(generic))]
            rows.append(Row("scene", question, answer, image, options=_open_options(answer)))
        elif kind == "which":
            count = rng.randint(2, config.which_max) if config.which_max > 2 else 2
            rows.append(which_row(info, image, rng, pool, config, count=count))
        elif kind == "pair":
            rows.append(pair_row(info, image, rng, pool, config))
        elif kind == "named-caption":
            rows.append(named_caption_row(info, image, rng, pool, config))
        elif kind == "recognition":
            positive = rng.random() < 0.5
            compare = config.recognition_answer == "compare"
            who = rng.choice(info.people).identity if positive else \
                _absent_identity(info, rng, pool, config.hard_negative_share,
                                 config.compare_traits if compare else None)
            name = who.name
            question = _named(rng.choice(recognition_templates.RECOGNITION_QUESTIONS), name)
            answers = recognition_templates.POSITIVE_ANSWERS if positive else recognition_templates.NEGATIVE_ANSWERS
            answer = _named(rng.choice(answers), name)
            if compare:
                answer = comparison(who, info, config.compare_traits)[0] + ". " + answer
                if config.recall:
                    answer = recall(who, config) + ". " + answer
            descriptions, reference = _introduce(who, rng, config, portrait)
            row = Row("recognition", question, answer, image, descriptions, ("Yes", "No"), reference,
                      _name_token(rng, config))
            if compare and reference is None and config.crowd_share > 0 and rng.random() < config.crowd_share:
                row = crowd_row(row, who, info, rng, pool, config)
            rows.append(row)
        else:
            person = rng.choice(info.people)
            name = person.identity.name
            descriptions, reference = _introduce(person.identity, rng, config, portrait)
            mcq = rng.random() < config.mcq_share
            if mcq:
                kind_name = rng.choice(tuple(toy._VISUAL_QUESTIONS))
                template, values = toy._VISUAL_QUESTIONS[kind_name]
                question, answer, firsts = _mcq(_named(template, name), values,
                                                toy._visual_answer(kind_name, person, info), rng, config)
            else:
                qa = toy.scene_qa_about(person.identity, info, rng)
                question, answer = qa[rng.randrange(len(qa))]
                question, firsts = _named(question, name), _open_options(answer)
            if config.about_answer == "compare":  # find the person first, then answer about them
                answer = comparison(person.identity, info, config.compare_traits)[0] + ". " + answer
                firsts = ()  # the first answer word is a place, not one of the answers
            rows.append(Row("about", question, answer, image, descriptions, firsts, reference,
                            _name_token(rng, config), mcq=mcq))
    return rows


WHICH_ANSWER_STYLES = ("full", "short", "named", "places")
NEITHER_ANSWER = "neither is in this photo."
NOBODY_ANSWER = "nobody is in this photo."


def crowd_row(row: Row, asked: toy.Identity, info: toy.SceneInfo, rng: random.Random,
              pool: Sequence[toy.Identity], config: LvlmTrainConfig) -> Row:
    """`row` (a "compare" recognition question about `asked`) with 1 to 3 more people described
    in the preamble, every sentence in a random place among them.

    The others are people in the photo who are not asked about (as often as there are some)
    and people absent from it. The answer stays the asked person's comparison and verdict: only
    the asked description is checked against each person in the photo, so the LM must copy the
    stated values from the sentence of the name the question asks about, not from whichever
    sentence is nearest. Every name is a name token of its own (`encode_rows`), as PLVM's
    concept table gives each concept its own word.
    """
    others: list[toy.Identity] = []
    for _ in range(rng.randint(1, 3)):
        taken = {asked, *others}
        present = [person.identity for person in info.people if person.identity not in taken]
        if present and rng.random() < 0.5:
            others.append(rng.choice(present))
            continue
        candidate = _absent_identity(info, rng, pool, config.hard_negative_share, config.compare_traits)
        if candidate not in taken:
            others.append(candidate)
    people = [asked, *others]
    rng.shuffle(people)
    descriptions = {person.name: describe(person, config.description) for person in people}
    return dataclasses.replace(row, descriptions=descriptions, name_token=True)


def recall(identity: toy.Identity, config: LvlmTrainConfig) -> str:
    """"<name> skin tan hair red style long": the asked person's name, then the compared traits
    as their description states them (in its order), what a recognition answer with `recall`
    says before its comparison.

    With several people described, the comparison's stated values must come from the asked
    person's sentence. Saying the name first turns finding that sentence into the induction
    pattern the copy warm-up teaches (the word after the earlier occurrence of the word just
    said); the comparison then copies its stated values from these few words right before it.
    """
    keys = [DESCRIPTION_KEYS[trait] for trait in DESCRIPTION_KEYS if trait in config.compare_traits]
    words = identity.trait_words()
    return f"<{identity.name}> " + " ".join(f"{key} {words[key]}" for key in keys)


def _match_places(identity: toy.Identity, info: toy.SceneInfo, traits: Sequence[str]) -> str:
    """"left mismatch right match": each person's place and whether `identity` matches them in
    every one of `traits` (the last word of each person's `comparison`, without the rest)."""
    words = []
    for place, seen in info.people_traits():
        stated = identity.trait_words()
        same = all(stated[DESCRIPTION_KEYS[trait]] == seen[DESCRIPTION_KEYS[trait]] for trait in traits)
        words += [place, recognition_templates.MATCH if same else recognition_templates.MISMATCH]
    return " ".join(words)


def which_answer(asked: Sequence[toy.Identity], info: toy.SceneInfo, config: LvlmTrainConfig) -> str:
    """The answer to "Which of <a> and <b> is in this photo?" (`asked`: a and b), "Which of <a>,
    <b> and <c>" or "Who of <a>, <b>, <c> and <d>": a reasoning per person asked about, in the
    question's order, then who is there ("<b> is in this photo.", one such sentence a person
    there, in the question's order), or "neither is in this photo." (two asked) / "nobody is in
    this photo." (more).

    The "full" and "short" reasonings never name anyone, so the first name such an answer says
    is the verdict's (`answers.parse_which` reads the first one named). `which_answer="full"`: each
    person's `comparison` with everyone in the photo (14 words a person in the photo and a
    person asked about); "short": only each place and match / mismatch (2 words); "named": the
    full comparison with the person's `<name>` in front of it, so that on a base with name tags
    each comparison carries the vector of the person it is about (the name switches the tag);
    the evaluation reads the names of the conclusion only (`answers.conclusion`). "places": a part
    per person in the photo instead, naming the asked person who agrees most with them
    (`places_reasoning`); its verdict names who is there in the photo's order.
    """
    if config.which_answer not in WHICH_ANSWER_STYLES:
        raise ValueError(f"which_answer must be one of {', '.join(WHICH_ANSWER_STYLES)}, "
                         f"got {config.which_answer!r}")
    if config.which_answer == "places":
        parts, shown = places_reasoning(asked, info, config.compare_traits, config.places_lookup)
    else:
        parts, shown = [], []
        for person in asked:
            words, found = comparison(person, info, config.compare_traits)
            if config.which_answer == "short":
                words = _match_places(person, info, config.compare_traits)
            parts.append(f"<{person.name}> {words}" if config.which_answer == "named" else words)
            if found:
                shown.append(person)
    verdict = " ".join(recognition_templates.WHICH_ANSWERS[0].format(shown=person.name) for person in shown)
    return ". ".join(parts) + ". " + (verdict or (NEITHER_ANSWER if len(asked) == 2 else NOBODY_ANSWER))


PLACES_LOOKUPS = ("most", "first")


def places_reasoning(asked: Sequence[toy.Identity], info: toy.SceneInfo, traits: Sequence[str],
                     lookup: str = "most") -> tuple[list[str], list[toy.Identity]]:
    """The "places" reasoning of a which / who answer: one part per person in the photo, left
    to right, and who of `asked` matched someone, in that order.

        "left red hair dark skin long style <b> hair red same skin tan different style long same mismatch"

    Each part reads the person's values first (as `comparison` does, value before key), then
    names the asked person whose description agrees with them in the most traits (on a tie,
    one not matched yet, then the first in the question's order: two look-alikes in the photo
    match two look-alikes asked about), checks that description trait by trait and ends
    "match" or "mismatch". Finding the candidate is a lookup by content: the values just
    written against the sentences in the prompt, each of whose words carries its person's
    name tag. Its length grows with the people in the photo, not with the people asked
    about, and no part needs to know which name comes next in the question (what the
    "named" answers got wrong: they named the first person again, docs/several-people.md).

    `lookup="first"` narrows the lookup to one word: the part names the asked person whose
    first trait (hair colour) is the one just read, the most agreeing of them if several, and
    says "nobody mismatch" when no one asked has it ("left red hair tan skin curly style nobody
    mismatch"); finding that person is matching one word, as an induction head does."""
    if lookup not in PLACES_LOOKUPS:
        raise ValueError(f"places_lookup must be one of {', '.join(PLACES_LOOKUPS)}, got {lookup!r}")
    keys = [DESCRIPTION_KEYS[trait] for trait in traits]
    parts: list[str] = []
    shown: list[toy.Identity] = []
    for place, seen in info.people_traits():
        def agreement(person: toy.Identity) -> int:
            stated = person.trait_words()
            return sum(stated[key] == seen[key] for key in keys)

        read = " ".join(f"{seen[key]} {key}" for key in keys)
        candidates = list(asked) if lookup == "most" else \
            [person for person in asked if person.trait_words()[keys[0]] == seen[keys[0]]]
        if not candidates:
            parts.append(f"{place} {read} nobody {recognition_templates.MISMATCH}")
            continue
        best = max(candidates, key=lambda person: (agreement(person), person not in shown))
        stated = best.trait_words()
        same = {key: recognition_templates.SAME if stated[key] == seen[key] else recognition_templates.DIFFERENT
                for key in keys}
        checks = " ".join(f"{key} {stated[key]} {same[key]}" for key in keys)
        everything = agreement(best) == len(keys)
        verdict = recognition_templates.MATCH if everything else recognition_templates.MISMATCH
        parts.append(f"{place} {read} <{best.name}> {checks} {verdict}")
        if everything and best not in shown:
            shown.append(best)
    return parts, shown


def _with_absent(asked: list[toy.Identity], count: int, info: toy.SceneInfo, rng: random.Random,
                 pool: Sequence[toy.Identity], config: LvlmTrainConfig) -> list[toy.Identity]:
    """`asked` filled up to `count` people with distinct people absent from the photo
    (`_absent_identity`: half of them one visible trait away from someone there)."""
    while len(asked) < count:
        candidate = _absent_identity(info, rng, pool, config.hard_negative_share, config.compare_traits)
        if candidate not in asked:
            asked.append(candidate)
    return asked


def which_row(info: toy.SceneInfo, image: int, rng: random.Random, pool: Sequence[toy.Identity],
              config: LvlmTrainConfig, present: int | None = None, count: int = 2) -> Row:
    """A "Which of <a> and <b> is in this photo?" row (`count` 2; 3: "Which of <a>, <b> and
    <c> ...", 4: "Who of <a>, <b>, <c> and <d> ...", as the evaluation asks them), every person
    asked described in the question's order (as `build_prompt` puts them), the answer
    `which_answer`.

    `present` people of the asked are in the photo: for two, 1 (the evaluation's case, drawn
    60 % of the time), 2 (20 %, when the photo holds two people) or 0 (otherwise); for more,
    0 up to as many as the photo holds, at random. The others are absent, half of them one
    visible trait away from someone there. The names are in a random order.
    """
    people = [person.identity for person in info.people]
    if present is None:
        if count == 2:
            draw = rng.random()
            present = 1 if draw < 0.6 else 2 if draw < 0.8 and len(people) >= 2 else 0
        else:
            present = rng.randint(0, min(count, len(people)))
    asked = _with_absent(rng.sample(people, present), count, info, rng, pool, config)
    rng.shuffle(asked)
    names = [person.name for person in asked]
    if count == 2:
        question = rng.choice(recognition_templates.WHICH_QUESTIONS).format(a=names[0], b=names[1])
    else:
        question = (WHICH_OF_QUESTION if count == 3 else WHO_OF_QUESTION).format(names=name_list(names))
    descriptions = {person.name: describe(person, config.description) for person in asked}
    return Row("which", question, which_answer(asked, info, config), image, descriptions,
               name_token=True)


def pair_row(info: toy.SceneInfo, image: int, rng: random.Random, pool: Sequence[toy.Identity],
             config: LvlmTrainConfig) -> Row:
    """"Is <a> to the left of <b>?" (half the rows, when the photo holds two people or more,
    both of them there) or "Are <a> and <b> both in this photo?" (both there, when they can be,
    half the time; otherwise one of them or, one time in five, neither), as `eval --pairs` asks
    them.

    Both people are described in the question's order. The answer compares each, named, as a
    "named" which answer does (`which_answer`), then concludes: "Yes." / "No." for left of (the
    place of the first's match before the second's), "Yes, <a> and <b> are both in this
    photo." or "No, only <a> is in this photo." / "No, neither is in this photo." for both.
    With `pairs_by_place`, the reasoning is a part per person in the photo (`places_reasoning`).
    """
    people = [person.identity for person in info.people]
    if len(people) >= 2 and rng.random() < 0.5:
        asked = rng.sample(people, 2)
        places = {person.identity: toy.POSITIONS.index(person.position) for person in info.people}
        question = LEFT_OF_QUESTION.format(a=asked[0].name, b=asked[1].name)
        verdict = "Yes." if places[asked[0]] < places[asked[1]] else "No."
    else:
        present = 2 if len(people) >= 2 and rng.random() < 0.5 else 1 if rng.random() < 0.8 else 0
        asked = _with_absent(rng.sample(people, present), 2, info, rng, pool, config)
        rng.shuffle(asked)
        question = BOTH_HERE_QUESTION.format(a=asked[0].name, b=asked[1].name)
        shown = [person for person in asked if person in people]
        verdict = ("No, " + NEITHER_ANSWER if not shown else
                   recognition_templates.BOTH_NO[0].format(shown=shown[0].name) if len(shown) == 1 else
                   recognition_templates.BOTH_YES[0].format(a=asked[0].name, b=asked[1].name))
    if config.pairs_by_place:
        parts = places_reasoning(asked, info, config.compare_traits, config.places_lookup)[0]
    else:
        parts = [f"<{person.name}> " + comparison(person, info, config.compare_traits)[0] for person in asked]
    descriptions = {person.name: describe(person, config.description) for person in asked}
    return Row("pair", question, ". ".join(parts) + ". " + verdict, image, descriptions, name_token=True)


def named_caption_row(info: toy.SceneInfo, image: int, rng: random.Random, pool: Sequence[toy.Identity],
                      config: LvlmTrainConfig) -> Row:
    """"Describe this photo." (`CAPTION_QUESTION`, as `eval --captions` asks it) with 1 to 3
    people described: up to two of those in the photo and one or more absent ones (half of
    them one visible trait away from someone there), in a random order.

    The answer compares each described person, named, with everyone in the photo (as a "named"
    which answer does), then describes the photo place by place, one sentence a place, in
    `scene_caption`'s words, except that a described person there is said by their `<name>`
    and what they wear and show: "... mismatch. left <a> shirt blue smiling. middle nobody.
    right hair red curly shirt green skin tan face round glasses neutral." The evaluation reads
    who is named from the sentences after the last comparison (`answers.conclusion`). With
    `pairs_by_place`, the comparisons are a part per person in the photo (`places_reasoning`).
    """
    people = [person.identity for person in info.people]
    asked = rng.sample(people, rng.randint(0, min(2, len(people))))
    for _ in range(rng.randint(1, 3 - len(asked)) if len(asked) < 2 else 1):
        candidate = _absent_identity(info, rng, pool, config.hard_negative_share, config.compare_traits)
        if candidate not in asked:
            asked.append(candidate)
    rng.shuffle(asked)
    if config.pairs_by_place:
        parts = [part + "." for part in places_reasoning(asked, info, config.compare_traits, config.places_lookup)[0]]
    else:
        parts = [f"<{person.name}> " + comparison(person, info, config.compare_traits)[0] + "." for person in asked]
    for position in toy.POSITIONS:
        person = info.person_at(position)
        if person is None:
            parts.append(f"{position} nobody.")
        elif person.identity in asked:
            parts.append(f"{position} <{person.identity.name}> shirt {person.shirt} {person.expression}.")
        else:
            parts.append(_place_words(position, person) + ".")
    descriptions = {person.name: describe(person, config.description) for person in asked}
    return Row("named-caption", CAPTION_QUESTION, " ".join(parts), image, descriptions, name_token=True)


def _place_words(position: str, person: toy.PersonInScene) -> str:
    """"left hair red curly shirt blue skin tan face round glasses smiling": one place of
    `scene_caption`."""
    who = person.identity
    return " ".join([position, "hair", who.hair_colour, who.hair_style, "shirt", person.shirt, "skin", who.skin,
                     "face", who.face, who.accessory, person.expression])


def scene_caption(info: toy.SceneInfo) -> str:
    """Everything drawn in a photo, place by place, always in the same order: "left hair red
    curly shirt blue skin tan face round glasses smiling middle nobody right ...".

    Caption rows (`caption_rows`) are the dense grounding of LLaVA's first stage: every word
    after a place must be read from that place of the photo, 16 to 36 answer words a photo
    where a question row has one. Measured with `bench/pretrain.py --caption-rows 2
    --caption-steps 300` and `bench/looking.py` (docs/research-log.md): they help the LM pick out the
    person a question names among others.
    """
    return " ".join(f"{position} nobody" if info.person_at(position) is None
                    else _place_words(position, info.person_at(position)) for position in toy.POSITIONS)


def text_row(identity: toy.Identity, rng: random.Random, config: LvlmTrainConfig,
             portrait: PortraitMaker | None = None) -> Row:
    """An attribute question about a described (or portrayed) person, no photo to look at;
    a share `crowd_text_share` of them describes 1 to 3 other people too (`_among_others`)."""
    row = _text_row(identity, rng, config, portrait)
    if config.crowd_text_share > 0 and row.reference is None and rng.random() < config.crowd_text_share:
        row = _among_others(row, identity, rng, config)
    return row


def _among_others(row: Row, identity: toy.Identity, rng: random.Random, config: LvlmTrainConfig) -> Row:
    """`row` with 1 to 3 other people of `identity`'s part described too, the sentences in a
    random order, every name a name token of its own: the answer must be read from the
    sentence of the name asked about, not from the nearest one (the committed base reads a
    hair colour right 0.90 of the time alone, 0.47 with another sentence after the asked one)."""
    pool = toy.heldout_identities() if toy.is_heldout(identity) else toy.training_identities()
    people = [identity]
    while len(people) < 1 + rng.randint(1, 3):
        other = pool[rng.randrange(len(pool))]
        if other not in people:
            people.append(other)
    rng.shuffle(people)
    descriptions = {person.name: describe(person, config.description) for person in people}
    return dataclasses.replace(row, descriptions=descriptions, name_token=True)


def _text_row(identity: toy.Identity, rng: random.Random, config: LvlmTrainConfig,
              portrait: PortraitMaker | None = None) -> Row:
    name = identity.name
    descriptions, reference = _introduce(identity, rng, config, portrait)
    if rng.random() < config.mcq_share:
        trait = rng.choice(tuple(toy._TEXT_QUESTIONS))
        template, values = toy._TEXT_QUESTIONS[trait]
        prompt, answer, firsts = _mcq(_named(template, name), values, getattr(identity, trait), rng, config)
        return Row("text", prompt, answer, None, descriptions, firsts, reference, _name_token(rng, config),
                   mcq=True)
    qa = toy.attribute_qa(identity)
    question, answer = qa[rng.randrange(len(qa))]
    return Row("text", _named(question, name), answer, None, descriptions, _open_options(answer), reference,
               _name_token(rng, config))


_VALUE_SETS: list[tuple[str, ...]] = [tuple(values) for values in toy.TRAITS.values()] + [
    tuple(toy.SHIRT_COLOURS), toy.EXPRESSIONS, toy.POSITIONS, tuple(toy.BACKGROUND_COLOURS),
    ("Yes", "No"), ("0", "1", "2"), ("1", "2", "3")]


def _open_options(answer: str) -> tuple[str, ...]:
    """The smallest value set of the toy world that holds a one-word open answer."""
    sets = [values for values in _VALUE_SETS if answer in values]
    return min(sets, key=len) if sets else ()


def sample_step(rng: random.Random, pool: Sequence[toy.Identity], config: LvlmTrainConfig,
                scene_size: int = 96, portrait_size: int = 64,
                scenes: int | None = None, n_people: int | None = None
                ) -> tuple[list[Row], list[Image.Image], list[toy.SceneInfo | None]]:
    """Fresh photos, their rows and what is in each photo (None for portraits), for one step
    (all people from `pool`; `n_people` a photo, or 1 to 3 at random)."""
    images: list[Image.Image] = []
    infos: list[toy.SceneInfo | None] = []
    rows: list[Row] = []

    def portrait(identity: toy.Identity) -> int:
        images.append(toy.render_portrait(identity, rng, size=portrait_size))
        infos.append(None)
        return len(images) - 1

    for _ in range(config.scenes_per_step if scenes is None else scenes):
        subject = pool[rng.randrange(len(pool))]
        image, info = toy.random_scene(subject, rng, pool, n_people=n_people, size=scene_size)
        images.append(image)
        infos.append(info)
        rows += scene_rows(info, len(images) - 1, rng, pool, config, config.rows_per_scene, portrait)
        rows += [Row("caption", CAPTION_PROMPT, scene_caption(info), len(images) - 1)] * config.caption_rows
    for _ in range(config.describe_rows_per_step):
        identity = pool[rng.randrange(len(pool))]
        rows.append(Row("describe", DESCRIBE_PROMPT, describe(identity, config.description),
                        portrait(identity)))
    for _ in range(config.text_rows_per_step):
        rows.append(text_row(pool[rng.randrange(len(pool))], rng, config, portrait))
    for _ in range(config.portrait_rows_per_step):
        rows.append(portrait_row(pool[rng.randrange(len(pool))], rng, portrait))
    return rows, images, infos


def portrait_row(identity: toy.Identity, rng: random.Random, portrait: PortraitMaker) -> Row:
    """A portrait of `identity` and an attribute question about "the person" in it ("What
    colour is the person's hair?" -> "red"): what a per-concept trainer (Yo'LLaVA) asks the
    base model about its photos to write its training conversations."""
    from ..train.data import neutral_question

    question, answer = rng.choice(toy.attribute_qa(identity))
    return Row("portrait", neutral_question(question), answer, portrait(identity), options=_open_options(answer))


# --------------------------------------------------------------------------------------------
# Encoding and the forward pass
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded; a row's name token is `name_id`
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T] answer tokens, -100 elsewhere
    image_index: list[int]  # the photos of the rows, in order of appearance (reference first)
    prompt_lengths: list[int]
    name_id: int | None = None  # the id of a row's (first) own name token (the vocabulary size)
    names_per_row: list[int] = field(default_factory=list)  # name tokens of each row (its i-th: name_id + i)


def _name_slots(segments: list, names: Sequence[str]) -> list:
    """Segments with every `<name>` of `names` inside text turned into a `Slot`."""
    out: list = []
    for segment in segments:
        out += split_names(segment, names) if isinstance(segment, str) else [segment]
    return out


def row_prompt(row: Row) -> list:
    """The row's prompt segments as `build_prompt` writes them, with every described person's
    sentence in the preamble in the order of `row.descriptions` (a question about one person
    of several need not have its person's sentence first)."""
    if len(row.descriptions) <= 1:
        return build_prompt(row.question, template=POCKET, has_image=row.image is not None,
                            descriptions=row.descriptions, literal_names=True)
    preamble = [f" <{name}> is {text.strip().rstrip('.')}." for name, text in row.descriptions.items()]
    return POCKET.render([row.question], preamble, row.image is not None)


def encode_rows(rows: Sequence[Row], tokenizer, num_image_tokens: int, name_id: int | None = None,
                with_answers: bool = True) -> Batch:
    """Prompt (exactly as at inference) + " answer" + EOS; labels on the answer only.

    A row with `name_token` has its person's `<name>` (in the description sentence, the
    question and the answer) as `name_id`, the one id above the vocabulary that `NameTokens`
    gives a fresh embedding per row; other rows keep the name as literal text, as the
    text-prompt and no-prompt baselines show it. A row describing several people gives the
    i-th of them `name_id + i`, a name token of its own, as the concept table numbers concepts.
    `with_answers=False` encodes prompts only.
    """
    def no_slot(slot):
        raise PlvmError(f"unexpected concept slot {slot} in a base-model prompt")

    sequences, labels, lengths, image_index, counts = [], [], [], [], []
    for row in rows:
        segments = row_prompt(row)
        answer_segments = [" " + row.answer.strip()] if with_answers else []
        slot = no_slot
        names = list(row.descriptions)
        counts.append(len(names) if row.name_token else 0)
        if row.name_token:
            if name_id is None:
                raise PlvmError("a row with a name token needs name_id (the vocabulary size)")

            def slot(found, names=names):
                return name_id + names.index(found.name)

            segments, answer_segments = _name_slots(segments, names), _name_slots(answer_segments, names)
        prompt = encode_segments(segments, tokenizer, slot_id=slot, image_token_id=IMAGE_ID,
                                 num_image_tokens=num_image_tokens)
        answer = encode_segments(answer_segments, tokenizer, slot_id=slot, image_token_id=IMAGE_ID,
                                 num_image_tokens=num_image_tokens, add_bos=False)
        answer = answer + [EOS_ID] if with_answers else []
        sequences.append(prompt + answer)
        labels.append([IGNORE] * len(prompt) + answer)
        lengths.append(len(prompt))
        if row.reference is not None:  # in the preamble, before the question's photo
            image_index.append(row.reference)
        if row.image is not None:
            image_index.append(row.image)
    return Batch(*padded(sequences, labels), image_index, lengths, name_id, counts)


def padded(sequences: Sequence[list[int]], labels: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) [B, T], right-padded to the longest row (PAD_ID, 0 and
    IGNORE after each row's end)."""
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.full((len(sequences), width), IGNORE, dtype=torch.long)
    for i, (sequence, label) in enumerate(zip(sequences, labels)):
        ids[i, :len(sequence)] = torch.tensor(sequence)
        mask[i, :len(sequence)] = 1
        target[i, :len(label)] = torch.tensor(label)
    return ids, mask, target


def text_group(pool: Sequence[toy.Identity], rng: random.Random, config: LvlmTrainConfig) -> list[Row]:
    """The turns of one dense text row: 1 person described, or 2-4 with share
    `dense_several_share` (in a random order, every name a name token of its own), then
    `dense_questions` attribute questions (open or multiple choice, as `text_row` asks them)
    about them, each person as often as any other (within one), in a shuffled order."""
    people = [pool[rng.randrange(len(pool))]]
    if rng.random() < config.dense_several_share:
        wanted = 1 + rng.randint(1, 3)
        while len(people) < wanted:
            other = pool[rng.randrange(len(pool))]
            if other not in people:
                people.append(other)
    rng.shuffle(people)
    descriptions = {person.name: describe(person, config.description) for person in people}
    asked = [people[i % len(people)] for i in range(config.dense_questions)]
    rng.shuffle(asked)
    plain = dataclasses.replace(config, reference_share=0.0, crowd_text_share=0.0)
    return [dataclasses.replace(_text_row(person, rng, plain), descriptions=descriptions, name_token=True)
            for person in asked]


def encode_dense(groups: Sequence[Sequence[Row]], tokenizer, num_image_tokens: int, name_id: int) -> Batch:
    """One sequence per group of text rows that describe the same people in the same order:
    the first row's prompt and answer, then each further row's turn (from its `user` token on)
    and answer, "user: <question> assistant: <answer></s>". Labels on every answer;
    `prompt_lengths` is the first turn's prompt, so the first turn is exactly the one-question
    row. A reading row holds one lookup (the asked name's sentence, then the trait's value in
    it); a dense row holds many, which is what makes that lookup learnable
    (docs/research-log.md, bench/name_binding.py)."""
    user = tokenizer.convert_tokens_to_ids(POCKET.user)
    sequences, labels, lengths, counts = [], [], [], []
    for group in groups:
        if not group or any(row.image is not None or row.descriptions != group[0].descriptions for row in group):
            raise PlvmError("a dense group is one or more text rows with the same descriptions")
        batch = encode_rows(group, tokenizer, num_image_tokens, name_id=name_id)
        preamble: list[int] = []
        sequence: list[int] = []
        label: list[int] = []
        for i in range(len(group)):
            length = int(batch.attention_mask[i].sum())
            ids = batch.input_ids[i, :length].tolist()
            start = ids.index(user)
            if i == 0:
                preamble, start = ids[:start], 0
            elif ids[:start] != preamble:
                raise PlvmError("a dense group's rows must encode the same preamble")
            sequence += ids[start:]
            label += batch.labels[i, start:length].tolist()
        sequences.append(sequence)
        labels.append(label)
        lengths.append(batch.prompt_lengths[0])
        counts.append(batch.names_per_row[0])
    return Batch(*padded(sequences, labels), [], lengths, name_id, counts)


def dense_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every answer token of the batch (logits at t predict t + 1):
    each lookup weighs the same, however many a row holds."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def pixel_values(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's pixel values ([N, 3, S, S]); toy photos are square already, so this is
    what `Backbone.pixel_values` gives at inference ("pad" to square is a no-op)."""
    return image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")["pixel_values"]


def image_tokens(model: LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """The projected image features [N, P, H]: what the LM reads in each photo's `<image>` slots."""
    features = model.model.get_image_features(
        pixel_values=pixels, vision_feature_layer=model.config.vision_feature_layer,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        return_dict=True).pooler_output
    return torch.stack(list(features))


def name_vectors(model, rows: int, count: int = 1) -> torch.Tensor:
    """[rows, H] fresh name embeddings, one per batch row, at the scale of the word embeddings
    ([rows, count, H] with `count` above 1: a row's several names, `encode_rows`).

    What a name is to the pocket LM: a vector it has never seen, used as the input embedding
    of `<name>` AND as that name's output-head row, exactly as the concept table puts a
    concept's word and head around the model at ask time. Trained on fresh random names, the
    LM learns to say whatever name the prompt introduced ("yes, <gozisu> is in this photo").
    """
    scale = model.get_input_embeddings().weight.detach().float().std()
    if count > 1:
        return torch.randn(rows, count, model.config.text_config.hidden_size) * scale
    return torch.randn(rows, model.config.text_config.hidden_size) * scale


def forward_logits(model: LlavaForConditionalGeneration, batch: Batch, pixels: torch.Tensor | None,
                   *, return_features: bool = False, features: torch.Tensor | None = None,
                   names: torch.Tensor | None = None, tags: torch.Tensor | None = None):
    """Logits [B, T, V] ([B, T, V + 1] when the batch has name tokens: the last column is each
    row's own name) and, with `return_features`, the projected image features [N, P, H] or
    None. The vision tower runs once per photo (or not at all when `features` are given); rows
    showing the same photo share its features (scattered into their `<image>` slots in row
    order). `names` ([B, H]) fixes the name embeddings (fresh ones otherwise). A batch whose
    rows hold several names each has `names` [B, N, H] and N name columns; a row's columns
    past its own names are never predicted (the lowest logit), as the concept table allows
    each row only its own concepts. `tags` ([B, T], -1 for none) adds the row's name of that
    index to each tagged token's embedding; a model whose config has name tags
    (`plvmctl.name_tags`) gets them by the rule it was trained with unless `tags` are given."""
    vocab = model.config.text_config.vocab_size
    virtual = batch.input_ids >= vocab  # [B, T] name tokens
    embeds = model.get_input_embeddings()(batch.input_ids.clamp(max=vocab - 1))  # [B, T, H]
    if features is None and pixels is not None and len(pixels):
        features = image_tokens(model, pixels)  # [N, P, H]
    if features is not None and batch.image_index:
        per_row = features[torch.tensor(batch.image_index)]  # [B_img, P, H]
        mask = (batch.input_ids == IMAGE_ID).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, per_row.reshape(-1, embeds.shape[-1]).to(embeds.dtype))
    with_names = bool(virtual.any()) or names is not None
    if with_names:
        names = name_vectors(model, len(embeds), max(batch.names_per_row, default=1)) if names is None else names
        if names.dim() == 2:
            embeds = torch.where(virtual.unsqueeze(-1), names.unsqueeze(1).to(embeds.dtype), embeds)
        else:
            which = (batch.input_ids - vocab).clamp(min=0, max=names.shape[1] - 1)  # [B, T]
            chosen = torch.gather(names, 1, which.unsqueeze(-1).expand(-1, -1, names.shape[-1]))  # [B, T, H]
            embeds = torch.where(virtual.unsqueeze(-1), chosen.to(embeds.dtype), embeds)
        stops = tag_stop_ids(model.config)
        if tags is None and stops is not None:  # a base trained with name tags reads them always
            tags, _ = name_tags(batch.input_ids.tolist(), vocab, max(batch.names_per_row, default=1), stops)
        if tags is not None:
            embeds = add_tags(embeds, tags, names if names.dim() == 3 else names.unsqueeze(1))
    hidden = model.model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                         use_cache=False).last_hidden_state  # [B, T, H]
    logits = model.lm_head(hidden)
    if with_names and names.dim() == 2:
        name_logits = (hidden * names.unsqueeze(1).to(hidden.dtype)).sum(-1, keepdim=True)  # [B, T, 1]
        logits = torch.cat([logits, name_logits.to(logits.dtype)], dim=-1)
    elif with_names:
        name_logits = torch.einsum("bth,bnh->btn", hidden, names.to(hidden.dtype))  # [B, T, N]
        owned = torch.tensor([max(1, count) for count in batch.names_per_row] or [1] * len(embeds))
        beyond = torch.arange(names.shape[1]).unsqueeze(0) >= owned.unsqueeze(1)  # [B, N]
        name_logits = name_logits.masked_fill(beyond.unsqueeze(1), torch.finfo(name_logits.dtype).min)
        logits = torch.cat([logits, name_logits.to(logits.dtype)], dim=-1)
    return (logits, features) if return_features else logits


def _with_own_photos(chunk: Sequence[Row]) -> tuple[list[Row], list[int]]:
    """`chunk`'s rows with their photo indexes renumbered 0, 1, ... in order of appearance,
    and the original indexes in that order (what to take from the caller's pixels)."""
    remap: dict[int, int] = {}  # photo index -> position in this chunk's pixels
    for row in chunk:
        for index in (row.reference, row.image):
            if index is not None:
                remap.setdefault(index, len(remap))
    local = [dataclasses.replace(row, image=None if row.image is None else remap[row.image],
                                 reference=None if row.reference is None else remap[row.reference])
             for row in chunk]
    return local, sorted(remap, key=remap.get)


@torch.no_grad()
def generate_answers(model, tokenizer, rows: Sequence[Row], pixels: torch.Tensor | None,
                     max_new_tokens: int = 64, batch_rows: int = 48) -> list[str]:
    """Greedy answers to `rows` (their `answer` is ignored), a row's name token written back
    as `<name>`. `pixels` holds the photos the rows' `image` / `reference` index."""
    vocab = model.config.text_config.vocab_size
    answers: list[str] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        local, order = _with_own_photos(chunk)
        batch = encode_rows(local, tokenizer, num_image_tokens(model), name_id=vocab, with_answers=False)
        features = image_tokens(model, pixels[order]) if order else None
        names = name_vectors(model, len(chunk), max(batch.names_per_row, default=1))
        lengths = torch.tensor(batch.prompt_lengths)
        width = int(lengths.max()) + max_new_tokens
        ids = torch.full((len(chunk), width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        ids[:, :batch.input_ids.shape[1]] = batch.input_ids
        mask[:, :batch.attention_mask.shape[1]] = batch.attention_mask
        done = torch.zeros(len(chunk), dtype=torch.bool)
        out: list[list[int]] = [[] for _ in chunk]
        rowsel = torch.arange(len(chunk))
        for step in range(max_new_tokens):
            end = int((lengths + step).max())
            current = dataclasses.replace(batch, input_ids=ids[:, :end], attention_mask=mask[:, :end])
            logits = forward_logits(model, current, None, features=features, names=names)
            scores = logits[rowsel, lengths + step - 1]
            scores[:, [IMAGE_ID, PAD_ID, BOS_ID]] = float("-inf")  # never said (an untrained model might)
            token = scores.argmax(-1)
            for i in range(len(chunk)):
                if not done[i]:
                    if int(token[i]) == EOS_ID:
                        done[i] = True
                    else:
                        out[i].append(int(token[i]))
            if bool(done.all()):
                break
            ids[rowsel, lengths + step] = token
            mask[rowsel, lengths + step] = 1
        for row, tokens in zip(chunk, out):
            words, run = [], []
            for token in tokens + [None]:
                if token is None or token >= vocab:
                    if run:
                        words.append(tokenizer.decode(run, skip_special_tokens=True))
                        run = []
                    if token is not None:
                        said = list(row.descriptions)[token - vocab:token - vocab + 1] or ["name"]
                        words.append(f"<{said[0]}>")
                else:
                    run.append(token)
            answers.append(" ".join(word for word in words if word))
    return answers


PROBE_TRAITS: dict[str, tuple[str, ...]] = {"shirt": tuple(toy.SHIRT_COLOURS),
                                            "expression": toy.EXPRESSIONS, **toy.TRAITS}


def probe_value(person: toy.PersonInScene, name: str) -> str:
    """What `person` shows for one of `PROBE_TRAITS`: the shirt and expression of this photo,
    or a trait of their identity."""
    return getattr(person, name) if name in ("shirt", "expression") else getattr(person.identity, name)


class VisionProbe(torch.nn.Module):
    """Throw-away linear heads that read, from the projected image features, what is drawn
    in each third of the photo (each trait of the person there, or "nobody") and the
    background colour.

    An auxiliary loss for pretraining only (not saved): the answer tokens alone give the
    vision tower a thin, slow signal; these dense labels, free in the toy world, teach it
    to see in a fraction of the steps. The LM still has to learn to use what it sees.
    """

    def __init__(self, hidden: int, grid: int, position_weight: float = 0.0) -> None:
        super().__init__()
        if grid < len(toy.POSITIONS):
            raise PlvmError(f"the vision probe needs at least {len(toy.POSITIONS)} patch columns "
                            f"(one per place), got {grid}; use smaller patches or vision_aux_weight=0")
        self.grid = grid
        self.position_weight = position_weight
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(hidden, len(values) + 1)
                                          for name, values in PROBE_TRAITS.items()})
        self.background = torch.nn.Linear(hidden, len(toy.BACKGROUND_COLOURS))
        pool = torch.zeros(len(toy.POSITIONS), grid * grid)  # average the patches of each third
        for row in range(grid):
            for column in range(grid):
                pool[min(len(toy.POSITIONS) - 1, column * len(toy.POSITIONS) // grid), row * grid + column] = 1.0
        self.register_buffer("pool", pool / pool.sum(dim=1, keepdim=True), persistent=False)
        if position_weight > 0:  # made only when used: the committed model's RNG stream stays as it was
            self.column = torch.nn.Linear(hidden, grid)

    def loss(self, features: torch.Tensor, infos: Sequence[toy.SceneInfo | None]) -> torch.Tensor:
        keep = [i for i, info in enumerate(infos) if info is not None]
        if not keep:
            return features.sum() * 0.0
        features = features[torch.tensor(keep)].float()  # [N, P, H]
        regions = torch.einsum("rp,nph->nrh", self.pool, features)  # [N, 3, H]
        total = torch.zeros(())
        for name, values in PROBE_TRAITS.items():
            targets = []
            for index in keep:
                for position in toy.POSITIONS:
                    person = infos[index].person_at(position)
                    targets.append(len(values) if person is None else values.index(probe_value(person, name)))
            logits = self.heads[name](regions).reshape(-1, len(values) + 1)
            total = total + F.cross_entropy(logits, torch.tensor(targets))
        colours = tuple(toy.BACKGROUND_COLOURS)
        background = self.background(features.mean(dim=1))
        total = total + F.cross_entropy(background, torch.tensor([colours.index(infos[i].background.colour)
                                                                  for i in keep]))
        total = total / (len(PROBE_TRAITS) + 1)
        if self.position_weight > 0:
            total = total + self.position_weight * self.position_loss(features)
        return total

    def position_loss(self, features: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each patch's column read from its own feature: whether the image
        tokens say where they are (the region heads above cannot tell, they see region means)."""
        columns = torch.arange(self.grid).repeat(self.grid)  # patches are row-major
        logits = self.column(features.float())  # [N, P, grid]
        return F.cross_entropy(logits.reshape(-1, self.grid), columns.repeat(features.shape[0]))


def copy_warmup_loss(model, rng: random.Random, rows: int = 64, length: int = 16,
                     repeat_share: float = 0.5) -> torch.Tensor:
    """Next-token loss on random-word recall, where only looking back by content helps.

    Each row lists random pairs "k1 v1 k2 v2 ..." (up to `length` words), then a random
    number of filler words, then asks pairs back in a random order: a key to be followed by
    its value ("k3 v3"), or, for a third of the rows, a value to be followed by its key.
    Only the answers carry loss. A stand-in for the text pretraining a real LM has had: it
    builds induction heads (find the word asked about earlier, copy its neighbour), the
    circuit that reading "key value" descriptions, copying the described value into a
    comparison and finding an option's letter all reuse. Lengths, gaps and order vary from
    row to row so that looking back a fixed distance never works (with one fixed-length
    repeat, "x1 ... xn x1 ... xn", the LM learned exactly that and its reading did not
    improve). Special tokens are never drawn.
    """
    vocabulary = model.config.text_config.vocab_size
    first = len(SPECIAL_TOKENS)
    sequences, targets = [], []
    for _ in range(rows):
        filler = [rng.randrange(first, vocabulary) for _ in range(rng.randint(0, length // 2))]
        if rng.random() < repeat_share:  # a span shown twice, the second time predictable
            span = [rng.randrange(first, vocabulary) for _ in range(rng.randint(length // 2, length))]
            sequence = [BOS_ID] + span + filler + span
            target = [IGNORE] * (1 + len(span) + len(filler) + 1) + span[1:]
        else:
            pairs = rng.randint(2, max(2, length // 2))
            words = rng.sample(range(first, vocabulary), 2 * pairs)
            keys, values = words[:pairs], words[pairs:]
            reverse = rng.random() < 1 / 3
            listing = [word for pair in zip(keys, values) for word in pair]
            asked = rng.sample(range(pairs), rng.randint(1, pairs))
            sequence = [BOS_ID] + listing + filler
            target = [IGNORE] * len(sequence)
            for index in asked:
                cue, answer = (values[index], keys[index]) if reverse else (keys[index], values[index])
                sequence += [cue, answer]
                target += [IGNORE, answer]
        sequences.append(sequence)
        targets.append(target)
    width = max(len(sequence) for sequence in sequences)
    ids = torch.full((rows, width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    for row, (sequence, target) in enumerate(zip(sequences, targets)):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
        labels[row, :len(target)] = torch.tensor(target)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)


def copy_warmup_step(model, optimizer, rng: random.Random, grad_clip: float = 1.0) -> float:
    """One optimizer step on `copy_warmup_loss` (gradients clipped to `grad_clip`, 0: no
    clipping); returns the loss."""
    loss = copy_warmup_loss(model, rng)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


def vision_warmup_step(model, image_processor, probe: "VisionProbe", optimizer, rng: random.Random,
                       pool: Sequence[toy.Identity], config: LvlmTrainConfig, photos: int = 16) -> float:
    """One optimizer step of the vision tower and projector on `probe`'s loss alone: `photos`
    fresh scenes, what is drawn in each third of each. No LM runs: a few hundred of these
    cheap steps give image tokens that say, place by place, what the LM will be asked to read
    (the "seeing" stage of the curriculum); returns the loss."""
    size = model.config.vision_config.image_size
    images, infos = [], []
    for _ in range(photos):
        image, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool, size=size)
        images.append(image)
        infos.append(info)
    features = image_tokens(model, pixel_values(image_processor, images))
    loss = probe.loss(features, infos)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return float(loss.detach())


def answer_loss(logits: torch.Tensor, labels: torch.Tensor, first_weight: float = 0.5) -> torch.Tensor:
    """Cross-entropy of the answer tokens, every row weighing the same.

    Logits at t predict labels at t + 1. Within a row, the FIRST answer token (the word that
    decides: "Yes"/"No", the colour, the option letter) carries `first_weight` of the row's
    loss and the rest of the answer (the recognition template, EOS) shares the remainder.
    Averaging tokens over the whole batch instead lets long templated answers, which are
    nearly free to predict, drown the one token that needs looking at the photo.
    """
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         ignore_index=IGNORE, reduction="none").view(targets.shape)  # [B, T-1]
    answer = targets != IGNORE
    first = answer & (answer.cumsum(dim=1) == 1)
    rest = answer & ~first
    rest_count = rest.sum(dim=1)
    rest_mean = (ce * rest).sum(dim=1) / rest_count.clamp(min=1)
    first_ce = (ce * first).sum(dim=1)
    weight = torch.where(rest_count > 0, torch.full_like(first_ce, first_weight), torch.ones_like(first_ce))
    return (weight * first_ce + (1 - weight) * rest_mean).mean()


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def build_pocket_llava(vocabulary: Sequence[str], sizes: LvlmSizes, seed: int):
    """(model, tokenizer, image_processor): a fresh pocket LLaVA, identical for a seed."""
    tokenizer = build_word_tokenizer(list(vocabulary))
    config = tiny_llava_config(vocab_size=len(tokenizer), hidden_size=sizes.hidden, layers=sizes.layers,
                               image_size=sizes.image_size, patch_size=sizes.patch_size,
                               vision_hidden=sizes.vision_hidden, vision_layers=sizes.vision_layers,
                               heads=sizes.heads)
    config.text_config.intermediate_size = sizes.hidden * 3
    config.vision_config.intermediate_size = sizes.vision_hidden * 3
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.config._name_or_path = "plvmctl-pocket"
    return model, tokenizer, clip_image_processor(sizes.image_size)


def grow_vocabulary(model, tokenizer, words: Sequence[str]):
    """A tokenizer that also knows `words`, every known word keeping its id, and `model`'s
    input embeddings and output head grown to match (new rows at the mean of the old ones, as
    `resize_token_embeddings` makes them). For a trained base that must learn new questions
    (`plvmctl.lab.several_stage`); `tokenizer` unchanged when it knows every word already."""
    known = tokenizer.get_vocab()
    new = [word for word in dict.fromkeys(w.lower() for w in words) if word not in known]
    if not new:
        return tokenizer
    ordered = [token for token, _ in sorted(known.items(), key=lambda item: item[1])]
    grown = build_word_tokenizer(ordered + new)
    moved = [token for token, index in known.items() if grown.convert_tokens_to_ids(token) != index]
    if moved:
        raise PlvmError(f"growing the vocabulary would move {len(moved)} known tokens (e.g. {moved[0]!r})")
    model.resize_token_embeddings(len(grown), mean_resizing=True)
    return grown


def num_image_tokens(model) -> int:
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def first_answer_hits(model, tokenizer, rows: Sequence[Row], pixels: torch.Tensor | None,
                      batch_rows: int = 48) -> list[tuple[bool, bool] | None]:
    """For each row, (the most likely first answer token among its options' first tokens is
    the right one, the most likely token over the whole vocabulary is), or None for rows
    without options. `pixels` holds the photos the rows' `image` / `reference` index."""
    def first_token(text: str) -> int:
        return tokenizer(" " + text, add_special_tokens=False)["input_ids"][0]

    results: list[tuple[bool, bool] | None] = []
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        local, order = _with_own_photos(chunk)
        batch = encode_rows(local, tokenizer, num_image_tokens(model), name_id=model.config.text_config.vocab_size)
        logits = forward_logits(model, batch, pixels[order] if order else None)
        for i, row in enumerate(chunk):
            if not row.options:
                results.append(None)
                continue
            scores = logits[i, batch.prompt_lengths[i] - 1].float()
            expected = int(batch.labels[i, batch.prompt_lengths[i]])
            best = max((first_token(option) for option in row.options), key=lambda token: float(scores[token]))
            results.append((best == expected, int(scores.argmax()) == expected))
    return results


@torch.no_grad()
def measure(model, tokenizer, image_processor, *, scenes: int = 40, seed: int = 1,
            config: LvlmTrainConfig | None = None, heldout: bool = True,
            batch_rows: int = 48) -> dict[str, dict[str, float]]:
    """First-answer-token accuracy per row kind on fresh photos.

    People come from the held-out part (never seen in training) unless `heldout=False`.
    `accuracy`: the most likely first answer token among the first tokens of the row's
    possible answers (the option letters, Yes/No, the colours ...) is the right one, as the
    evaluation's likelihood scoring picks; `chance` is 1 / number of possible answers.
    `greedy`: the most likely token over the WHOLE vocabulary is the right one (what greedy
    decoding would start with). With "compare" recognition answers the first token is a place,
    not the verdict: those rows are answered by greedy generation instead and scored by their
    verdict (kind "recognition-said", chance 0.5). Returns {kind: {...}} plus "all".
    """
    config = config or LvlmTrainConfig()
    pool = toy.heldout_identities() if heldout else toy.training_identities()
    rng = random.Random(f"plvmctl-pocket-measure-{seed}")
    size = model.config.vision_config.image_size
    rows, images, _ = sample_step(rng, pool, dataclasses.replace(
        config, describe_rows_per_step=0, text_rows_per_step=max(config.text_rows_per_step, scenes * 2),
        portrait_rows_per_step=scenes if config.portrait_rows_per_step else 0),
        scene_size=size, scenes=scenes)
    model.eval()
    pixels = pixel_values(image_processor, images)
    hits: dict[str, list[int]] = {}
    greedy: dict[str, list[int]] = {}
    chances: dict[str, list[float]] = {}
    compare = config.recognition_answer == "compare"
    for row, scored in zip(rows, first_answer_hits(model, tokenizer, rows, pixels, batch_rows)):
        if compare and row.kind == "recognition":
            continue  # its first token is a place, not the verdict: scored below by generating
        if scored is not None:
            hits.setdefault(row.group, []).append(int(scored[0]))
            greedy.setdefault(row.group, []).append(int(scored[1]))
            chances.setdefault(row.group, []).append(row.chance)

    def summary(h: list[int], g: list[int], c: list[float]) -> dict[str, float]:
        return {"accuracy": round(sum(h) / len(h), 4), "greedy": round(sum(g) / len(g), 4),
                "chance": round(sum(c) / len(c), 4), "count": len(h)}

    mcq_rows = [row for row in rows if row.mcq]
    if mcq_rows:  # the letter the answer gives, wherever it stands, read as `plvmctl eval` does

        said = generate_answers(model, tokenizer, mcq_rows, pixels, batch_rows=batch_rows)
        for row, answer in zip(mcq_rows, said):
            options = parse_mcq_prompt(row.question)
            right = int(parse_mcq_answer(answer, options) == parse_mcq_answer(row.answer, options))
            key = row.group + "-mcq-said"
            hits[key] = hits.get(key, []) + [right]
            greedy[key] = greedy.get(key, []) + [right]
            chances[key] = chances.get(key, []) + [1.0 / len(options)]
    if compare:  # the verdict comes after the comparison: generate it

        recognition = [row for row in rows if row.kind == "recognition"]
        said = generate_answers(model, tokenizer, recognition, pixels, batch_rows=batch_rows)
        for row, answer in zip(recognition, said):
            right = int(parse_yes_no(answer) == parse_yes_no(row.answer))
            hits[row.group + "-said"] = hits.get(row.group + "-said", []) + [right]
            greedy[row.group + "-said"] = greedy.get(row.group + "-said", []) + [right]
            chances[row.group + "-said"] = chances.get(row.group + "-said", []) + [0.5]
    report = {kind: summary(hits[kind], greedy[kind], chances[kind]) for kind in hits}
    report["all"] = summary(*([x for values in table.values() for x in values]
                              for table in (hits, greedy, chances)))
    return report


@torch.no_grad()
def measure_comparisons(model, tokenizer, image_processor, *, scenes: int = 60, seed: int = 1,
                        config: LvlmTrainConfig | None = None) -> dict:
    """Where a "compare" recognition answer goes right or wrong, on fresh photos of held-out
    people (two recognition questions a photo, half with name tokens as `config` says):

    `read` per trait (the value said for a person against what is drawn there), `copy` (the
    stated value against the description in the prompt), `compare` (same / different against
    the two words written), `places` (the people named in order), and the verdict's accuracy
    on `positive` and `negative` questions and their mean (`verdict_mean`), read as the
    evaluation reads it. `examples`: two answers next to the truth.
    """

    config = dataclasses.replace(config or LvlmTrainConfig(), recognition_answer="compare", scene_share=0.0,
                                 about_share=0.0, recognition_share=1.0, rows_per_scene=2)
    rng = random.Random(f"plvmctl-pocket-comparisons-{seed}")
    pool = toy.heldout_identities()
    rows, images, infos = [], [], []
    for _ in range(scenes):
        image, info = toy.random_scene(pool[rng.randrange(len(pool))], rng, pool,
                                       size=model.config.vision_config.image_size)
        images.append(image)
        for row in scene_rows(info, len(images) - 1, rng, pool, config, config.rows_per_scene):
            rows.append(row)
            infos.append(info)
    was_training = model.training
    model.eval()
    said = generate_answers(model, tokenizer, rows, pixel_values(image_processor, images))
    model.train(was_training)
    traits = config.compare_traits
    counts = {name: [0, 0] for name in ("copy", "compare", "positive", "negative", "places")}
    read = {trait: [0, 0] for trait in traits}
    width = 2 + 4 * len(traits)  # place, (seen key stated verdict) per trait, match word
    for row, info, answer in zip(rows, infos, said):
        truth = parse_yes_no(row.answer)
        kind = "positive" if truth == "yes" else "negative"
        counts[kind][0] += int(parse_yes_no(answer) == truth)
        counts[kind][1] += 1
        words = answer.split(".")[0].split()
        people = sorted(info.people, key=lambda p: toy.POSITIONS.index(p.position))
        counts["places"][0] += int(words[0::width][:len(people)] == [p.position for p in people])
        counts["places"][1] += 1
        description = next(iter(row.descriptions.values())).split()
        described = dict(zip(description[0::2], description[1::2]))  # "hair red skin tan ..."
        for number, person in enumerate(people):
            chunk = words[number * width:(number + 1) * width]
            if len(chunk) < width:
                break
            for i, trait in enumerate(traits):
                seen, _, stated, verdict = chunk[1 + 4 * i:5 + 4 * i]
                counts["copy"][0] += int(stated == described[DESCRIPTION_KEYS[trait]])
                counts["copy"][1] += 1
                read[trait][0] += int(seen == getattr(person.identity, trait))
                read[trait][1] += 1
                counts["compare"][0] += int(verdict == (recognition_templates.SAME if stated == seen
                                                        else recognition_templates.DIFFERENT))
                counts["compare"][1] += 1
    report = {name: round(hit / total, 4) if total else None for name, (hit, total) in counts.items()}
    report["read"] = {trait: round(hit / total, 4) if total else None for trait, (hit, total) in read.items()}
    if report["positive"] is not None and report["negative"] is not None:
        report["verdict_mean"] = round((report["positive"] + report["negative"]) / 2, 4)
    report["rows"] = len(rows)
    report["examples"] = [{"said": answer, "truth": row.answer} for row, answer in list(zip(rows, said))[:2]]
    return report


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class LvlmResult:
    model: LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    losses: list[float]
    seconds: float  # training time, earlier runs of a resumed training included
    steps: int
    seconds_before: float = 0.0  # the part of `seconds` spent before this run resumed
    copy_losses: list[float] = field(default_factory=list)  # the copy warm-up's
    vision_losses: list[float] = field(default_factory=list)  # the vision warm-up's probe losses


class _NoScheduler:
    """train_lvlm sets the lr itself each step; the checkpoint format wants a scheduler state."""

    def state_dict(self) -> dict:
        return {}


def _save_weights(module: torch.nn.Module, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(module, str(folder / "model.safetensors"))


def save_lvlm_checkpoint(out_dir: str | os.PathLike, model, probe: "VisionProbe | None", optimizer, *,
                         step: int, rngs: dict[str, random.Random], losses: list[float],
                         seconds: float, warm_up_losses: dict[str, list[float]] | None = None) -> Path:
    """OUT/checkpoint of a pretraining run, written atomically: the model and probe weights
    (safetensors), optimizer state and global RNGs (weights-only torch file), and in
    state.json the step, the row samplers' states and the losses so far."""
    modules = torch.nn.ModuleDict({"model": model, **({"probe": probe} if probe is not None else {})})
    state = {"step": step, "seconds": round(seconds, 2), "losses": losses, "warm_up_losses": warm_up_losses or {},
             "rngs": {name: [r.getstate()[0], list(r.getstate()[1]), r.getstate()[2]] for name, r in rngs.items()}}
    return save_checkpoint(out_dir, module=modules, optimizer=optimizer, scheduler=_NoScheduler(),
                           rng=capture_rng_state(), state=state, save_module=_save_weights)


def load_lvlm_checkpoint(folder: str | os.PathLike, model, probe: "VisionProbe | None", optimizer,
                         rngs: dict[str, random.Random]) -> dict:
    """Put a `save_lvlm_checkpoint` back into `model`, `probe`, `optimizer` and `rngs`; returns
    the saved state (step, losses, seconds)."""
    state, tensors = load_checkpoint(folder)
    modules = torch.nn.ModuleDict({"model": model, **({"probe": probe} if probe is not None else {})})
    missing, unexpected = safetensors.torch.load_model(
        modules, str(Path(folder) / CHECKPOINT_MODULE / "model.safetensors"), strict=False)
    if unexpected or [key for key in missing if not key.endswith("lm_head.weight")]:
        raise PlvmError(f"{folder}: the checkpoint holds another model than this configuration's")
    optimizer.load_state_dict(tensors["optimizer"])
    restore_rng_state(tensors["rng"])
    for name, saved in state["rngs"].items():
        rngs[name].setstate((saved[0], tuple(saved[1]), saved[2]))
    return state


def train_lvlm(model, tokenizer, image_processor, config: LvlmTrainConfig, *,
               logger: JsonlLogger | None = None,
               echo: Callable[[str], None] | None = None,
               after_step: Callable[[int], None] | None = None,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 200,
               resume: bool = False) -> LvlmResult:
    """Train the whole pocket LLaVA (vision tower, projector, LM) on fresh toy photos.

    AdamW, linear warm-up then cosine decay to `min_lr_ratio`, gradient clipping. Only
    training-part identities are ever drawn. `after_step(step)` runs after every step (to
    measure along the way; it must leave the model in training mode).

    With `checkpoint_dir`, CHECKPOINT_DIR/checkpoint is written every `checkpoint_every` main
    steps and at the end; `resume` continues from it exactly where it stopped (the warm-ups
    are behind a checkpoint, so they are not run again).
    """
    say = echo or (lambda message: None)
    if config.caption_steps > 0 and config.caption_rows < 1:
        raise PlvmError("caption_steps trains on caption rows alone: set caption_rows to 1 or more")
    seed_everything(config.seed)
    if config.name_tags:  # the rule is part of the model: saved with its config, read at ask time
        setattr(model.config, TAGS_KEY, {"stop_ids": [tokenizer.convert_tokens_to_ids("."), EOS_ID]})
    rng = random.Random(f"plvmctl-pocket-lvlm-{config.seed}")
    pool = toy.training_identities()
    size = model.config.vision_config.image_size
    tokens_per_image = num_image_tokens(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.98))
    probe = None
    if config.vision_aux_weight > 0:
        grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
        probe = VisionProbe(model.config.text_config.hidden_size, grid, config.position_aux_weight)
        optimizer.add_param_group({"params": list(probe.parameters()), "weight_decay": 0.0})
    model.train()
    model.requires_grad_(True)
    losses: list[float] = []
    started = time.perf_counter()
    copy_rng = random.Random(f"plvmctl-pocket-copy-{config.seed}")
    vision_rng = random.Random(f"plvmctl-pocket-vision-{config.seed}")
    rngs = {"rows": rng, "copy": copy_rng, "vision": vision_rng}
    copy_losses: list[float] = []
    vision_losses: list[float] = []
    first_step, seconds_before = 0, 0.0
    if resume:
        found = find_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
        if found is None:
            raise PlvmError(f"nothing to resume: no pretraining checkpoint in {checkpoint_dir}")
        state = load_lvlm_checkpoint(found, model, probe, optimizer, rngs)
        first_step, losses, seconds_before = int(state["step"]), list(state["losses"]), float(state["seconds"])
        copy_losses = list(state.get("warm_up_losses", {}).get("copy", []))
        vision_losses = list(state.get("warm_up_losses", {}).get("vision", []))
        say(f"lvlm: resuming at step {first_step} of {config.steps}")
    started -= seconds_before

    def save(completed: int) -> None:
        if checkpoint_dir is not None:
            save_lvlm_checkpoint(checkpoint_dir, model, probe, optimizer, step=completed, rngs=rngs,
                                 losses=losses, seconds=time.perf_counter() - started,
                                 warm_up_losses={"copy": copy_losses, "vision": vision_losses})

    warm_ups = first_step == 0  # a checkpoint is past them
    for step in range(config.copy_steps if warm_ups else 0):  # induction heads first
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        loss = copy_warmup_step(model, optimizer, copy_rng, config.grad_clip)
        copy_losses.append(loss)
        if step % config.log_every == 0 or step == config.copy_steps - 1:
            say(f"lvlm copy warm-up {step:5d}  loss {loss:.4f}  {time.perf_counter() - started:6.0f}s")
            if logger is not None:
                logger.log({"stage": "lvlm-copy", "step": step, "loss": loss})
    if config.vision_steps > 0 and probe is None:
        raise PlvmError("vision_steps train the vision tower on the probe's labels: set vision_aux_weight above 0")
    for step in range(config.vision_steps if warm_ups else 0):  # seeing first: dense labels alone
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        loss = vision_warmup_step(model, image_processor, probe, optimizer, vision_rng, pool, config)
        vision_losses.append(loss)
        if step % config.log_every == 0 or step == config.vision_steps - 1:
            say(f"lvlm vision warm-up {step:5d}  probe loss {loss:.4f}  {time.perf_counter() - started:6.0f}s")
            if logger is not None:
                logger.log({"stage": "lvlm-vision", "step": step, "loss": loss})
    step = 0
    for step in range(first_step, config.steps):
        factor = lr_multiplier(step, total_steps=config.steps, warmup_steps=config.warmup_steps,
                               schedule="cosine")
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * factor)
        if step < config.reading_steps:  # text only: cheap rows, the reading skill first
            rows, images, infos = [text_row(pool[rng.randrange(len(pool))], rng, config)
                                   for _ in range(config.reading_rows)], [], []
        else:
            rows, images, infos = sample_step(rng, pool, config, scene_size=size,
                                              n_people=1 if step < config.single_person_steps else None)
            if step < config.caption_steps:  # captions only: learn to see place by place first
                rows = [row for row in rows if row.kind == "caption"]
        batch = encode_rows(rows, tokenizer, tokens_per_image, name_id=model.config.text_config.vocab_size)
        pixels = pixel_values(image_processor, images) if images else None
        logits, features = forward_logits(model, batch, pixels, return_features=True)
        loss = answer_loss(logits, batch.labels)
        aux = probe.loss(features, infos) if probe is not None and features is not None else None
        total = loss + config.vision_aux_weight * aux if aux is not None else loss
        if config.dense_text_groups > 0:
            groups = [text_group(pool, rng, config) for _ in range(config.dense_text_groups)]
            dense = encode_dense(groups, tokenizer, tokens_per_image, model.config.text_config.vocab_size)
            total = total + config.dense_weight * dense_loss(forward_logits(model, dense, None), dense.labels)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise PlvmError(f"base LVLM training diverged at step {step} (loss {value})")
        losses.append(value)
        elapsed = time.perf_counter() - started
        if step % config.log_every == 0 or step == config.steps - 1:
            recent = losses[-config.log_every:]
            aux_value = float(aux.detach()) if aux is not None else None
            say(f"lvlm step {step:5d}  loss {sum(recent) / len(recent):.4f}"
                + (f"  (vision probe {aux_value:.3f})" if aux_value is not None else "") + f"  {elapsed:6.0f}s")
            if logger is not None:
                logger.log({"stage": "lvlm", "step": step, "loss": value, "vision_probe": aux_value,
                            "lr": optimizer.param_groups[0]["lr"], "seconds": round(elapsed, 2)})
        if after_step is not None:
            after_step(step)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            save(step + 1)
        if config.max_seconds and elapsed > config.max_seconds:
            say(f"lvlm: time limit reached after {step + 1} steps")
            break
    save(len(losses))
    model.eval()
    model.requires_grad_(False)
    return LvlmResult(model, tokenizer, image_processor, losses, time.perf_counter() - started,
                      len(losses), seconds_before, copy_losses, vision_losses)
