"""The scoring cascade on tricky answers, the arithmetic task scored as before, answer
extraction, numeric normalisation, avg@k and its standard error, on hand-made cases."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from hpd_megatron.data.arithmetic import solve, write_task
from hpd_megatron.eval.answers import (
    answers_match,
    as_number,
    avg_at_k,
    boxed_answer,
    extract_answer,
    judge,
    last_number,
    normalize_answer,
    reference_parses,
    sample_stderr,
    stated_answer,
    strip_reasoning,
)

# (reply, reference, correct, why). "mv": math-verify is the reason for the verdict (the
# hand-written comparison alone would say the opposite); "cascade": the stage order is.
TRICKY = [
    (r"So $x = \boxed{\frac{1}{2}}$.", "0.5", True, ""),
    (r"\boxed{0.5}", r"\frac{1}{2}", True, ""),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True, ""),
    (r"\boxed{\tfrac34}", r"\frac{3}{4}", True, ""),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", True, "mv"),  # nested braces
    (r"\boxed{\sqrt{x^{2}+1}}", r"\sqrt{1+x^2}", True, "mv"),  # nested, reordered
    (r"\boxed{\left(3, \frac{\pi}{2}\right)}", r"\left( 3, \frac{\pi}{2} \right)", True, ""),
    (r"\boxed{(1, 2]}", "(1,2]", True, ""),
    (r"\boxed{[1, 2]}", "(1,2]", False, ""),  # another interval: closed at 1
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", True, ""),
    (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}", True, "mv"),  # a set: order does not count
    (r"\boxed{1, 2}", "2, 1", True, "mv"),  # a list of solutions read as a set
    (r"\boxed{90^\circ}", "90", True, ""),
    (r"\boxed{90^{\circ}}", r"90^\circ", True, ""),
    (r"\boxed{50\%}", "50", True, ""),
    (r"\boxed{50\%}", "0.5", True, "mv"),  # math-verify accepts 50% = 1/2 as well
    (r"\boxed{1,000}", "1000", True, ""),
    (r"\boxed{1,000,000}", "1000000", True, ""),
    (r"\boxed{1{,}000}", "1000", True, "mv"),  # LaTeX's thousands separator
    (r"\boxed{10\text{ cm}}", "10", True, "mv"),  # a unit in \text{}
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True, ""),
    (r"\boxed{\textbf{(C)}}", "C", True, "mv"),  # a multiple-choice letter
    (r"First \boxed{3}, then corrected: \boxed{4}", "4", True, ""),  # several: the last
    (r"First \boxed{4}, then corrected: \boxed{3}", "4", False, ""),
    (r"<think>maybe \boxed{7}</think> The answer is \boxed{8}.", "8", True, ""),
    (r"<think>it is \boxed{8}</think> The answer is \boxed{7}.", "8", False, ""),
    ("<think>long reasoning about 12</think>The answer is: 12", "12", True, ""),
    ("<think>cut off while thinking, 12 so far", "12", True, ""),  # never closed: kept
    ("The answer is: 0.333", "1/3", False, ""),  # a rounded decimal is another number
    (r"\boxed{\pi}", "3.14159", False, ""),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True, "mv"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", True, "mv"),  # the same polynomial
    (r"\boxed{y = 2x + 3}", "2x+3", True, ""),
    (
        r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}",
        r"\begin{pmatrix}1\\2\end{pmatrix}",
        True,
        "mv",
    ),
    (r"\boxed{-5}", "5", False, ""),
    (r"\boxed{14.0}", "14", True, ""),
    (r"\boxed{\$18.90}", "18.90", True, "mv"),
    (r"\boxed{6 - 5i}", "6-5i", True, ""),
    (r"\boxed{10^{10}}", "10000000000", True, "mv"),
    ("no answer at all", "3", False, ""),
    # A wrong box, then a right statement: the cascade accepts the statement.
    (r"The answer is $\frac{1}{2}$, i.e. \boxed{2}", "0.5", True, "cascade"),
    (r"\boxed{\frac{1}{2", "0.5", False, ""),  # cut off inside the box
    (r"\boxed{@@}", "@@", True, ""),  # not mathematics: compared as text
]


@pytest.mark.parametrize("reply,reference,correct,why", TRICKY)
def test_tricky_answers(reply, reference, correct, why):
    assert judge(reply, reference).correct is correct
    old = answers_match(extract_answer(strip_reasoning(reply)), reference)
    # The hand-written scorer disagrees exactly where math-verify or the cascade decides.
    assert (old != correct) == bool(why)


def test_table_covers_the_issue():
    assert len(TRICKY) >= 30 and sum(why == "mv" for *_, why in TRICKY) >= 10


def test_verdict_names_stage_and_answer():
    verdict = judge(r"<think>\boxed{1}</think>so \boxed{\dfrac{1}{2}}", "0.5")
    assert (verdict.correct, verdict.stage, verdict.extracted) == (True, "boxed", r"\dfrac{1}{2}")
    verdict = judge("The answer is: 7", "8")
    assert (verdict.correct, verdict.stage, verdict.extracted) == (False, None, "7")
    assert judge("we get 7 then 12", "12").stage == "math_verify"
    assert judge("nothing", "3").extracted is None


def test_unparseable_reference_is_compared_by_hand():
    assert not reference_parses("") and not reference_parses("@@") and reference_parses("0.5")
    assert judge("The answer is @@.", "@@").correct
    assert not judge("The answer is @#.", "@@").correct


def test_arithmetic_verdicts_are_unchanged(tmp_path):
    """On the demo task's data the cascade agrees with the hand-written scorer: reference
    solutions, wrong final answers, and replies cut at every line. (Cut mid-line after
    "a op b =" with a one-digit problem, math-verify reads the expression's value; the
    only difference, in replies that never reached their answer.)"""
    write_task(tmp_path, num_train=150, num_test=50, seed=0, max_digits=3, tokenizer_vocab_size=64)
    texts = 0
    for split in ("train.jsonl", "test.jsonl"):
        for line in (tmp_path / split).read_text().splitlines():
            record = json.loads(line)
            reference, solution = str(record["answer"]), record["response"]
            steps = solution.split("\n")
            replies = [
                solution,
                solution.replace(
                    f"The answer is {reference}.", f"The answer is {int(reference) + 1}."
                ),
                solution.replace(
                    f"The answer is {reference}.", f"The answer is {-int(reference) - 1}."
                ),
                solution.replace(f"The answer is {reference}.", "The answer is"),
                *("\n".join(steps[:end]) for end in range(1, len(steps))),
            ]
            for reply in replies:
                old = answers_match(extract_answer(reply), reference)
                assert judge(reply, reference).correct is old, (reply, reference)
                texts += 1
    assert texts > 1000
    assert judge("8 + 1 =", "9").correct and not answers_match(extract_answer("8 + 1 ="), "9")


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


def test_sample_stderr_by_hand():
    # 3 prompts x 4 samples. Sample j's accuracy over the prompts: (1 + 1 + 0) / 3, (0 + 1 +
    # 0) / 3, (1 + 1 + 1) / 3, (0 + 1 + 0) / 3 = 2/3, 1/3, 1, 1/3; their mean 7/12 is avg@4.
    correct = [[True, False, True, False], [True] * 4, [False, False, True, False]]
    assert avg_at_k(correct) == pytest.approx(7 / 12)
    runs = [2 / 3, 1 / 3, 1.0, 1 / 3]
    variance = sum((run - 7 / 12) ** 2 for run in runs) / 3  # (n - 1)
    assert variance == pytest.approx(((1 / 12) ** 2 + 2 * (1 / 4) ** 2 + (5 / 12) ** 2) / 3)
    assert sample_stderr(correct) == pytest.approx(math.sqrt(variance / 4))
    assert sample_stderr([[True], [False]]) is None  # k = 1: no spread over samples
    assert sample_stderr([[True, True], [False]]) is None
    assert sample_stderr([[True, True], [False, False]]) == 0.0
