"""The study's table and plot, from the ``study.json`` that ``study/experiment.py`` writes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

RESULTS = "study.json"
"""The file ``study/experiment.py`` writes into its output directory."""
COLUMNS = ("method", "avg@{k}", "sample entropy", "held-out entropy", "KL to teacher", "s/step")


def _cells(name: str, numbers: dict[str, Any], seconds_per_step: Any) -> list[str]:
    kl = numbers.get("kl_to_teacher")
    return [
        name,
        f"{numbers['accuracy']:.3f}",
        f"{numbers['token_entropy']:.3f}",
        f"{numbers['heldout_entropy']:.3f}",
        "0" if kl is None else f"{kl:.3f}",
        "-" if seconds_per_step is None else f"{seconds_per_step:.3f}",
    ]


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: the teacher, the students' shared start, then every method at its
    last checkpoint."""
    rows = [[column.format(k=results["k"]) for column in COLUMNS]]
    rows.append(_cells("teacher", results["teacher"], None))
    rows.append(_cells("start", results["start"], None))
    for method, student in results["students"].items():
        rows.append(_cells(method, student["checkpoints"][-1], student["seconds_per_step"]))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def plot_curves(results: dict[str, Any], path: str | Path) -> None:
    """Accuracy, sample entropy and KL to the teacher of every method against training
    steps, from the shared start at step 0; the teacher's accuracy and entropy dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 3, figsize=(15, 4))
    panels = (
        ("accuracy", f"avg@{results['k']} on held-out problems"),
        ("token_entropy", "entropy of the sampling distribution (nats)"),
        ("kl_to_teacher", "KL(teacher || student), held-out (nats)"),
    )
    for axis, (key, title) in zip(axes, panels):
        for method, student in results["students"].items():
            points = [{"step": 0, **results["start"]}, *student["checkpoints"]]
            axis.plot(
                [p["step"] for p in points], [p[key] for p in points], marker="o", label=method
            )
        if key in results["teacher"]:
            axis.axhline(results["teacher"][key], color="black", linestyle="--", label="teacher")
        axis.set_xlabel("training step")
        axis.set_title(title)
    axes[0].legend()
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


# ---------------------------------------------------------------- the protocol (make study)

PROTOCOL_COLUMNS = (
    "method",
    "lr",
    "avg@{k} mean ± std [95% CI]",
    "greedy mean ± std",
    "sample entropy",
    "KL to teacher",
    "step time / SFT",
    "rollout share",
    "clipped steps",
    "median grad norm",
    "B share",
)


def _interval(numbers: dict[str, float]) -> str:
    return (
        f"{numbers['mean']:.3f} ± {numbers['std']:.3f} [{numbers['low']:.3f}, "
        f"{numbers['high']:.3f}]"
    )


def _spread(numbers: dict[str, float] | None) -> str:
    return "-" if numbers is None else f"{numbers['mean']:.3f} ± {numbers['std']:.3f}"


def _protocol_row(name: str, result: dict[str, Any], sft_step: float | None) -> list[str]:
    summary = result["summary"]
    b_share = result.get("b_share")
    return [
        name,
        f"{result['lr']:g}",
        _interval(summary["accuracy"]),
        _spread(summary.get("greedy_accuracy")),
        f"{summary['token_entropy']['mean']:.3f}",
        f"{summary['kl_to_teacher']['mean']:.3f}" if "kl_to_teacher" in summary else "-",
        f"{summary['step_time_s'] / sft_step:.2f}" if sft_step else "-",
        f"{summary['rollout_share']:.2f}" if "rollout_share" in summary else "-",
        f"{summary['clipped']:.2f}",
        f"{summary['grad_norm_median']:.2f}",
        "-"
        if b_share is None
        else f"{statistics.fmean(s['b_share'] for s in b_share['final']):.2f}",
    ]


def _markdown(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |"
        for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    return "\n".join(lines)


def protocol_table(results: dict[str, Any], regime: str) -> str:
    """One regime's Markdown table: the teacher and the start (test numbers), every method
    at its chosen learning rate over its seeds, then the on-policy methods (their data are
    their own rollouts, the same rows in both regimes). Step time is relative to ``sft`` of
    the regime."""
    methods = results["regimes"][regime]
    sft_step = methods["sft"]["summary"]["step_time_s"] if "sft" in methods else None
    rows = [[column.format(k=results["k"]) for column in PROTOCOL_COLUMNS]]
    for name in ("teacher", "start"):
        test = results[name]["test"]
        kl = "0" if name == "teacher" else "-"
        greedy = results[name].get("test_greedy")
        greedy_cell = "-" if greedy is None else f"{greedy['accuracy']:.3f}"
        rows.append(
            [name, "-", f"{test['accuracy']:.3f}", greedy_cell, f"{test['token_entropy']:.3f}", kl]
        )
        rows[-1] += ["-"] * (len(PROTOCOL_COLUMNS) - len(rows[-1]))
    for method, result in methods.items():
        rows.append(_protocol_row(method, result, sft_step))
    for method, result in results.get("on_policy", {}).items():
        rows.append(_protocol_row(f"{method} (on-policy)", result, sft_step))
    return _markdown(rows)


def long_table(results: dict[str, Any]) -> str:
    """The long runs (stage 7): test avg@k against steps, one row per (regime, method)."""
    runs = [
        (f"{regime}/{m}", run) for regime, ms in results["long"].items() for m, run in ms.items()
    ]
    steps = [point["step"] for point in runs[0][1]["points"]]
    rows = [["run", "lr", *(f"step {step}" for step in steps)]]
    for name, run in runs:
        rows.append([name, f"{run['lr']:g}", *(f"{p['accuracy']:.3f}" for p in run["points"])])
    return _markdown(rows)


def protocol_markdown(results: dict[str, Any]) -> str:
    """``table.md``: one table per regime, then the long runs where there are any."""
    parts = []
    for regime in results["regimes"]:
        parts += [f"### Regime: {regime}", "", protocol_table(results, regime), ""]
    if results.get("long"):
        parts += [f"### Long runs (seed 0): test avg@{results['k']}", "", long_table(results), ""]
    return "\n".join(parts)


def plot_protocol(results: dict[str, Any], path: str | Path) -> None:
    """Three panels: test accuracy (mean and std over seeds) per method and regime; KL to
    the teacher against steps (mean over seeds); each regime's best method's test accuracy
    against steps (the learning curve)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training machine
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, 3, figsize=(17, 4.5))
    regimes = {**results["regimes"], "on-policy": results.get("on_policy", {})}
    names = list(dict.fromkeys(m for methods in regimes.values() for m in methods))
    width = 0.8 / len(regimes)
    for i, (regime, methods) in enumerate(regimes.items()):
        xs = [names.index(m) + i * width for m in methods]
        means = [r["summary"]["accuracy"]["mean"] for r in methods.values()]
        stds = [r["summary"]["accuracy"]["std"] for r in methods.values()]
        axes[0].bar(xs, means, width, yerr=stds, capsize=3, label=regime)
    axes[0].axhline(results["teacher"]["test"]["accuracy"], color="black", linestyle="--")
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30)
    axes[0].set_title(f"test avg@{results['k']} (mean ± std over seeds; dashed: teacher)")
    axes[0].legend()
    for regime, methods in regimes.items():
        for method, result in methods.items():
            curves = [entry["kl_curve"] for entry in result["seeds"] if "kl_curve" in entry]
            if not curves:
                continue
            steps = [point["step"] for point in curves[0]]
            kl = [
                statistics.fmean(c[j]["kl_to_teacher"] for c in curves) for j in range(len(steps))
            ]
            style = "-" if regime == "teacher" else ":" if regime == "on-policy" else "--"
            axes[1].plot(steps, kl, style, marker="o", label=f"{regime}/{method}")
    axes[1].set_title("KL(teacher || student) on test references")
    axes[1].set_xlabel("training step")
    axes[1].legend(fontsize=6, ncol=2)
    for regime, curve in results.get("curves", {}).items():
        points = curve["points"]
        axes[2].plot(
            [p["step"] for p in points],
            [p["accuracy"] for p in points],
            marker="o",
            label=f"{regime}/{curve['method']}",
        )
    for regime, methods in results.get("long", {}).items():
        for method, run in methods.items():
            points = run["points"]
            axes[2].plot(
                [p["step"] for p in points],
                [p["accuracy"] for p in points],
                "--",
                marker=".",
                label=f"{regime}/{method}, {points[-1]['step']} steps, seed 0",
            )
    axes[2].set_title(f"learning curves: test avg@{results['k']} (solid: mean over seeds)")
    axes[2].set_xlabel("training step")
    axes[2].legend(fontsize=6)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def write_protocol_report(results: dict[str, Any], out: Path) -> str:
    """``table.md`` and ``study_protocol.png`` into ``out``; returns (and prints) the tables."""
    text = protocol_markdown(results)
    (out / "table.md").write_text(text)
    plot_protocol(results, out / "study_protocol.png")
    print(text, flush=True)
    return text
