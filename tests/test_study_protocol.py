"""`make study`'s pieces without running it: the styled task, the lr choice on validation,
the seeds' aggregation, the run statistics, B's gradient share and the protocol's table."""

from __future__ import annotations

import math
import re

import pytest
import torch

from hpd_megatron.data.arithmetic import generate, solve
from hpd_megatron.errors import ConfigError
from hpd_megatron.eval.answers import answers_match, extract_answer
from hpd_megatron.study.bshare import logit_gradient_parts, share
from hpd_megatron.study.protocol import ProtocolPlan, configurations
from hpd_megatron.study.report import long_table, plot_protocol, protocol_table
from hpd_megatron.study.select import choose_lr, run_statistics, spread, summarize_seeds

# ---------------------------------------------------------------- the styled task


def _styled(seed: int = 0, n: int = 300) -> list[dict]:
    train, test = generate(n, 20, seed, max_digits=2, min_digits=2, ops=("+",), styles=True)
    return test + train


def _check_steps(record: dict) -> None:
    """Every line but the closing one is a true equation whose written digits, read from
    the last to the first, give the answer."""
    *steps, final = record["response"].split("\n")
    digits = []
    for line in steps:
        numbers = [int(x) for x in re.findall(r"\d+", line)]
        if line.startswith(("Write the carry", "Then the carry")):
            digits.append(numbers[0])
            continue
        equation, _, write = line.partition(", ")
        sides = re.split(r" = | gives | makes | is | equals ", equation)
        total, operands = sorted(sides, key=lambda side: "+" in side)
        total = int(total)
        assert sum(int(x) for x in operands.split(" + ")) == total, line
        assert int(re.findall(r"\d+", write)[0]) == total % 10, line
        digits.append(total % 10)
    answer = int("".join(str(d) for d in reversed(digits)))
    assert answer == record["answer"] and final.endswith(f"The answer is {answer}.")


def test_styled_solutions_vary_and_every_answer_checks() -> None:
    records = _styled()
    for record in records:
        a, b = (int(x) for x in re.findall(r"\d+", record["prompt"]))
        assert record["answer"] == a + b
        _check_steps(record)
        # the evaluation's own answer extraction reads it
        assert answers_match(extract_answer(record["response"]), str(a + b))
    lines = [line for r in records for line in r["response"].split("\n")]
    for word in ("gives", "makes", "equals", "put", "digit", "keep", "note", "set", "Done."):
        assert any(word in line for line in lines), word
    finals = {re.sub(r"\d+", "N", r["response"].split("\n")[-1]) for r in records}
    assert len(finals) == 6
    assert len({r["response"] for r in records}) == len(records)


def test_styles_are_seeded_and_keep_the_problems() -> None:
    assert _styled(seed=3) == _styled(seed=3)
    assert [r["response"] for r in _styled(seed=3)] != [r["response"] for r in _styled(seed=4)]
    plain_train, plain_test = generate(300, 20, 0, 2, 2, ("+",))
    assert [r["prompt"] for r in plain_test + plain_train] == [r["prompt"] for r in _styled()]
    # the default task: solve()'s text, unchanged
    for record in plain_test:
        a, b = (int(x) for x in re.findall(r"\d+", record["prompt"]))
        assert record["response"] == solve(a, "+", b)


def test_styles_refuse_subtraction() -> None:
    with pytest.raises(ConfigError, match="styles: only ops"):
        generate(10, 0, 0, styles=True)


# ---------------------------------------------------------------- selection and aggregation


def test_lr_is_chosen_on_validation_ties_to_the_smaller() -> None:
    assert choose_lr({1e-4: 0.30, 3e-4: 0.42, 1e-3: 0.41}) == 3e-4
    assert choose_lr({1e-3: 0.40, 1e-4: 0.40, 3e-4: 0.20}) == 1e-4


def test_spread_mean_std_and_bootstrap_interval() -> None:
    numbers = spread([0.2, 0.3, 0.4])
    assert numbers["mean"] == pytest.approx(0.3)
    assert numbers["std"] == pytest.approx(0.1)  # sqrt(((0.1)^2 + 0 + (0.1)^2) / 2)
    # A resample of three is all 0.2 (or all 0.4) with probability 1/27 = 3.7 % > 2.5 %:
    # the 95 % interval's ends are the extremes.
    assert numbers["low"] == pytest.approx(0.2) and numbers["high"] == pytest.approx(0.4)
    narrow = spread([0.2] + [0.3] * 8 + [0.4])  # all ten at an end: 1e-10, never drawn
    assert 0.2 < narrow["low"] < 0.3 < narrow["high"] < 0.4
    assert numbers["n"] == 3
    assert spread([0.5, 0.5]) == {"mean": 0.5, "std": 0.0, "low": 0.5, "high": 0.5, "n": 2}
    assert spread([0.25])["std"] == 0.0


def test_run_statistics_clipped_share_and_medians() -> None:
    history = [
        {"grad_norm": 0.5, "step_time_s": 0.2, "hpd/b_mean": -0.1},
        {"grad_norm": 1.5, "step_time_s": 0.4, "hpd/b_mean": -0.3},
        {"grad_norm": 3.0, "step_time_s": 0.3, "hpd/b_mean": -0.2},
        {"grad_norm": 1.0, "step_time_s": 0.1, "hpd/b_mean": -0.2},
    ]
    numbers = run_statistics(history, clip_grad=1.0)
    assert numbers["clipped"] == 0.5  # 1.5 and 3.0; 1.0 is not above the threshold
    assert numbers["grad_norm_median"] == 1.25
    assert numbers["step_time_s"] == pytest.approx(0.25)
    assert numbers["hpd/b_mean"] == pytest.approx(-0.2)
    assert "rollout/share" not in numbers
    assert run_statistics(history, clip_grad=0.0)["clipped"] == 0.0


def _seed(accuracy: float, entropy: float, kl: float, step: float, clipped: float) -> dict:
    return {
        "test": {"accuracy": accuracy, "token_entropy": entropy},
        "test_greedy": {"accuracy": accuracy + 0.2},
        "kl_curve": [{"step": 0, "kl_to_teacher": 9.0}, {"step": 60, "kl_to_teacher": kl}],
        "step_time_s": step,
        "clipped": clipped,
        "grad_norm_median": 10 * step,
    }


def test_seeds_are_aggregated() -> None:
    seeds = [_seed(0.4, 0.3, 0.10, 0.2, 1.0), _seed(0.5, 0.2, 0.20, 0.4, 0.5)]
    seeds.append(_seed(0.6, 0.1, 0.30, 0.3, 0.0))
    summary = summarize_seeds(seeds)
    assert summary["accuracy"]["mean"] == pytest.approx(0.5)
    assert summary["accuracy"]["std"] == pytest.approx(0.1)
    assert summary["token_entropy"]["mean"] == pytest.approx(0.2)
    assert summary["greedy_accuracy"]["mean"] == pytest.approx(0.7)
    assert summary["greedy_accuracy"]["std"] == pytest.approx(0.1)
    assert summary["kl_to_teacher"]["mean"] == pytest.approx(0.2)  # the last checkpoint's
    assert summary["step_time_s"] == 0.3 and summary["grad_norm_median"] == 3.0
    assert summary["clipped"] == pytest.approx(0.5)
    assert "rollout_share" not in summary


# ---------------------------------------------------------------- B's gradient share


def test_b_share_of_the_worked_example() -> None:
    """q = (0.3, 0.7), p = (0.6, 0.4), y = 0, yh = 1: A = 1.408, B = 0.7 log(0.4/0.7);
    G_A = A (q - e_0) = A (-0.7, 0.7), G_B = B (q - e_1) = B (0.3, -0.3)."""
    logq = torch.log(torch.tensor([[0.3, 0.7]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    labels, sampled = torch.tensor([0]), torch.tensor([1])
    a, b = 0.3 * math.log(2) + 1.2, 0.7 * math.log(0.4 / 0.7)
    parts = logit_gradient_parts(logq, logp, labels, sampled)
    assert parts["a"] == pytest.approx(2 * (0.7 * a) ** 2)
    assert parts["b"] == pytest.approx(2 * (0.3 * b) ** 2)
    assert parts["total"] == pytest.approx(2 * (0.7 * a - 0.3 * b) ** 2)
    expected = abs(0.3 * b) / abs(0.7 * a - 0.3 * b)
    assert share(parts)["b_share"] == pytest.approx(expected)
    assert share(parts)["mean_abs_b"] == pytest.approx(abs(b))
    dropped = logit_gradient_parts(logq, logp, labels, sampled, "drop")
    assert share(dropped)["b_share"] == 0.0
    # an unsupervised position counts nowhere
    ignored = logit_gradient_parts(logq, logp, torch.tensor([-100]), sampled)
    assert ignored["tokens"] == 0 and share(ignored)["b_share"] == 0.0


# ---------------------------------------------------------------- the protocol's report


def _result(accuracies: list[float], step: float, b_share: float | None = None) -> dict:
    seeds = [_seed(acc, 0.3, 0.1, step, 0.5) for acc in accuracies]
    result = {"lr": 3e-4, "seeds": seeds, "summary": summarize_seeds(seeds)}
    if b_share is not None:
        result["b_share"] = {"final": [{"b_share": b_share}] * 3}
    return result


def _protocol_results() -> dict:
    return {
        "k": 2,
        "teacher": {
            "test": {"accuracy": 0.8, "token_entropy": 0.35},
            "test_greedy": {"accuracy": 0.9},
        },
        "start": {"test": {"accuracy": 0.1, "token_entropy": 0.5}},
        "regimes": {
            "teacher": {"sft": _result([0.4, 0.5, 0.6], 0.2), "hpd": _result([0.5] * 3, 0.3, 0.25)}
        },
        "on_policy": {"opd": _result([0.6] * 3, 1.0)},
        "curves": {"teacher": {"method": "hpd", "points": [{"step": 0, "accuracy": 0.1}]}},
        "long": {
            "teacher": {
                "hpd": {
                    "lr": 3e-4,
                    "points": [{"step": 0, "accuracy": 0.1}, {"step": 100, "accuracy": 0.45}],
                }
            }
        },
    }


def test_protocol_table_rows() -> None:
    lines = protocol_table(_protocol_results(), "teacher").splitlines()
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in lines[2:]
    }
    assert list(rows) == ["teacher", "start", "sft", "hpd", "opd (on-policy)"]
    assert rows["sft"][0] == "0.0003"
    assert rows["sft"][1].startswith("0.500 ± 0.100 [")
    assert rows["sft"][2] == "0.700 ± 0.100"  # greedy
    assert rows["hpd"][5] == "1.50"  # 0.3 s against SFT's 0.2 s
    assert rows["hpd"][9] == "0.25"
    assert rows["opd (on-policy)"][5] == "5.00"
    assert rows["teacher"][:5] == ["-", "0.800", "0.900", "0.350", "0"]
    assert rows["start"][2] == "-"  # no greedy number measured
    assert len({len(line) for line in lines}) == 1


def test_long_runs_table() -> None:
    lines = long_table(_protocol_results()).splitlines()
    assert [cell.strip() for cell in lines[0].split("|")[1:-1]] == [
        "run",
        "lr",
        "step 0",
        "step 100",
    ]
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == [
        "teacher/hpd",
        "0.0003",
        "0.100",
        "0.450",
    ]


def test_protocol_plot_is_written(tmp_path) -> None:
    path = tmp_path / "study_protocol.png"
    plot_protocol(_protocol_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_configurations_run_b_variants_in_the_first_regime_and_on_policy_last() -> None:
    plan = ProtocolPlan(methods=("hpd", "hpd_drop", "sft", "hpd_bound"), on_policy=("opd",))
    assert configurations(plan) == [
        ("teacher", "hpd"),
        ("teacher", "hpd_drop"),
        ("teacher", "sft"),
        ("teacher", "hpd_bound"),
        ("reference", "hpd"),
        ("reference", "sft"),
        ("on_policy", "opd"),
    ]
