"""How plvmctl asks about several concepts at once and reads the answers (`plvmctl.answers`)."""

import pytest

from plvmctl.answers import (BOTH_HERE_QUESTION, LEFT_OF_QUESTION, conclusion, name_list, parse_who,
                             parse_yes_no, which_of_question, who_of_question)

NAMES = ("ann", "bob", "cid", "dee")


def test_questions_list_the_names_as_a_sentence_would():
    assert name_list(["ann"]) == "<ann>"
    assert name_list(["ann", "bob"]) == "<ann> and <bob>"
    assert who_of_question(NAMES) == "Who of <ann>, <bob>, <cid> and <dee> is in this photo?"
    assert which_of_question(NAMES[:3]) == "Which of <ann>, <bob> and <cid> is in this photo?"
    assert BOTH_HERE_QUESTION.format(a="ann", b="bob") == "Are <ann> and <bob> both in this photo?"
    assert LEFT_OF_QUESTION.format(a="ann", b="bob") == "Is <ann> to the left of <bob>?"


@pytest.mark.parametrize("answer, expected", [
    ("<ann> and <cid> are in this photo.", ("ann", "cid")),
    ("I can see <dee> and <bob>.", ("bob", "dee")),  # the question's order, not the answer's
    ("dee is here", ("dee",)),  # a bare name counts
    ("<bob> is not here. <ann> is.", ("ann",)),
    ("I see <ann>, but not <bob>.", ("ann",)),
    ("Nobody.", ()),
    ("None of them is in this photo.", ()),
    ("Neither <ann> nor <bob>.", ()),
    ("I am not sure.", None),
    ("", None),
    (None, None),
])
def test_who_reads_the_names_an_answer_says_are_present(answer, expected):
    assert parse_who(answer, NAMES) == expected


def test_who_reads_the_conclusion_of_an_answer_that_compares_first():
    answer = "left <ann> hair red same match. right <bob> hair black other mismatch. <ann> is in this photo."
    assert parse_who(answer, NAMES) == ("ann", "bob")  # the scratchpad names both
    assert parse_who(conclusion(answer), NAMES) == ("ann",)


def test_both_here_and_left_of_are_answered_yes_or_no():
    assert parse_yes_no("Yes, <ann> and <bob> are both in this photo.") == "yes"
    assert parse_yes_no("No, only <ann> is in this photo.") == "no"
