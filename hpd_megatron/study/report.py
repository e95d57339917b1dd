"""The study's table and plot, from the ``study.json`` that ``study/experiment.py`` writes."""

from __future__ import annotations

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
