"""The recipe's performance section: what reaches each config, and what is refused.

These tests resolve the section against the kernels of a CPU node, a GPU node with
Transformer Engine and apex, and a GPU node without them. The trainer's run with every
setting the CPU can run is in tests/test_trainer.py.
"""

from __future__ import annotations

import pytest

from hpd_megatron.errors import ConfigError
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.performance import Kernels, resolve_performance
from tests.training_runs import STUDENT, TEACHER

CPU = Kernels(cuda=False, transformer_engine=False, apex_weight_gradient=False)
GPU = Kernels(cuda=True, transformer_engine=True, apex_weight_gradient=True)
BARE_GPU = Kernels(cuda=True, transformer_engine=False, apex_weight_gradient=False)


def _run(**sections) -> RunConfig:
    from hpd_megatron.config import from_dict

    raw = {"student": {"model": STUDENT}, "teacher": {"model": TEACHER}, **sections}
    return from_dict(RunConfig, raw)


def test_gpu_defaults_follow_upstream():
    performance = resolve_performance(_run(params_dtype="bf16"), 2, GPU)
    student, teacher = performance.student, performance.teacher
    assert student.use_transformer_engine and teacher.use_transformer_engine
    assert student.overrides == {
        "sequence_parallel": True,
        "apply_rope_fusion": True,
        "gradient_accumulation_fusion": True,
        "deallocate_pipeline_outputs": True,
    }
    assert teacher.overrides == {"sequence_parallel": True, "apply_rope_fusion": True}
    assert str(teacher.params_dtype) == "torch.bfloat16"
    assert performance.ddp == {"overlap_grad_reduce": False, "overlap_param_gather": False}
    # Megatron-LM turns sequence parallelism off at TP 1.
    assert not resolve_performance(_run(), 1, GPU).student.overrides["sequence_parallel"]


def test_the_cpu_runs_the_local_spec_without_fusions():
    performance = resolve_performance(_run(), 2, CPU)
    assert not performance.student.use_transformer_engine
    assert performance.student.overrides == {
        "sequence_parallel": False,
        "apply_rope_fusion": False,
        "gradient_accumulation_fusion": False,
        "deallocate_pipeline_outputs": True,
    }
    # auto: the teacher follows params_dtype on the CPU, bf16 on CUDA.
    assert str(performance.teacher.params_dtype) == "torch.float32"
    assert str(resolve_performance(_run(), 1, GPU).teacher.params_dtype) == "torch.bfloat16"


def test_recomputation_and_fp8_teacher_reach_their_model_only():
    run = _run(
        performance={
            "recompute_granularity": "full",
            "recompute_method": "block",
            "recompute_num_layers": 2,
            "teacher_precision": "fp8",
            "teacher_fp8_recipe": "tensorwise",
        }
    )
    performance = resolve_performance(run, 1, GPU)
    assert performance.student.overrides["recompute_granularity"] == "full"
    assert performance.student.overrides["recompute_method"] == "block"
    assert performance.student.overrides["recompute_num_layers"] == 2
    assert "fp8" not in performance.student.overrides
    assert performance.teacher.overrides["fp8"] == "e4m3"
    assert performance.teacher.overrides["fp8_recipe"] == "tensorwise"
    assert "recompute_granularity" not in performance.teacher.overrides
    selective = resolve_performance(
        _run(performance={"recompute_granularity": "selective"}), 1, CPU
    ).student.overrides
    assert selective["recompute_granularity"] == "selective" and "recompute_method" not in selective


@pytest.mark.parametrize(
    "sections, kernels, tensor_parallel, key",
    [
        ({}, BARE_GPU, 1, "performance.transformer_impl"),
        ({"performance": {"sequence_parallel": True}}, CPU, 2, "performance.sequence_parallel"),
        (
            {"performance": {"sequence_parallel": True, "transformer_impl": "local"}},
            GPU,
            2,
            "performance.sequence_parallel",
        ),
        ({"data": {"seq_length": 97}}, GPU, 2, "data.seq_length"),
        ({"rollout": {"fraction": 0.5}}, GPU, 2, "rollout.fraction"),
        ({"performance": {"teacher_precision": "fp8"}}, CPU, 1, "performance.teacher_precision"),
        (
            {"performance": {"teacher_precision": "fp8", "transformer_impl": "local"}},
            GPU,
            1,
            "performance.teacher_precision",
        ),
    ],
    ids=[
        "cuda without TE",
        "sp on the cpu",
        "sp with the local spec",
        "sp with an odd sequence",
        "rollouts with sp",
        "fp8 on the cpu",
        "fp8 with the local spec",
    ],
)
def test_unavailable_settings_are_refused_by_key(sections, kernels, tensor_parallel, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_performance(_run(**sections), tensor_parallel, kernels)


def test_the_local_spec_runs_on_a_gpu_without_transformer_engine():
    performance = resolve_performance(_run(performance={"transformer_impl": "local"}), 2, BARE_GPU)
    assert not performance.student.use_transformer_engine
    assert not performance.student.overrides["sequence_parallel"]


@pytest.mark.parametrize(
    "performance, optimizer, key",
    [
        ({"overlap_param_gather": True}, {}, "performance.overlap_grad_reduce"),
        (
            {"overlap_param_gather": True, "overlap_grad_reduce": True},
            {},
            "optimizer.use_distributed_optimizer",
        ),
        ({"recompute_num_layers": 0}, {}, "performance.recompute_num_layers"),
        ({"distributed_timeout_minutes": 0}, {}, "performance.distributed_timeout_minutes"),
        ({"recompute_granularity": "some"}, {}, "performance.recompute_granularity"),
    ],
)
def test_inconsistent_sections_are_refused_by_key(performance, optimizer, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _run(performance=performance, optimizer=optimizer)
