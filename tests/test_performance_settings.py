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

CPU = Kernels(cuda=False, apex_weight_gradient=False)
GPU = Kernels(cuda=True, apex_weight_gradient=True, te_version="2.10.0")
BARE_GPU = Kernels(cuda=True, apex_weight_gradient=False, te_problem="not installed")


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


def test_packed_samples_run_one_per_micro_batch_with_transformer_engine():
    packed = {"data": {"pack": True}, "schedule": {"micro_batch_size": 2}}
    with pytest.raises(ConfigError, match=r"schedule\.micro_batch_size: 2 with data\.pack"):
        resolve_performance(_run(**packed), 1, GPU)
    resolve_performance(_run(**packed), 1, CPU)  # the local spec takes a padded batch
    single = {"data": {"pack": True}, "schedule": {"micro_batch_size": 1}}
    assert resolve_performance(_run(**single), 1, GPU).student.use_transformer_engine


@pytest.mark.parametrize(
    "seq_length, tensor_parallel, refused",
    [(1000, 1, True), (1040, 1, False), (1040, 2, True), (1056, 2, False)],
)
def test_fp8_teacher_gemm_rows_divisible_by_16_per_rank(seq_length, tensor_parallel, refused):
    """micro_batch_size 1: the tokens a rank casts are seq_length, / TP with sequence
    parallelism (on at TP 2): 1040 is a multiple of 16, 1040 / 2 = 520 is not, 1056 / 2 is."""
    run = _run(
        data={"seq_length": seq_length},
        schedule={"micro_batch_size": 1},
        performance={"teacher_precision": "fp8"},
    )
    if refused:
        with pytest.raises(ConfigError, match=r"performance\.teacher_precision: fp8 needs"):
            resolve_performance(run, tensor_parallel, GPU)
    else:
        assert resolve_performance(run, tensor_parallel, GPU).teacher.overrides["fp8"] == "e4m3"


def test_a_broken_or_unsupported_transformer_engine_is_refused_by_name(tmp_path, monkeypatch):
    from hpd_megatron.models import builder

    broken = tmp_path / "transformer_engine"
    (broken / "pytorch").mkdir(parents=True)
    (broken / "__init__.py").write_text("__version__ = '2.10.0'\n")
    (broken / "pytorch" / "__init__.py").write_text(
        "raise OSError('libtransformer_engine.so: undefined symbol: _ZN3c10')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    builder.transformer_engine_import.cache_clear()
    try:
        version, problem = builder.transformer_engine_import()
    finally:
        builder.transformer_engine_import.cache_clear()
    assert version is None and "broken (OSError: libtransformer_engine.so" in problem
    node = Kernels(cuda=True, apex_weight_gradient=False, te_problem=problem)
    with pytest.raises(ConfigError, match="Transformer Engine is installed but broken"):
        resolve_performance(_run(), 1, node)
    newer = Kernels(cuda=True, apex_weight_gradient=False, te_version="2.12.0")
    with pytest.raises(ConfigError, match=r"2\.12\.0 is outside the supported range >=2\.9,<2\.12"):
        resolve_performance(_run(), 1, newer)
