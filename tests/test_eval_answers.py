"""Answer extraction, numeric normalisation and avg@k on hand-made cases."""

from __future__ import annotations

from fractions import Fraction

import pytest

from hpd_megatron.data.arithmetic import solve
from hpd_megatron.eval.answers import (
    answers_match,
    as_number,
    avg_at_k,
    boxed_answer,
    extract_answer,
    last_number,
    normalize_answer,
    stated_answer,
)


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{42}.", "42"),
        (r"first \boxed{1}, then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),
        (r"nested \boxed{\sqrt{x^{2}+1}} done", r"\sqrt{x^{2}+1}"),
        (r"\fbox{7}", "7"),
        (r"$\boxed 12$", "12"),
        (r"unbalanced \boxed{3", None),
        ("no box at all", None),
    ],
)
def test_boxed(text, expected):
    assert boxed_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4 + 3 = 7, write 7.\nThe answer is 7.", "7"),
        ("The answer is 3.5. Then we stop.", "3.5"),
        ("the final answer is $-12$", "$-12$"),
        ("Final answer: 1,234\nextra line", "1,234"),
        ("The answer is 1. Wait, the answer is 2.", "2"),
        ("nothing stated", None),
    ],
)
def test_stated(text, expected):
    assert stated_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("we get 12 apples and -3.5 pears", "-3.5"),
        ("1,234 in total", "1,234"),
        ("the list 1,2,3", "3"),
        ("ratio 3/4", "3/4"),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_extract_prefers_box_then_statement_then_last_number():
    assert extract_answer(r"The answer is 5. Boxed: \boxed{6}. Then 7") == "6"
    assert extract_answer("The answer is 5. Later we write 7") == "5"
    assert extract_answer("We write 7 and then 8") == "8"
    assert extract_answer("no answer here") is None


def test_extract_reads_every_arithmetic_solution():
    # The demo task's written-out solutions: the extracted answer is the true result.
    for a, op, b in [(347, "+", 589), (500, "-", 499), (97, "*", 9), (0, "+", 0)]:
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert answers_match(extract_answer(solve(a, op, b)), str(expected))


@pytest.mark.parametrize(
    "text,value",
    [
        ("1,000", Fraction(1000)),
        ("1000.0", Fraction(1000)),
        ("-0.25", Fraction(-1, 4)),
        (".5", Fraction(1, 2)),
        ("6/8", Fraction(3, 4)),
        (r"\frac{6}{8}", Fraction(3, 4)),
        (r"\dfrac34", Fraction(3, 4)),
        (r"-\frac{1}{2}", Fraction(-1, 2)),
        (r"\frac{-1}{2}", Fraction(-1, 2)),
        ("$50$", Fraction(50)),
        (r"50\%", Fraction(50)),
        (r"90^\circ", Fraction(90)),
        (r"\text{ }12", Fraction(12)),
        ("1/0", None),
        (r"\sqrt{2}", None),
        ("x", None),
    ],
)
def test_as_number(text, value):
    assert as_number(text) == value


@pytest.mark.parametrize(
    "prediction,reference,match",
    [
        ("0.75", r"\frac{3}{4}", True),
        ("1,234", "1234", True),
        ("x = 5", "5", True),
        ("12.", "12", True),
        (r"\left(1, 2\right)", "(1,2)", True),
        (r"\sqrt 2", r"\sqrt2", True),
        ("0.333", "1/3", False),  # exact comparison: a rounded decimal is another number
        ("5", "-5", False),
        (None, "5", False),
    ],
)
def test_answers_match(prediction, reference, match):
    assert answers_match(prediction, reference) is match


def test_normalize_is_canonical():
    assert normalize_answer("2/4") == normalize_answer(r"\frac{1}{2}") == "1/2"
    assert normalize_answer("-007") == "-7"


def test_avg_at_k():
    assert avg_at_k([[True]]) == 1.0
    # Per prompt 2/4, 4/4, 0/4 -> 0.5.
    assert avg_at_k([[True, False, True, False], [True] * 4, [False] * 4]) == pytest.approx(0.5)
    # Each prompt weighs the same, whatever its number of samples.
    assert avg_at_k([[True], [False, False, False, True]]) == pytest.approx((1 + 0.25) / 2)
    with pytest.raises(ValueError):
        avg_at_k([])
    with pytest.raises(ValueError):
        avg_at_k([[True], []])
