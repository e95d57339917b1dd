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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from hpd_megatron.checkpoint.signals import StopRequested
from hpd_megatron.data import DistillationDataset, DistributedBatchSampler
from hpd_megatron.parallel.initialize import ParallelContext, logging_rank
from hpd_megatron.parallel.placement import to_device
from hpd_megatron.tracking import NullTracker, Tracker, start_tracking
from hpd_megatron.training.config import RunConfig

# Dense (no sparsity) bf16 tensor-core peak per GPU from NVIDIA's data sheets, for the
# console's MFU, by chip and board: an H100 PCIe or NVL card runs at lower clocks and power
# than the SXM module, while both A100 boards have the same peak.
PEAK_BF16_FLOPS: dict[tuple[str, str], float] = {
    ("A100", "sxm"): 312e12,
    ("A100", "pcie"): 312e12,
    ("H100", "sxm"): 989e12,
    ("H100", "pcie"): 756e12,
    ("H100", "nvl"): 835e12,
    ("H200", "sxm"): 989e12,
    ("H200", "nvl"): 835e12,
    ("B200", "sxm"): 2250e12,
}


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

    Beyond the logged metrics it shows what a person watching a job asks: the supervised
    tokens per second of the whole job (``tokens_per_s``), the positions per second per GPU
    (per process on CPU) counting every position of every sample, prompts and padding
    included, the time left at the median step time of this launch, and on GPUs whose peak
    is known the model FLOPs utilisation (MFU); an unknown GPU is named once instead.
    """

    LABELS = {
        "loss": "loss",
        "cross_entropy": "cross_entropy",
        "lr": "lr",
        "grad_norm": "grad_norm",
        "tokens_per_s": "supervised tok/s (total)",
        "step_time_s": "step_time_s",
    }

    def __init__(
        self,
        run: RunConfig,
        world_size: int,
        device_name: str | None = None,
    ) -> None:
        self.total = run.schedule.train_steps
        self.interval = run.logging.log_interval
        self.tokens_per_step = run.schedule.global_batch_size * run.data.seq_length
        self.world_size = world_size
        if device_name is None and torch.cuda.is_available():
            device_name = torch.cuda.get_device_name()
        self.device_name = device_name
        self.peak_flops = peak_bf16_flops(device_name) if device_name else None
        self.unknown_device_shown = False
        self.step_times: list[float] = []

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.step_times.append(metrics["step_time_s"])
        if step % self.interval == 0 or step == self.total:
            print(self.format(step, metrics), flush=True)

    def format(self, step: int, metrics: Mapping[str, Any]) -> str:
        parts = [
            f"{label} {metrics[key]:.4g}" for key, label in self.LABELS.items() if key in metrics
        ]
        parts += self._throughput(metrics, self.total - step)
        if "rollout/share" in metrics:  # what on-policy data costs: HPD's argument
            parts.append(f"rollout {100 * metrics['rollout/share']:.0f}% of the step")
        parts += [
            f"{name} {value:.3f}" for name, value in metrics.items() if name.startswith("hpd/")
        ]
        return f"step {step}/{self.total}: " + "  ".join(parts)

    def _throughput(self, metrics: Mapping[str, Any], remaining: int) -> list[str]:
        step_time = metrics["step_time_s"]
        per_device = self.tokens_per_step / step_time / self.world_size
        unit = "gpu" if self.device_name else "proc"
        parts = [f"tok/s/{unit} (all positions) {per_device:.4g}"]
        parts += self._mfu(metrics, step_time)
        # The first step of a launch includes warm-up: the median is not thrown by it.
        eta = timedelta(seconds=round(statistics.median(self.step_times) * remaining))
        return parts + [f"eta {eta}"]

    def _mfu(self, metrics: Mapping[str, Any], step_time: float) -> list[str]:
        """The step's model FLOPs (``model_flops``, which the trainer counts from the step's
        own records) per second and GPU over the GPU's peak; nothing on the CPU."""
        if self.peak_flops is None:
            if self.device_name is None or self.unknown_device_shown:
                return []
            self.unknown_device_shown = True
            return [f"mfu n/a (unknown GPU {self.device_name})"]
        if "model_flops" not in metrics:
            return []
        mfu = metrics["model_flops"] / step_time / self.world_size / self.peak_flops
        return [f"mfu {100 * mfu:.1f}%"]

    def finish(self, status: str) -> None:
        pass


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU ``torch.cuda.get_device_name()`` names; None when
    this table does not know it (a guess would make the MFU read wrong).

    The board comes from the name: "PCIe" or "NVL" in it, else the SXM module, whose name
    says only the memory ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H200").
    """
    words = device_name.upper().replace("-", " ").split()
    chip = next((word for word in words if (word, "sxm") in PEAK_BF16_FLOPS), None)
    if chip is None:
        return None
    board = "pcie" if "PCIE" in words else "nvl" if "NVL" in words else "sxm"
    return PEAK_BF16_FLOPS.get((chip, board))


def _peak_flops_per_device() -> float | None:
    """This process's GPU's peak (bench/gpu_bench.py's MFU); None on the CPU or unknown GPUs."""
    return peak_bf16_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


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
        console = ConsoleSink(run, context.world_size)
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
    """On a GPU, the peak allocated memory since the previous call: the trainer calls it
    once a step, so each step reports its own peak (the reset follows the read). On the
    CPU, the process's peak resident set since it started: ``ru_maxrss`` cannot be reset,
    so there it never falls."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def segment_lengths(dataset: DistillationDataset, index: int) -> list[int]:
    """The attention segments of sample ``index``: each record's positions, then the padding
    as one more segment (packed samples' THD attention computes it as one)."""
    records = dataset.records[dataset.offsets[index] : dataset.offsets[index + 1]]
    lengths = [int(positions) for positions in dataset.positions[records]]
    padding = dataset.seq_length - sum(lengths)
    return lengths + ([padding] if padding else [])


def attention_span(samples: Iterable[Sequence[int]]) -> float:
    """How many positions a position attends to on average, counting every key of its
    segment (no causal saving, as hpd_megatron/plan/counts.py counts): sum(len^2) / sum(len)
    over the segments."""
    lengths = [length for segments in samples for length in segments]
    return sum(length * length for length in lengths) / sum(lengths)


def step_attention_span(dataset: DistillationDataset, sampler: DistributedBatchSampler) -> float:
    """The attention span of the global batch the sampler handed out last: the full sequence
    unpacked; with packing, each record attends only to itself."""
    if not dataset.pack:
        return float(dataset.seq_length)
    first = sampler.consumed_samples - sampler.global_batch_size
    return attention_span(segment_lengths(dataset, i) for i in sampler.global_batch(first))
