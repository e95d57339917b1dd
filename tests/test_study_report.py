"""The study's table and plot from a hand-made study.json (no training)."""

from __future__ import annotations

from hpd_megatron.study.report import format_table, plot_curves


def _results() -> dict:
    point = {"accuracy": 0.5, "token_entropy": 0.2, "heldout_entropy": 0.3, "kl_to_teacher": 0.1}
    return {
        "k": 4,
        "teacher": {"accuracy": 0.9, "token_entropy": 0.25, "heldout_entropy": 0.35},
        "start": {**point, "accuracy": 0.125, "kl_to_teacher": 0.5},
        "students": {
            "sft": {
                "seconds_per_step": 0.2,
                "checkpoints": [{"step": 5, **point}, {"step": 10, **point}],
            },
            "hpd": {
                "seconds_per_step": 0.3,
                "checkpoints": [{"step": 5, **point}, {"step": 10, **point, "accuracy": 0.75}],
            },
        },
    }


def test_table_has_the_teacher_the_start_and_each_method_at_its_last_checkpoint() -> None:
    lines = format_table(_results()).splitlines()
    assert lines[0].split("|")[2].strip() == "avg@4"
    assert set(lines[1]) <= {"|", "-"}
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in lines[2:]
    }
    assert list(rows) == ["teacher", "start", "sft", "hpd"]
    assert rows["teacher"] == ["0.900", "0.250", "0.350", "0", "-"]
    assert rows["start"] == ["0.125", "0.200", "0.300", "0.500", "-"]
    assert rows["hpd"] == ["0.750", "0.200", "0.300", "0.100", "0.300"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_plot_is_written(tmp_path) -> None:
    path = tmp_path / "plots" / "study.png"
    plot_curves(_results(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
