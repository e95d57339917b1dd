"""The metrics logger: sinks get every step, the console line's throughput and ETA."""

from __future__ import annotations

import json

import pytest

from hpd_megatron.config import from_dict
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.metrics import ConsoleSink, JsonlSink, MetricsLogger
from tests.training_runs import STUDENT

RUN = {
    "student": {"model": STUDENT},
    "loss": {"method": "sft"},
    "data": {"seq_length": 100},
    "schedule": {"train_steps": 10, "warmup_steps": 0, "global_batch_size": 8},
    "logging": {"log_interval": 2},
}


class RecordingSink:
    def __init__(self) -> None:
        self.steps: list[tuple[int, dict]] = []
        self.status: list[str] = []

    def log_metrics(self, metrics, step) -> None:
        self.steps.append((step, dict(metrics)))

    def finish(self, status: str) -> None:
        self.status.append(status)


def test_console_line_has_throughput_per_process_and_eta(capsys):
    run = from_dict(RunConfig, RUN)
    console = ConsoleSink(run, world_size=4)
    console.log_metrics({"loss": 1.5, "step_time_s": 4.0}, 3)  # not a multiple of 2: silent
    assert capsys.readouterr().out == ""
    console.log_metrics({"loss": 1.25, "step_time_s": 2.0, "hpd/b_mean": 0.5}, 4)
    line = capsys.readouterr().out.strip()
    # 8 x 100 tokens in 2 s on 4 processes; median step 3 s x 6 steps left = 18 s.
    assert line == (
        "step 4/10: loss 1.25  step_time_s 2  tok/s/proc (all positions) 100  eta 0:00:18  "
        "hpd/b_mean 0.500"
    )


def test_logger_sends_every_step_to_every_sink_and_keeps_history(tmp_path):
    recording = RecordingSink()
    jsonl = JsonlSink(tmp_path / "metrics.jsonl")
    logger = MetricsLogger([jsonl, recording], tracker=recording)
    for step in (1, 2):
        logger.log(step, {"loss": float(step)})
    with pytest.raises(RuntimeError):
        with logger.run_status():
            raise RuntimeError("boom")
    assert recording.steps == [(1, {"loss": 1.0}), (2, {"loss": 2.0})]
    assert recording.status == ["FAILED"]
    assert logger.history == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == logger.history


def test_ranks_without_sinks_log_nothing():
    logger = MetricsLogger([], tracker=RecordingSink())
    logger.log(1, {"loss": 1.0})
    assert logger.history == []
