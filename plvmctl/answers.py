"""The questions plvmctl asks and how it reads the answers: pure text, no model.

The recognition question, the multiple-choice layout and its instruction, the description
prompt, and the parsers that turn a generated answer into a verdict ("yes" / "no"), an option
letter, a concept named, or a persona description. The evaluation, the trainers, recognition
and the lab all read answers the same way because they all read them here. This module
imports nothing of plvmctl.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

RECOGNITION_QUESTION = "Is <{name}> in this photo?"
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
CAPTION_QUESTION = "Describe this photo."
DESCRIPTION_PROMPT = "Describe the person in this photo in one short sentence."
DESCRIPTION_MAX_NEW_TOKENS = 16  # the paper's "LLaVA + 16-token text prompt" baseline


# --------------------------------------------------------------------------------------------
# Multiple choice


def mcq_prompt(question: str, options: Sequence[tuple[str, str]]) -> str:
    """The question, then "A. text" lines, then the answer-with-the-letter instruction."""
    lines = [question] + [f"{letter}. {text}" for letter, text in options] + [MCQ_INSTRUCTION]
    return "\n".join(lines)


def parse_mcq_prompt(prompt: str) -> tuple[tuple[str, str], ...]:
    """The (letter, text) options of a prompt written by `mcq_prompt`, in order."""
    found = (re.fullmatch(r"([A-Z])\. (.*)", line) for line in prompt.splitlines())
    return tuple((match.group(1), match.group(2)) for match in found if match)


# --------------------------------------------------------------------------------------------
# Yes / no and multiple-choice answers


_YES_WORDS = {"yes", "yeah", "yep", "yup", "yea", "correct", "true", "affirmative"}
_SOFT_YES_WORDS = {"absolutely", "certainly", "definitely", "indeed", "sure", "surely"}
_NO_WORDS = {"no", "nope", "nah", "not", "false", "incorrect", "negative", "none", "nobody"}
_NEGATION_WORDS = {"no", "not", "never", "nobody", "neither", "nor", "cannot", "without", "none"}
_UNSURE_PHRASES = (
    "not sure", "unsure", "uncertain", "unclear", "not clear", "don't know", "do not know",
    "cannot determine", "can't determine", "cannot be determined", "unable to determine",
    "cannot tell", "can't tell", "hard to tell", "difficult to tell", "impossible to",
    "cannot confirm", "can't confirm", "unable to confirm", "not possible to",
)
_PRESENCE_PHRASES = (
    "is in", "are in", "appears in", "is present", "is visible", "is shown", "is pictured",
    "can be seen", "i can see", "i see", "is featured", "is depicted",
)


def _plain_words(text: str) -> list[str]:
    """Lower-case words of `text` with markup, punctuation and any `<name>` removed."""
    lowered = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    lowered = re.sub(r"<[^<>\s]*>", " name ", lowered)  # a restored <name> is not a word
    lowered = re.sub(r"^\s*(answer|assistant|response)\s*:", " ", lowered)
    return [word.strip("'") for word in re.findall(r"[a-z0-9']+", lowered) if word.strip("'")]


def _opening_verdict(words: list[str]) -> str | None:
    """"yes" / "no" when `words` open with a yes or no word ("Absolutely not" is no)."""
    if not words:
        return None
    first, second = words[0], (words[1] if len(words) > 1 else "")
    if first in _YES_WORDS:
        return "yes"
    if first in _NO_WORDS:
        return "no"
    if first in _SOFT_YES_WORDS:
        return "no" if second in ("not", "no") else "yes"
    return None


def verdict_start(answer: str) -> int | None:
    """Where the sentence that decides an answer begins: the first that opens with a yes/no
    word (as `parse_yes_no` reads it), or None. What comes before it is the answer's reasoning
    ("left red hair red same ... match" in "left red hair red same ... match. Yes, ...")."""
    for part in re.finditer(r"[^.!?;\s][^.!?;\n]*", answer):
        if _opening_verdict(_plain_words(part.group())) is not None:
            return part.start()
    return None


REASONING_STYLES = ("none", "comparison")  # recipe model.reasoning
_COMPARISON_END = re.compile(r"\b(?:match|mismatch)\s*[.!]\s*", re.IGNORECASE)


def conclusion(answer: str, reasoning: str = "comparison") -> str:
    """What an answer concludes, without the reasoning a model writes before it.

    `reasoning="comparison"` is the pocket model's way: it compares every person in the photo
    with the concept, trait by trait, each comparison ending "match" or "mismatch", then
    concludes ("left red hair red same ... match right ... mismatch. yes, i see <a> here.").
    The conclusion is the text after the last comparison's full stop. An answer with no
    comparison, or nothing after it (cut off by the length limit), is returned whole, as is
    any answer when `reasoning` is "none"."""
    if reasoning not in REASONING_STYLES:
        raise ValueError(f"reasoning must be one of {', '.join(REASONING_STYLES)}, got {reasoning!r}")
    if reasoning == "none":
        return answer
    ends = list(_COMPARISON_END.finditer(answer))
    rest = answer[ends[-1].end():].strip() if ends else ""
    return rest or answer


def parse_yes_no(answer: str | None) -> str | None:
    """Map a free-text recognition answer to "yes", "no", or None when it says neither.

    The first word decides when it is a yes/no word ("Yes, <a> is ...", "No.", "**Yes**");
    "Absolutely not" is no. Otherwise the first later sentence that opens with one does (an
    answer that reasons first: "left red hair red same ... match. Yes, <a> is ..."). Otherwise
    a hedge ("I'm not sure") is None, any negation ("I don't see <a>", "<a> is not in this
    photo", "There is no ...") is no, and a statement of presence ("<a> is in this photo") is
    yes.
    """
    if not answer:
        return None
    words = _plain_words(answer)
    if not words:
        return None
    # The first sentence that opens with a yes/no word decides: "Yes, ..." as well as a
    # reasoning first and the verdict after it ("left red hair red same ... match. Yes, ...").
    for part in re.split(r"[.!?;\n]+", answer):
        decided = _opening_verdict(_plain_words(part))
        if decided is not None:
            return decided
    sentence = " ".join(words)
    if any(re.search(rf"\b{re.escape(phrase)}\b", sentence) for phrase in _UNSURE_PHRASES):
        return None
    if any(word in _NEGATION_WORDS or word.endswith("n't") for word in words):
        return "no"
    if any(re.search(rf"\b{re.escape(phrase)}\b", sentence) for phrase in _PRESENCE_PHRASES):
        return "yes"
    return None


def _normalise_option(text: str) -> str:
    """Lower-case words only, `<name>` unwrapped, a leading article dropped."""
    words = re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


_ANSWER_PREFIX = re.compile(
    r"^\s*(?:the\s+)?(?:correct\s+|best\s+|right\s+)?(?:answer|option|choice)\b"
    r"(?:\s+is)?\s*[:\-]?\s*", re.IGNORECASE)


def parse_mcq_answer(answer: str | None, options: Sequence[tuple[str, str]] | Mapping[str, str]
                     ) -> str | None:
    """The option letter a generated MCQ answer picks, or None.

    Accepted: a letter alone or first with a delimiter ("B", "b.", "(B)", "[B]", "B) crop top",
    "B. crop top"), after an optional "Answer:" / "The answer is" / "Option" prefix; "... the
    answer is C" anywhere; or text equal to one option's text ("crop top", "A crop top",
    "B crop top"), or an option's text followed by a letter ("crop top B", "red (A)": the
    letter counts, as the answer the instruction asks for), ignoring case, punctuation and a
    leading article; failing those, the same read of the last sentence (an answer that reasons
    first: "left red hair red same ... match. left B"). A letter that is not one of the
    options is None.
    """
    if not answer:
        return None
    pairs = list(options.items()) if isinstance(options, Mapping) else list(options)
    letters = [letter for letter, _ in pairs]
    text = re.sub(r"[*_`\"]", "", answer).strip()
    for _ in range(2):  # "Answer: Option B"
        text = _ANSWER_PREFIX.sub("", text, count=1).strip()

    def known(letter: str) -> str | None:
        return letter.upper() if letter.upper() in letters else None

    alone = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:,!]?", text)
    if alone:
        return known(alone.group(1))
    delimited = re.match(r"(?:\(([A-Za-z])\)|\[([A-Za-z])\]|([A-Za-z])[.):])(?:\s|$)", text)
    if delimited:
        return known(next(group for group in delimited.groups() if group))
    stated = re.search(r"\banswer is:?\s*\(?([A-Z])\b\)?", answer)
    if stated:
        return known(stated.group(1))
    normalised = _normalise_option(text)
    for letter, option in pairs:
        if normalised and normalised == _normalise_option(option):
            return letter
    head, _, rest = text.partition(" ")
    if head.upper() in letters and rest:
        option_text = dict(pairs)[head.upper()]
        if _normalise_option(rest) == _normalise_option(option_text):
            return head.upper()
    said, _, last = text.rstrip(" .!)]").rpartition(" ")
    last = last.strip("([")
    if last.upper() in letters and said and any(  # the value, then its letter: "crop top B"
            _normalise_option(said) == _normalise_option(option) for _, option in pairs):
        return last.upper()
    sentences = re.split(r"(?<=[.!?])\s+", text)
    if len(sentences) > 1:  # reasoning first ("left red hair red same ... match. left B")
        return parse_mcq_answer(sentences[-1], pairs)
    return None


def pick_by_likelihood(letters: Sequence[str], logprobs: Sequence[float]) -> str:
    """The letter with the highest log-likelihood; NaN counts as -inf; ties: earlier letter."""
    best_index, best = 0, -math.inf
    for index, value in enumerate(logprobs):
        value = -math.inf if value is None or math.isnan(value) else float(value)
        if value > best:
            best_index, best = index, value
    return letters[best_index]


# --------------------------------------------------------------------------------------------
# Which concepts an answer names


def names_concept(caption: str | None, name: str) -> bool:
    """Whether `caption` names concept `name` (as `<name>` or the bare word, any case)."""
    if not caption:
        return False
    pattern = rf"(?<![A-Za-z0-9_-])<?{re.escape(name)}>?(?![A-Za-z0-9_-])"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def parse_which(answer: str | None, names: Sequence[str]) -> str | None:
    """The one of `names` an answer names first (as `<name>` or the bare word), or None."""
    if not answer:
        return None
    found = []
    for name in names:
        match = re.search(rf"(?<![A-Za-z0-9_-])<?{re.escape(name)}>?(?![A-Za-z0-9_-])", answer, flags=re.IGNORECASE)
        if match:
            found.append((match.start(), name))
    return min(found)[1] if found else None


def name_list(names: Sequence[str]) -> str:
    """`<a>`, `<a> and <b>`, `<a>, <b> and <c>`: names as a question lists them."""
    marked = [f"<{name}>" for name in names]
    if len(marked) < 2:
        return "".join(marked)
    return ", ".join(marked[:-1]) + " and " + marked[-1]


WHO_OF_QUESTION = "Who of {names} is in this photo?"  # the names as `name_list` writes them
WHICH_OF_QUESTION = "Which of {names} is in this photo?"
BOTH_HERE_QUESTION = "Are <{a}> and <{b}> both in this photo?"
LEFT_OF_QUESTION = "Is <{a}> to the left of <{b}>?"
_NOBODY = re.compile(r"\b(?:nobody|no one|none of them|none|neither)\b", re.IGNORECASE)


def who_of_question(names: Sequence[str]) -> str:
    """"Who of <a>, <b> and <c> is in this photo?" (one name: "Who of <a> ...")."""
    return WHO_OF_QUESTION.format(names=name_list(names))


def which_of_question(names: Sequence[str]) -> str:
    """"Which of <a>, <b> and <c> is in this photo?"."""
    return WHICH_OF_QUESTION.format(names=name_list(names))


def parse_who(answer: str | None, names: Sequence[str]) -> tuple[str, ...] | None:
    """The names of `names` an answer to "Who of ...?" says are in the photo, in `names`'
    order: every one it names, except in a clause that denies ("<b> is not here", "but not
    <b>"); () when
    it names none and says nobody ("Nobody.", "None of them."); None when it says neither.
    Read the conclusion (`conclusion`) of an answer that compares first: its scratchpad
    names every candidate."""
    if not answer:
        return None
    present: set[str] = set()
    denied = False
    for sentence in re.split(r"[.!?;\n]+|,?\s*\bbut\b", answer):
        named = [name for name in names if names_concept(sentence, name)]
        words = _plain_words(sentence)
        negated = any(word in _NEGATION_WORDS or word.endswith("n't") for word in words)
        if named and not negated:
            present.update(named)
        denied = denied or (not named and _NOBODY.search(sentence) is not None) or (named and negated)
    if present:
        return tuple(name for name in names if name in present)
    return () if denied else None


# --------------------------------------------------------------------------------------------
# Persona descriptions (the text prompt of llava-text; Yo'LLaVA's conversations)

# Openings a description often starts with that would read badly after "<name> is ...".
_DESCRIPTION_OPENINGS = (
    "the person in this photo is ",
    "the person in the photo is ",
    "the person in the image is ",
    "the person is ",
    "this person is ",
    "this is ",
    "it is ",
    "he is ",
    "she is ",
)


def clean_description(text: str | None) -> str:
    """Turn a generated description into the `{text}` of "<name> is {text}."

    Keeps the first line, drops quotes, a trailing full stop and openings such as
    "This is"; lower-cases a leading article ("A woman" -> "a woman").
    """
    stripped = (text or "").strip()
    line = stripped.splitlines()[0].strip("\"'` ") if stripped else ""
    lowered = line.lower()
    for opening in _DESCRIPTION_OPENINGS:
        if lowered.startswith(opening):
            line = line[len(opening):]
            break
    line = line.rstrip(" .!,;:").strip()
    first, _, rest = line.partition(" ")
    if first in ("A", "An", "The"):
        line = first.lower() + (" " + rest if rest else "")
    return line
