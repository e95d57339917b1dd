"""Settings that matter on GPUs, checked on the CPU (issue 27, items 5 and 6).

Distributed settings as upstream Megatron-LM sets them: the run's timeout on every process
group, one GPU per task, CUDA_DEVICE_MAX_CONNECTIONS before CUDA starts, a seed per
pipeline stage, bias-dropout fusion on GPUs, CPUs per Slurm task from the node. Metrics that
read true on a GPU: the peak FLOP/s by GPU name, the peak memory per step, packed samples'
attention counted per record, one spelling per dtype, throughput labels that say what they
count, and no MLflow store INFO lines. The two-rank run at PP=2 (one spawn) covers the
process groups, the seeds and a packed training step end to end.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hpd_megatron.config import from_dict
from hpd_megatron.data import DistributedBatchSampler
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel import initialize
from hpd_megatron.plan import training_flops_per_token
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.metrics import (
    ConsoleSink,
    attention_span,
    peak_bf16_flops,
    peak_memory_gb,
    segment_lengths,
    step_attention_span,
)
from tests.multiprocess import run_on_ranks
from tests.training_runs import SEQ, STUDENT, TEACHER

ROOT = Path(__file__).resolve().parent.parent
SEED = 7  # the shared recipe's (tests/conftest.py)
TIMEOUT_MINUTES = 3.0  # neither the trainer's default (10) nor Megatron's (30)
CONSOLE_RUN = {
    "student": {"model": STUDENT},
    "loss": {"method": "sft"},
    "data": {"seq_length": 100},
    "schedule": {"train_steps": 10, "warmup_steps": 0, "global_batch_size": 8},
    "logging": {"log_interval": 1},
}


# -- CUDA_DEVICE_MAX_CONNECTIONS -------------------------------------------------------------
def test_one_cuda_connection_is_set_unless_the_user_chose_another():
    env: dict[str, str] = {}
    assert initialize.use_one_cuda_connection(env) == "1"
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    chosen = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    assert initialize.use_one_cuda_connection(chosen) == "8"


def _record_cuda_touches(monkeypatch) -> list[str | None]:
    """Each torch.cuda entry point, when called, records the variable as it was then."""
    import os

    seen: list[str | None] = []
    for name in ("is_available", "device_count", "set_device", "_lazy_init", "init"):
        original = getattr(torch.cuda, name)

        def record(*args, _original=original, **kwargs):
            seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.cuda, name, record)
    return seen


def test_the_training_command_sets_it_before_touching_cuda(monkeypatch, tmp_path):
    import os

    from hpd_megatron.train import main

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    seen = _record_cuda_touches(monkeypatch)
    with pytest.raises(SystemExit):  # the recipe does not exist: exit 1 after the set-up
        main(["--config", str(tmp_path / "missing.yaml")])
    assert os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert all(value == "1" for value in seen)


def test_the_gpu_bench_sets_it_before_touching_cuda(monkeypatch, tmp_path):
    import os

    monkeypatch.setattr(sys, "path", list(sys.path))  # the bench adds bench/ to it
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "bench" / "gpu_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    seen = _record_cuda_touches(monkeypatch)

    def benchmark(args):
        raise RuntimeError(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))

    monkeypatch.setattr(bench, "run_benchmark", benchmark)
    with pytest.raises(RuntimeError, match="^1$"):
        bench.main(["--tiny", "--output", str(tmp_path / "out.json")])
    assert all(value == "1" for value in seen)


# -- one GPU per task -----------------------------------------------------------------------
@pytest.mark.parametrize("local_rank,gpus,expected", [(3, 1, 0), (3, 8, 3), (9, 8, 1), (0, 1, 0)])
def test_gpu_index_is_the_local_rank_modulo_the_visible_gpus(local_rank, gpus, expected):
    assert initialize.gpu_index(local_rank, gpus) == expected


def test_a_task_bound_to_one_gpu_uses_device_zero(monkeypatch):
    """srun --gpus-per-task=1: each task sees one GPU while SLURM_LOCALID is 3."""
    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    backend, device = initialize._select_device("cuda", local_rank=3)
    assert (backend, device, chosen) == ("nccl", torch.device("cuda", 0), [0])


def test_no_visible_gpu_is_one_error():
    with pytest.raises(initialize.ConfigError, match="local rank 2: CUDA is available but"):
        initialize.gpu_index(2, 0)


# -- bias-dropout fusion ----------------------------------------------------------------------
@pytest.mark.parametrize("on_gpu", [True, False])
def test_bias_dropout_fusion_is_megatron_lms_default_on_gpus(monkeypatch, on_gpu):
    from megatron.core import parallel_state

    from hpd_megatron.models import builder

    for name in ("tensor_model", "pipeline_model", "context"):
        getter = f"get_{name}_parallel_world_size"
        monkeypatch.setattr(parallel_state, getter, lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_gpu)
    config = builder.transformer_config(ModelDescription.from_dict(STUDENT))
    # Off on the CPU: Megatron fuses it with torch.compile, ~30 s per process here.
    assert config.bias_dropout_fusion is on_gpu


# -- Slurm: CPUs per task -------------------------------------------------------------------
@pytest.mark.parametrize(
    "env,expected",
    [
        ({"SLURM_CPUS_ON_NODE": "128", "SLURM_NTASKS_PER_NODE": "8"}, "16"),
        ({"SLURM_CPUS_ON_NODE": "224", "SLURM_NTASKS_PER_NODE": "8"}, "28"),
        ({"SLURM_CPUS_ON_NODE": "64", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2"}, "8"),
        ({"SLURM_CPUS_ON_NODE": "4", "SLURM_NTASKS_PER_NODE": "8"}, "1"),
        (
            {"SLURM_CPUS_ON_NODE": "224", "SLURM_NTASKS_PER_NODE": "8", "SLURM_CPUS_PER_TASK": "4"},
            "4",
        ),
        ({"SLURM_CPUS_PER_TASK": "4", "HPD_CPUS_PER_TASK": "3"}, "3"),
    ],
)
def test_slurm_cpus_per_task_come_from_the_node(env, expected):
    script = f"source {ROOT}/slurm/common.sh; hpd_cpus_per_task; echo $HPD_CPUS_PER_TASK"
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == expected


def test_slurm_cpus_per_task_refuses_a_non_integer():
    script = f"source {ROOT}/slurm/common.sh; hpd_cpus_per_task"
    env = {"SLURM_CPUS_ON_NODE": "$(date)", "SLURM_NTASKS_PER_NODE": "8"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "SLURM_CPUS_ON_NODE must be a non-negative integer, got '$(date)'" in done.stdout


# -- MFU: the peak by GPU name ----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM: the name gives only the memory
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA H20", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA L40S", None),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_peak_bf16_flops_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


def test_an_unknown_gpu_says_mfu_na_once(capsys):
    console = ConsoleSink(from_dict(RunConfig, CONSOLE_RUN), 1, device_name="NVIDIA L40S")
    console.log_metrics({"loss": 1.0, "step_time_s": 2.0}, 1)
    console.log_metrics({"loss": 1.0, "step_time_s": 2.0}, 2)
    first, second = capsys.readouterr().out.splitlines()
    assert "mfu n/a (unknown GPU NVIDIA L40S)" in first
    assert "mfu" not in second


def test_console_labels_and_mfu_on_an_h100_pcie(capsys):
    console = ConsoleSink(from_dict(RunConfig, CONSOLE_RUN), 2, device_name="NVIDIA H100 PCIe")
    # 756 TFLOP in 2 s on 2 GPUs: a quarter of the PCIe board's 756 TFLOP/s per GPU.
    metrics = {"tokens_per_s": 300.0, "step_time_s": 2.0, "model_flops": 756e12}
    console.log_metrics(metrics, 1)
    line = capsys.readouterr().out.strip()
    # 8 x 100 positions in 2 s on 2 GPUs: 200 per GPU; 300 supervised tokens/s in all.
    assert "supervised tok/s (total) 300" in line
    assert "tok/s/gpu (all positions) 200" in line and "mfu 25.0%" in line


# -- peak memory per step -------------------------------------------------------------------
def test_the_gpu_peak_memory_is_reset_after_each_reading(monkeypatch):
    peaks, resets = iter([3 * 2**30, 2**30]), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(True))
    assert peak_memory_gb() == 3.0 and len(resets) == 1
    assert peak_memory_gb() == 1.0 and len(resets) == 2  # the second step's own peak


# -- packed attention FLOPs -----------------------------------------------------------------
def _packed_dataset(samples: list[list[int]], seq: int) -> SimpleNamespace:
    """What step_attention_span reads of a DistillationDataset: records' positions per sample."""
    import numpy

    lengths = [length for sample in samples for length in sample]
    offsets = numpy.cumsum([0] + [len(sample) for sample in samples])
    return SimpleNamespace(
        pack=True,
        seq_length=seq,
        positions=numpy.array(lengths),
        records=numpy.arange(len(lengths)),
        offsets=offsets,
    )


def test_attention_span_by_hand():
    # Records of 3 and 5 positions and 2 of padding: (9 + 25 + 4) / 10.
    assert attention_span([[3, 5, 2]]) == pytest.approx(3.8)
    dataset = _packed_dataset([[3, 5], [10]], seq=10)
    assert segment_lengths(dataset, 0) == [3, 5, 2] and segment_lengths(dataset, 1) == [10]
    sampler = DistributedBatchSampler(2, 2, 1, dp_rank=0, dp_size=1, seed=0)
    next(iter(sampler))  # the step hands out both samples
    assert step_attention_span(dataset, sampler) == pytest.approx((9 + 25 + 4 + 100) / 20)
    dataset.pack = False  # padded: every position attends over the whole sequence
    assert step_attention_span(dataset, sampler) == 10.0


def test_packed_attention_flops_by_hand():
    student = ModelDescription.from_dict(STUDENT)  # 4 heads of 16, 2 layers
    packed = training_flops_per_token(student, None, 3.8)
    padded = training_flops_per_token(student, None, 10)
    # Forward and backward (3 forwards) x 4 FLOPs per head dimension and key x 4 x 16 x 2.
    assert padded - packed == pytest.approx(3 * 4 * (10 - 3.8) * 4 * 16 * 2)


# -- MLflow's store stays quiet -------------------------------------------------------------
@pytest.mark.slow  # MLflow's import and a new SQL store: about 20 s here
def test_a_new_mlflow_store_logs_no_info_lines(tmp_path, capfd):
    from hpd_megatron.tracking.remote import RemoteRun

    remote = RemoteRun(
        f"sqlite:///{tmp_path / 'mlflow.db'}", "quiet", "run", {}, {}, None, None, print
    )
    remote.attach()
    err = capfd.readouterr().err
    assert remote.run_id and " INFO " not in err, err


# -- two ranks at PP=2 ----------------------------------------------------------------------
def _groups_and_seeds() -> dict:
    """This rank's process groups' timeouts and a draw from each RNG stream, unconsumed."""
    from megatron.core import parallel_state, tensor_parallel

    groups = {
        "tensor": parallel_state.get_tensor_model_parallel_group(),
        "pipeline": parallel_state.get_pipeline_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "data_gloo": parallel_state.get_data_parallel_group_gloo(),
        "model": parallel_state.get_model_parallel_group(),
        "embedding": parallel_state.get_embedding_group(),
    }
    # The gloo backend's options hold the group's timeout (no public accessor).
    timeouts = {
        name: group._get_backend(torch.device("cpu")).options._timeout
        for name, group in groups.items()
    }
    streams = {
        "default": torch.get_rng_state(),
        "model_parallel": tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"],
    }
    draws = {}
    for name, state in streams.items():
        generator = torch.Generator()
        generator.set_state(state)
        draws[name] = torch.rand(3, generator=generator)
    return {
        "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
        "timeouts": timeouts,
        "draws": draws,
    }


def _a_packed_step(recipe: str, overrides: list[str]) -> dict:
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.trainer import DistillationTrainer

    class Watching(DistillationTrainer):
        def build_models(self, resuming: bool):
            self.seen = _groups_and_seeds()  # as initialize_parallel left them
            return super().build_models(resuming)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = Watching(load_run_config(recipe, overrides))
        try:
            history = trainer.train()
        finally:
            trainer.close()
    return {**trainer.seen, "history": history, "stdout": out.getvalue()}


@pytest.fixture(scope="module")
def two_ranks(setup) -> list[dict]:
    overrides = [
        f"run_dir={setup['root'] / 'pp2_packed'}",
        "parallel.pipeline_model_parallel_size=2",
        "data.pack=true",
        "schedule.train_steps=1",
        "schedule.warmup_steps=0",
        f"performance.distributed_timeout_minutes={TIMEOUT_MINUTES}",
    ]
    return run_on_ranks(_a_packed_step, 2, setup["recipe"], overrides)


@pytest.mark.multirank
def test_every_process_group_has_the_runs_timeout(two_ranks):
    expected = datetime.timedelta(minutes=TIMEOUT_MINUTES)
    for rank in two_ranks:
        assert rank["timeouts"] == dict.fromkeys(rank["timeouts"], expected)


@pytest.mark.multirank
def test_each_pipeline_stage_has_its_own_seed(two_ranks):
    assert [rank["pp_rank"] for rank in two_ranks] == [0, 1]
    for rank in two_ranks:
        stage = SEED + 100 * rank["pp_rank"]  # upstream's _set_random_seed
        default = torch.rand(3, generator=torch.Generator().manual_seed(stage))
        tp_stream = torch.rand(3, generator=torch.Generator().manual_seed(stage + 2718 + 0))
        assert torch.equal(rank["draws"]["default"], default)
        assert torch.equal(rank["draws"]["model_parallel"], tp_stream)


@pytest.mark.multirank
def test_a_packed_steps_model_flops_count_attention_per_record(two_ranks, setup, prepared_data):
    from hpd_megatron.data import DistillationDataset

    (step,) = next(rank["history"] for rank in two_ranks if rank["history"])
    dataset = DistillationDataset(prepared_data, SEQ, pack=True, seed=SEED)
    sampler = DistributedBatchSampler(len(dataset), 4, 2, dp_rank=0, dp_size=1, seed=SEED)
    next(iter(sampler))  # step 1's global batch
    span = step_attention_span(dataset, sampler)
    assert span < SEQ, "each record attends only to itself"
    student, teacher = ModelDescription.from_dict(STUDENT), ModelDescription.from_dict(TEACHER)
    positions = 4 * SEQ
    expected = positions * training_flops_per_token(student, teacher, span)
    assert step["model_flops"] == pytest.approx(expected, rel=1e-12)
    assert step["model_flops"] < positions * training_flops_per_token(student, teacher, SEQ)


@pytest.mark.multirank
def test_the_start_up_line_spells_both_dtypes_as_the_recipes(two_ranks):
    logging_rank = two_ranks[-1]["stdout"]
    assert "student fp32, teacher fp32," in logging_rank, logging_rank
    assert (
        "supervised tok/s (total)" in logging_rank and "tok/s/proc (all positions)" in logging_rank
    )
