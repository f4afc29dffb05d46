"""Recognition and attribute Q&A templates shared by the Aligner and Yo'LLaVA trainers.

Every template uses the placeholder `<sks>` for the personalized concept; `fill` swaps it for
a concrete `<name>`. Positive answers all start with "Yes", negative ones with "No", so a
trainer (or an evaluator) can read the label off the first word.
"""

from __future__ import annotations

from typing import Mapping, Sequence

PLACEHOLDER = "<sks>"

RECOGNITION_QUESTIONS: tuple[str, ...] = (
    "Is <sks> in this photo?",
    "Can you see <sks> in this image?",
    "Does this photo show <sks>?",
    "Is <sks> present in this picture?",
    "Can you find <sks> in this photo?",
    "Is <sks> somewhere in this image?",
    "Does <sks> appear in this picture?",
    "Do you see <sks> here?",
    "Is there <sks> in this photo?",
    "Is <sks> one of the people in this photo?",
    "Can <sks> be seen in this image?",
    "Does this image contain <sks>?",
    "Is <sks> pictured here?",
    "Would you say <sks> is in this photo?",
    "Is <sks> visible in this picture?",
    "Look at the photo: is <sks> there?",
    "Is this a photo with <sks> in it?",
)

POSITIVE_ANSWERS: tuple[str, ...] = (
    "Yes, <sks> is in this photo.",
    "Yes, I can see <sks> in this image.",
    "Yes, this photo shows <sks>.",
    "Yes, <sks> is present in this picture.",
    "Yes, I found <sks> in this photo.",
    "Yes, <sks> is in the image.",
    "Yes, <sks> appears in this picture.",
    "Yes, I see <sks> here.",
    "Yes, <sks> is one of the people in this photo.",
    "Yes, <sks> can be seen in this image.",
    "Yes, this image contains <sks>.",
    "Yes, <sks> is pictured here.",
    "Yes, <sks> is in this photo for sure.",
    "Yes, <sks> is visible in this picture.",
    "Yes.",
    "Yes, that is <sks>.",
    "Yes, <sks> is right there.",
)

NEGATIVE_ANSWERS: tuple[str, ...] = (
    "No, <sks> is not in this photo.",
    "No, I cannot see <sks> in this image.",
    "No, this photo does not show <sks>.",
    "No, <sks> is not present in this picture.",
    "No, I could not find <sks> in this photo.",
    "No, <sks> is not in the image.",
    "No, <sks> does not appear in this picture.",
    "No, I do not see <sks> here.",
    "No, none of the people in this photo is <sks>.",
    "No, <sks> cannot be seen in this image.",
    "No, this image does not contain <sks>.",
    "No, <sks> is not pictured here.",
    "No, <sks> is not in this photo.",
    "No, <sks> is not visible in this picture.",
    "No.",
    "No, that is not <sks>.",
    "No, <sks> is nowhere in this photo.",
)

ATTRIBUTE_QUESTIONS: tuple[str, ...] = (
    "What is the hair colour of <sks>?",
    "What colour is <sks>'s hair?",
    "What is <sks>'s hairstyle?",
    "Is <sks>'s hair short or long?",
    "What is <sks>'s skin tone?",
    "What is the shape of <sks>'s face?",
    "Does <sks> wear glasses?",
    "Is <sks> wearing a hat?",
    "Does <sks> wear earrings?",
    "Does <sks> have a beard or a moustache?",
    "What colour are <sks>'s eyes?",
    "What is <sks> wearing?",
)


# Questions about two concepts at once (MC-LLaVA's joint training, `eval --pairs`): `{a}` and
# `{b}` are the two names, `{shown}` the one of them in the photo (str.format).
BOTH_QUESTIONS: tuple[str, ...] = (
    "Are <{a}> and <{b}> both in this photo?",
    "Can you see both <{a}> and <{b}> in this image?",
    "Does this photo show <{a}> and <{b}> together?",
)
BOTH_YES: tuple[str, ...] = (
    "Yes, <{a}> and <{b}> are both in this photo.",
    "Yes, I can see <{a}> and <{b}> together.",
)
BOTH_NO: tuple[str, ...] = (
    "No, only <{shown}> is in this photo.",
    "No, I can see <{shown}> but not both.",
)
WHICH_QUESTIONS: tuple[str, ...] = (
    "Which of <{a}> and <{b}> is in this photo?",
    "Who is in this image, <{a}> or <{b}>?",
)
WHICH_ANSWERS: tuple[str, ...] = (
    "<{shown}> is in this photo.",
    "I can see <{shown}>.",
)


def fill(template: str, name: str) -> str:
    """Replace every `<sks>` in `template` by `<name>` (angle brackets on `name` are optional)."""
    bare = name.strip().strip("<>")
    return template.replace(PLACEHOLDER, f"<{bare}>")


# A "compare" recognition answer: the described person checked against everyone in the photo
# before the verdict (see `comparison`). The words are the pocket model's; a real LVLM answers
# "Yes"/"No" first and never needs them.
SAME, DIFFERENT, MATCH, MISMATCH = "same", "different", "match", "mismatch"
COMPARE_WORDS: tuple[str, ...] = (SAME, DIFFERENT, MATCH, MISMATCH)
RECOGNITION_ANSWER_STYLES: tuple[str, ...] = ("plain", "compare")


def comparison(stated: Mapping[str, str], people: Sequence[tuple[str, Mapping[str, str]]],
               keys: Sequence[str]) -> tuple[str, bool]:
    """Check a description against every person in a photo, trait by trait: (the words,
    whether someone matches in every key).

    `stated` and each person's traits map a key word ("hair") to a value word ("red");
    `people` are (place, traits) in reading order. For each person: the place, then per key
    the value seen, the key, the stated value and "same" / "different", then "match" or
    "mismatch":

        "left red hair red same dark skin tan different mismatch right blue hair red different ..."

    The value seen comes first and without its key before it, so that nothing in the words so
    far says what it is: it can only be read from the photo. With the key first ("hair red
    ..."), a model that cannot yet read the photo copies the description's value (the word
    after "hair" there), and with the stated value first it repeats that value; either way it
    finds a match everywhere. The key then cues the stated value, copied from the description.
    """
    words: list[str] = []
    found = False
    for place, seen in people:
        words.append(place)
        everything = True
        for key in keys:
            want, have = stated[key], seen[key]
            words += [have, key, want, SAME if want == have else DIFFERENT]
            everything = everything and want == have
        words.append(MATCH if everything else MISMATCH)
        found = found or everything
    return " ".join(words), found
