"""Each step's metrics, reduced once and sent to pluggable sinks on the logging rank.

The sinks: ``metrics.jsonl`` in the run directory (the record the tests and the study
read), the console line, and MLflow (the ``Tracker``, which implements the same small
protocol). Only the logging rank, the last rank (a last pipeline stage, where the loss
is), has sinks; every other rank logs nothing.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from hpd_megatron.checkpoint.signals import StopRequested
from hpd_megatron.parallel.initialize import ParallelContext, logging_rank
from hpd_megatron.parallel.placement import to_device
from hpd_megatron.tracking import NullTracker, Tracker, start_tracking
from hpd_megatron.training.config import RunConfig

# Dense bf16 tensor-core peak per GPU (vendor data sheets), for the console's MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "B200": 2250e12}


class MetricsSink(Protocol):
    """Where a step's metrics go. ``Tracker`` (MLflow) is one; a test may add its own."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def finish(self, status: str) -> None: ...


class JsonlSink:
    """One JSON line per step, appended (a resumed run continues the same file).

    A run killed after its last save logged steps that the resumed run does again: the
    first step logged cuts the file back to the steps before it, so no step appears twice
    (a line cut short by the kill goes too).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cut_back = False

    def _cut_back_to(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines(keepends=True):
            try:
                earlier = json.loads(line)["step"] < step
            except (ValueError, KeyError, TypeError):
                earlier = False
            if earlier and line.endswith("\n"):
                kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(kept))
        os.replace(temporary, self.path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if not self.cut_back:
            self._cut_back_to(step)
            self.cut_back = True
        with self.path.open("a") as out:
            out.write(json.dumps({"step": step, **metrics}) + "\n")

    def finish(self, status: str) -> None:
        pass


class ConsoleSink:
    """The human-readable line every ``log_interval`` steps (and at the last step).

    Beyond the logged metrics it shows what a person watching a job asks: tokens/s per
    GPU (per process on CPU) over all processed tokens, the time left at the median step
    time of this launch, and on known GPUs the model FLOPs utilisation (MFU).
    """

    def __init__(self, run: RunConfig, world_size: int, flops_per_token: float) -> None:
        self.total = run.schedule.train_steps
        self.interval = run.logging.log_interval
        self.tokens_per_step = run.schedule.global_batch_size * run.data.seq_length
        self.world_size = world_size
        self.flops_per_token = flops_per_token
        self.peak_flops = _peak_flops_per_device()
        self.step_times: list[float] = []

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.step_times.append(metrics["step_time_s"])
        if step % self.interval == 0 or step == self.total:
            print(self.format(step, metrics), flush=True)

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        shown = ("loss", "cross_entropy", "lr", "grad_norm", "tokens_per_s", "step_time_s")
        parts = [f"{name} {metrics[name]:.4g}" for name in shown if name in metrics]
        parts += self._throughput(metrics["step_time_s"], self.total - step)
        if "rollout/share" in metrics:  # what on-policy data costs: HPD's argument
            parts.append(f"rollout {100 * metrics['rollout/share']:.0f}% of the step")
        parts += [
            f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith("hpd/")
        ]
        return f"step {step}/{self.total}: " + "  ".join(parts)

    def _throughput(self, step_time: float, remaining: int) -> list[str]:
        per_device = self.tokens_per_step / step_time / self.world_size
        unit = "gpu" if torch.cuda.is_available() else "proc"
        parts = [f"tok/s/{unit} {per_device:.4g}"]
        if self.peak_flops:
            parts.append(f"mfu {100 * per_device * self.flops_per_token / self.peak_flops:.1f}%")
        # The first step of a launch includes warm-up: the median is not thrown by it.
        eta = timedelta(seconds=round(statistics.median(self.step_times) * remaining))
        return parts + [f"eta {eta}"]

    def finish(self, status: str) -> None:
        pass


def _peak_flops_per_device() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


class MetricsLogger:
    """Sends each step's metrics to the sinks and keeps them (``history``); ends the run."""

    def __init__(self, sinks: list[MetricsSink], tracker: Tracker | NullTracker) -> None:
        self.sinks = sinks
        self.tracker = tracker
        self.history: list[dict[str, float]] = []

    @classmethod
    def for_run(
        cls,
        run: RunConfig,
        context: ParallelContext,
        flops_per_token: float,
        saved_tracking_run: Mapping[str, str | None],
    ) -> MetricsLogger:
        """Sinks on the logging rank (MLflow continues the run the checkpoint names)."""
        if not context.is_logging_rank:
            return cls([], NullTracker())
        tracker = start_tracking(
            run.tracking,
            Path(run.run_dir),
            run.to_dict(),
            run_id=saved_tracking_run.get("tracking_run_id"),
            run_token=saved_tracking_run.get("tracking_run_token"),
            tags={"world_size": str(context.world_size), "layout": context.layout.describe()},
        )
        sbatch_script = os.environ.get("HPD_SBATCH_SCRIPT")
        if sbatch_script and Path(sbatch_script).is_file():
            tracker.log_artifact(sbatch_script, "slurm", redact_text=True)
        console = ConsoleSink(run, context.world_size, flops_per_token)
        sinks = [JsonlSink(Path(run.run_dir) / "metrics.jsonl"), console, tracker]
        return cls(sinks, tracker)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Every rank calls it; only the logging rank has sinks (and metrics)."""
        if not self.sinks:
            return
        self.history.append({"step": step, **metrics})
        for sink in self.sinks:
            sink.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(path, artifact_path)

    def tracking_run(self) -> dict[str, str | None]:
        """Collective: the MLflow run's id and creation token, for a checkpoint to keep.

        The id may not exist yet (the server is slow or down); the token always does.
        """
        ids = [self.tracker.run_id, self.tracker.run_token]
        dist.broadcast_object_list(ids, src=logging_rank())
        return {"tracking_run_id": ids[0], "tracking_run_token": ids[1]}

    def finish(self, status: str) -> None:
        """End the tracked run; a second call (after an early stop) changes nothing."""
        for sink in self.sinks:
            sink.finish(status)

    @contextmanager
    def run_status(self) -> Iterator[None]:
        """FINISHED when the body returns, KILLED on a stop request, FAILED on an error."""
        try:
            yield
        except StopRequested:
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish("FINISHED")


def reduce_reports(reports: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Token means over every micro-batch and data-parallel replica (on the last stage)."""
    if not reports:
        return {}
    names = sorted(reports[0])
    # The reports come from the loss, on the device already: NCCL reduces nothing else.
    totals = to_device(torch.stack([sum(r[name] for r in reports) for name in names]))
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    values = dict(zip(names, totals.tolist()))
    tokens = values.pop("num_tokens")
    means = {name: value / max(tokens, 1.0) for name, value in values.items()}
    means["num_tokens"] = tokens
    return means


def peak_memory_gb() -> float:
    """Peak allocated device memory (GPU), or the process's peak resident set (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
