"""The demo's synthetic reasoning task: arithmetic written out column by column.

    prompt:   Compute 347 + 589.
    response: 7 + 9 = 16, write 6 carry 1.
              4 + 8 + 1 = 13, write 3 carry 1.
              3 + 5 + 1 = 9, write 9.
              The answer is 936.

Addition and subtraction of numbers with min_digits..max_digits digits (the shorter one
padded with zeros, the smaller one subtracted from the larger), and multiplication by one
digit 2..9; ``ops`` picks which of the three are drawn.
Every step is a true equation, and the digits written (with a final "Write the carry c.")
read from the last to the first give the answer. With max_digits=3 a record is under 160
characters.

Problems are drawn with ``random.Random(seed)`` and never repeat; the first ``num_test``
distinct ones are the test split and the next ``num_train`` the training split, so the test
set does not change with the training set's size.

``styles=True`` (+ and * only) writes every solution in one of many equally valid ways, drawn
at random (a second generator seeded from ``seed``; the problems stay the same): per line
the operand order, the form of the equation and the wording of the written digit and the
carry; per problem the closing sentence, which always ends "The answer is N.". A model
trained on it learns a mixture, as a language model has several good continuations: the
study's entropy-rich teacher (docs/study.md).

    response: 9 + 7 gives 16, put 6 carry 1.
              1 + 4 + 8 makes 13, digit 3, carry 1.
              Then the carry 1.
              Done. The answer is 936.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hpd_megatron.data.chat import builtin_text
from hpd_megatron.data.files import staged_files
from hpd_megatron.data.records import conversation
from hpd_megatron.data.tokenizer import train_sentencepiece
from hpd_megatron.errors import ConfigError

OPS = ("+", "-", "*")
_ANSWER = re.compile(r"The answer is (-?\d+)\.")
Problem = tuple[int, str, int]


def solve(a: int, op: str, b: int) -> str:
    """The written-out steps and the answer of ``a op b``."""
    if op == "*":
        top, bottom = [int(d) for d in reversed(str(a))], None
    else:
        width = max(len(str(a)), len(str(b)))
        top = [int(d) for d in reversed(str(a).zfill(width))]
        bottom = [int(d) for d in reversed(str(b).zfill(width))]
    lines = []
    carry = 0  # the carry of + and *, the borrow of -
    for column, x in enumerate(top):
        if op == "+":
            y = bottom[column]
            total = x + y + carry
            lines.append(f"{x} + {y}{f' + {carry}' if carry else ''} = {total}, " + _write(total))
            carry = total // 10
        elif op == "*":
            total = x * b + carry
            lines.append(f"{x} * {b}{f' + {carry}' if carry else ''} = {total}, " + _write(total))
            carry = total // 10
        else:
            y = bottom[column]
            left = f"{x} - {y}{f' - {carry}' if carry else ''}"
            difference = x - y - carry
            if difference >= 0:
                lines.append(f"{left} = {difference}, write {difference}.")
                carry = 0
            else:
                lines.append(
                    f"{left} < 0, borrow: {x + 10} - {y}{f' - {carry}' if carry else ''} "
                    f"= {difference + 10}, write {difference + 10}."
                )
                carry = 1
    if carry and op != "-":
        lines.append(f"Write the carry {carry}.")
    answer = {"+": a + b, "-": a - b, "*": a * b}[op]
    lines.append(f"The answer is {answer}.")
    return "\n".join(lines)


# The styled solutions' choices. Each is equally likely; every combination is a true
# statement, and the last sentence is the one extract_answer and the evaluation read.
_FORMS = (
    "{left} = {total}",
    "{left} gives {total}",
    "{left} makes {total}",
    "{left} is {total}",
    "{left} equals {total}",
    "{total} = {left}",
)
_WRITES = (
    ("write {d}", "write {d} carry {c}"),
    ("put {d}", "put {d} carry {c}"),
    ("digit {d}", "digit {d}, carry {c}"),
    ("keep {d}", "keep {d} and carry {c}"),
    ("note {d}", "note {d}, carry {c}"),
    ("set {d}", "set {d}, carry {c}"),
)
_CARRY_LINES = ("Write the carry {c}.", "Then the carry {c}.")
_FINALS = (
    "The answer is {n}.",
    "Done. The answer is {n}.",
    "So {a} {op} {b} = {n}. The answer is {n}.",
    "Result {n}. The answer is {n}.",
    "Total {n}. The answer is {n}.",
    "That gives {n}. The answer is {n}.",
)
STYLED_OPS = ("+", "*")


def solve_styled(a: int, op: str, b: int, rng: random.Random) -> str:
    """``solve``'s steps in a wording drawn from ``rng`` (module doc); + and * only."""
    if op not in STYLED_OPS:
        raise ConfigError(f"styles: only {' and '.join(STYLED_OPS)} have styles, got {op!r}")
    width = max(len(str(a)), len(str(b)))
    top = [int(d) for d in reversed(str(a).zfill(width) if op == "+" else str(a))]
    bottom = [int(d) for d in reversed(str(b).zfill(width))] if op == "+" else None
    lines, carry = [], 0
    for column, x in enumerate(top):
        y = bottom[column] if op == "+" else b
        total = x * y + carry if op == "*" else x + y + carry
        operands = [str(x), str(y)] if rng.random() < 0.5 else [str(y), str(x)]
        left = f" {op} ".join(operands) + (f" + {carry}" if carry else "")
        if carry and op == "+" and rng.random() < 0.5:
            left = f"{carry} + {left[: -len(f' + {carry}')]}"  # the carry first
        equation = rng.choice(_FORMS).format(left=left, total=total)
        write = rng.choice(_WRITES)[total >= 10].format(d=total % 10, c=total // 10)
        lines.append(f"{equation}, {write}.")
        carry = total // 10
    if carry:
        lines.append(rng.choice(_CARRY_LINES).format(c=carry))
    answer = a + b if op == "+" else a * b
    lines.append(rng.choice(_FINALS).format(a=a, op=op, b=b, n=answer))
    return "\n".join(lines)


def _write(total: int) -> str:
    return f"write {total % 10} carry {total // 10}." if total >= 10 else f"write {total}."


def extract_answer(text: str) -> int | None:
    """The number after the last "The answer is", or None when the text gives no answer."""
    found = _ANSWER.findall(text)
    return int(found[-1]) if found else None


def draw_problem(
    rng: random.Random, max_digits: int, min_digits: int = 1, ops: Sequence[str] = OPS
) -> Problem:
    def number() -> int:
        digits = rng.randint(min_digits, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    op = rng.choice(ops)
    if op == "*":
        return number(), op, rng.randint(2, 9)
    a, b = number(), number()
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def record(problem: Problem, style_rng: random.Random | None = None) -> dict[str, Any]:
    """The problem's prompt, solution (styled when ``style_rng`` is given) and answer."""
    a, op, b = problem
    response = solve(a, op, b) if style_rng is None else solve_styled(a, op, b, style_rng)
    return {
        "prompt": f"Compute {a} {op} {b}.",
        "response": response,
        "answer": extract_answer(response),
    }


def generate(
    num_train: int,
    num_test: int,
    seed: int,
    max_digits: int = 3,
    min_digits: int = 1,
    ops: Sequence[str] = OPS,
    styles: bool = False,
) -> tuple[list[dict], list[dict]]:
    """(train, test) records: distinct problems, deterministic in the arguments; with
    ``styles``, the same problems in drawn wordings (module doc)."""
    if num_train < 0 or num_test < 0 or not 1 <= min_digits <= max_digits:
        raise ConfigError(
            f"need num_train, num_test >= 0 and 1 <= min_digits <= max_digits, got {num_train}, "
            f"{num_test}, {min_digits}, {max_digits}"
        )
    if not ops or set(ops) - set(OPS):
        raise ConfigError(f"ops: expected some of {' '.join(OPS)}, got {' '.join(ops) or 'none'}")
    if styles and set(ops) - set(STYLED_OPS):
        raise ConfigError(
            f"styles: only ops {' '.join(STYLED_OPS)} have styles, got {' '.join(ops)}"
        )
    rng = random.Random(seed)
    wanted = num_train + num_test
    problems: dict[Problem, None] = {}  # insertion-ordered set
    for _ in range(20 * wanted + 1000):
        if len(problems) == wanted:
            break
        problems[draw_problem(rng, max_digits, min_digits, ops)] = None
    else:
        raise ConfigError(
            f"found only {len(problems)} distinct problems with max_digits={max_digits}, "
            f"{wanted} wanted; ask for fewer or allow more digits"
        )
    # A generator of its own, so that the problems do not depend on ``styles``.
    style_rng = random.Random(f"styles-{seed}") if styles else None
    ordered = [record(p, style_rng) for p in problems]
    return ordered[num_test:], ordered[:num_test]


def write_task(
    out_dir: str | Path,
    num_train: int,
    num_test: int,
    seed: int,
    max_digits: int = 3,
    tokenizer_vocab_size: int = 0,
    min_digits: int = 1,
    ops: Sequence[str] = OPS,
    styles: bool = False,
) -> list[Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (and, if ``tokenizer_vocab_size``, a
    SentencePiece ``tokenizer.model`` trained on the training split in the builtin chat
    format) into ``out_dir``, all or nothing; return the paths written."""
    train, test = generate(num_train, num_test, seed, max_digits, min_digits, ops, styles)
    out_dir = Path(out_dir)
    outputs = [out_dir / "train.jsonl", out_dir / "test.jsonl"]
    if tokenizer_vocab_size:
        outputs.append(out_dir / "tokenizer.model")
    with staged_files(outputs) as staged:
        for path, records in zip(staged, (train, test)):
            path.write_text("".join(json.dumps(r) + "\n" for r in records))
        if tokenizer_vocab_size:
            texts = [builtin_text(conversation(r)) for r in train]
            train_sentencepiece(texts, staged[2].with_suffix(""), tokenizer_vocab_size)
    return outputs
