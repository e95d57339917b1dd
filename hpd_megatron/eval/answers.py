"""Final answers of math generations: the scoring cascade, extraction, normalisation, avg@k.

    judge("<think>...</think> so the total is \\boxed{\\dfrac{3}{4}}.", "0.75").correct  # True
    extract_answer("... so the total is \\boxed{\\frac{3}{4}}.")   # -> "\\frac{3}{4}"
    answers_match("\\frac{3}{4}", "0.75")                          # -> True
    avg_at_k([[True, False], [True, True]])                         # -> 0.75

``judge`` is the evaluation's verdict, in the reference evaluation's cascade order (after
dropping a closed ``<think>...</think>`` block): the last ``\\boxed{}``, then what follows
"The answer is:", each compared with the reference by HuggingFace's math-verify
(``verify(parse("\\boxed{ref}"), parse("\\boxed{answer}"))``), then math-verify over the
whole reply (``verify(parse("\\boxed{ref}"), parse(reply))``). The first stage that finds
the reply equal decides; none: incorrect. Where math-verify cannot parse (no sympy
expression on one side), the hand-written comparison below (``answers_match``) and, for
the whole reply, its last-number extraction stand in.

Extraction takes, in this order, the content of the last ``\\boxed{...}`` (braces
balanced), the text after the last "The answer is" / "final answer:" up to the end of its
sentence, or else the last number in the text. Normalisation makes equal numbers equal
strings (exactly, with fractions: ``1,000``, ``1000.0``, ``\\frac{2}{4}`` and ``1/2``
become ``1000``, ``1000``, ``1/2``, ``1/2``) and strips LaTeX that does not change a value
(``$``, ``\\left``, ``\\!``, ``\\text{}``, degrees, percent); other answers compare as the
stripped strings, so ``\\sqrt{2}`` matches ``\\sqrt 2`` only after removing spaces.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from math_verify import parse, verify

_STATED = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*:)\s*:?\s*", re.IGNORECASE
)
# A number as written in text: thousands separators only in groups of three, so the list
# "1,2,3" reads as three numbers and "1,234" as one.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
# LaTeX that spaces or sizes but never changes a value.
_NOISE = re.compile(
    r"\\left|\\right|\\[!,;: ]|\\displaystyle|\^\s*\{?\\circ\}?|\\%|%|\$|\\\(|\\\)|\\\[|\\\]"
)


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 7``)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    command = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    rest = text[start + len(command) :].lstrip()
    if not rest.startswith("{"):
        # "\boxed 7": one whitespace-delimited token.
        token = re.match(r"[^\s$]+", rest)
        return token.group(0) if token else None
    depth = 0
    for i, char in enumerate(rest):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return rest[1:i].strip()
    return None  # unbalanced: the generation stopped inside the box


def stated_answer(text: str) -> str | None:
    """What follows the last "The answer is" (or "final answer:"), to the end of its sentence."""
    found = list(_STATED.finditer(text))
    if not found:
        return None
    line = text[found[-1].end() :].split("\n", 1)[0]
    sentence = re.split(r"\.\s", line + " ", maxsplit=1)[0]
    sentence = sentence.strip().rstrip(".").strip()
    return sentence or None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (sign, thousands separators, decimals, a/b)."""
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def extract_answer(text: str) -> str | None:
    """The final answer a generation gives: boxed, else stated, else its last number."""
    for extract in (boxed_answer, stated_answer, last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def as_number(answer: str) -> Fraction | None:
    """The exact value of a numeric answer (``-1,234.5``, ``3/4``, ``\\frac{3}{4}``), else None."""
    text = _strip_latex(answer)
    frac = _FRAC.fullmatch(text.lstrip("-"))
    if frac is not None:
        numerator, denominator = (as_number(frac.group(i) or frac.group(i + 1)) for i in (1, 3))
        if numerator is None or not denominator:
            return None
        value = numerator / denominator
        return -value if text.startswith("-") else value
    if not re.fullmatch(_NUMBER.pattern, text):
        return None
    numerator, _, denominator = text.replace(",", "").partition("/")
    if denominator and int(denominator) == 0:
        return None
    return Fraction(numerator) / (int(denominator) if denominator else 1)


def normalize_answer(answer: str) -> str:
    """A canonical string: ``p`` or ``p/q`` for numbers, the stripped text otherwise.

    A leading one-letter assignment (``x = 5``) is dropped: the value is the answer."""
    assignment = re.fullmatch(r"\s*\$?\s*[A-Za-z]\s*=\s*(.+)", answer, re.DOTALL)
    if assignment is not None:
        answer = assignment.group(1)
    value = as_number(answer)
    if value is not None:
        return str(value)
    return _strip_latex(answer).replace(" ", "").rstrip(".")


def answers_match(prediction: str | None, reference: str) -> bool:
    """Whether an extracted answer (None: none found) equals the reference answer."""
    return prediction is not None and normalize_answer(prediction) == normalize_answer(reference)


def avg_at_k(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of the share of a prompt's k samples that are correct.

    With k = 1 this is plain accuracy; with k > 1 it is the expected accuracy of one
    sample, estimated with less variance (the paper's avg@32 on AIME, avg@8 on MATH500).
    """
    if not correct:
        raise ValueError("avg@k of no prompts")
    if any(len(samples) == 0 for samples in correct):
        raise ValueError("avg@k: a prompt has no samples")
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def _strip_latex(text: str) -> str:
    text = _TEXT.sub(r"\1", text.strip())
    text = _NOISE.sub("", text).strip()
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    return text.rstrip(".").strip()


THINK_END = "</think>"
# math-verify logs every expression it fails to parse (a reply's prose, mostly): noise at
# the scale of avg@32 over a benchmark.
logging.getLogger("math_verify").setLevel(logging.CRITICAL)


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: str | None
    """The answer of the stage that decided; else the first answer any stage found."""
    stage: str | None
    """The stage that found the reply correct: boxed, stated, math_verify or last_number."""


def strip_reasoning(text: str) -> str:
    """The text after the last ``</think>``: the reasoning block is not the answer. A reply
    whose block never closes (cut off while thinking) is kept whole."""
    _, closed, after = text.rpartition(THINK_END)
    return after if closed else text


@functools.lru_cache(maxsize=4096)
def parsed_reference(reference: str) -> tuple:
    """math-verify's parse of ``\\boxed{reference}`` (cached: k replies share one reference)."""
    return tuple(parse(f"\\boxed{{{reference}}}"))


def reference_parses(reference: str) -> bool:
    """Whether math-verify reads the reference as mathematics (a sympy expression), not
    only as a raw string; where it does not, ``judge`` compares by hand."""
    return any(not isinstance(item, str) for item in parsed_reference(reference))


def math_equal(answer: str, reference: str) -> bool:
    """An extracted answer against the reference: math-verify where it parses both, else
    ``answers_match``."""
    gold, target = parsed_reference(reference), parse(f"\\boxed{{{answer}}}")
    if not reference_parses(reference) or all(isinstance(item, str) for item in target):
        return answers_match(answer, reference)
    return verify(list(gold), target)


def judge(text: str, reference: str) -> Verdict:
    """The cascade of the module doc over one reply."""
    text = strip_reasoning(text)
    found: str | None = None
    for stage, extract in (("boxed", boxed_answer), ("stated", stated_answer)):
        answer = extract(text)
        if answer is not None:
            found = found if found is not None else answer
            if math_equal(answer, reference):
                return Verdict(True, answer, stage)
    return _whole_reply(text, reference, found)


def _whole_reply(text: str, reference: str, found: str | None) -> Verdict:
    """The cascade's last stage: math-verify over the whole reply, else its last number."""
    target = parse(text)
    if reference_parses(reference) and any(not isinstance(t, str) for t in target):
        answer = str(target[-1])  # math-verify's own extraction, as written in the reply
        if verify(list(parsed_reference(reference)), target):
            return Verdict(True, answer, "math_verify")
        return Verdict(False, found if found is not None else answer, None)
    answer = last_number(text)
    if answer is not None and answers_match(answer, reference):
        return Verdict(True, answer, "last_number")
    return Verdict(False, found if found is not None else answer, None)


def sample_stderr(correct: Sequence[Sequence[bool]]) -> float | None:
    """Standard error of avg@k over its k samples: sample j's accuracy over the prompts is
    one draw of a full evaluation; this is their standard deviation (n - 1) over sqrt(k).
    None with one sample (no spread to measure) or when prompts differ in k."""
    k = len(correct[0]) if correct else 0
    if k < 2 or any(len(samples) != k for samples in correct):
        return None
    runs = [sum(samples[j] for samples in correct) / len(correct) for j in range(k)]
    mean = sum(runs) / k
    return math.sqrt(sum((run - mean) ** 2 for run in runs) / (k - 1) / k)
