"""Fixtures shared by the trainer and checkpoint tests (built once per module that uses them)."""

from __future__ import annotations

import os

import pytest
import yaml

from tests.multiprocess import run_on_ranks
from tests.training_runs import SEQ, STEPS, STUDENT, TEACHER, save_initial_weights

# The CPU suite runs on the CPU, also on a GPU node; `make test-gpu` (tests/gpu/) sets
# HPD_GPU_TESTS=1 to keep the GPUs. Set before anything initialises CUDA.
if os.environ.get("HPD_GPU_TESTS") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory) -> str:
    """The arithmetic task, a SentencePiece tokenizer trained on it, and its indexed data."""
    from hpd_megatron.data import prepare
    from hpd_megatron.data.arithmetic import write_task

    root = tmp_path_factory.mktemp("data")
    write_task(
        root,
        num_train=64,
        num_test=8,
        seed=0,
        max_digits=2,
        tokenizer_vocab_size=STUDENT["vocab_size"],
    )
    prefix = root / "train"
    prepare(
        root / "train.jsonl", root / "tokenizer.model", prefix, seq_length=SEQ, log=lambda *_: None
    )
    return str(prefix)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prepared_data) -> dict:
    root = tmp_path_factory.mktemp("trainer")
    run_on_ranks(save_initial_weights, 1, str(root / "init"))
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(root / "run"),
                "seed": 7,
                "student": {"model": STUDENT},
                "teacher": {"model": TEACHER, "checkpoint": str(root / "init" / "teacher")},
                "checkpoint": {"load": str(root / "init" / "student")},
                # tests/test_training_tracking.py turns it on against a real server.
                "tracking": {"enabled": False},
                "data": {"train": prepared_data, "seq_length": SEQ},
                "loss": {"method": "hpd"},
                "optimizer": {"lr": 2.0e-3, "weight_decay": 0.0},
                "schedule": {
                    "train_steps": STEPS,
                    "warmup_steps": 1,
                    "global_batch_size": 4,
                    "micro_batch_size": 2,
                },
            }
        )
    )
    return {"root": root, "recipe": str(recipe)}


# Modules whose tests start several processes (gloo ranks, torchrun, a Slurm job), and
# those that also wait on services; `make test-fast` skips both, `make test` runs all.
MULTIRANK_MODULES = {
    "test_benchmarks",
    "test_checkpoints",
    "test_convert",
    "test_cpu_emulation",
    "test_device_placement",
    "test_generation",
    "test_gpu_check",
    "test_gpu_conftest",
    "test_layout_equivalence",
    "test_losses_tp",
    "test_packing",
    "test_rollouts",
    "test_slurm",
    "test_te_standin",
    "test_trainer",
    "test_training_tracking",
    "test_untrusted_checkpoints",
}
SLOW_MODULES = {"test_gpu_check", "test_slurm", "test_tracking", "test_training_tracking"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in MULTIRANK_MODULES:
            item.add_marker(pytest.mark.multirank)
        if module in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
