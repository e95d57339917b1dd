"""Checkpoints and the FP8 teacher through a CPU stand-in for Transformer Engine.

A Transformer Engine model asks for entries a CPU checkpoint lacks (its norms' extra
states) and names its fused norms differently; its FP8 linears reuse a weight cast until
``is_first_microbatch`` is set again. ``tests/te_standin.py`` gives the CPU models those
behaviours, and these tests run every load path through it: the student's and the
teacher's weights, a resume, an export, the converter's output with ``--verify``, and
``evaluate``, at TP2 x PP2.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.multiprocess import run_on_ranks
from tests.training_runs import STUDENT, TEACHER, logged, train_on_rank

TP2_PP2 = ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]
QK_NORM = dict(TEACHER, family="qwen3", num_layers=2, qk_layernorm=True, kv_channels=24)
MODELS = {"student": STUDENT, "teacher": TEACHER, "qk_norm": QK_NORM}


# ---- bodies run on gloo ranks --------------------------------------------------------


def _write_sources(root: str, init: str) -> dict:
    """Each model as a CPU run writes it (local spec), then through Hugging Face and back:
    ``megatron/NAME`` (a CPU checkpoint: the trainer tests' initial weights for the student
    and the teacher), ``hf/NAME`` and ``converted/NAME``; then the keys each asks for."""
    from hpd_megatron.checkpoint.weights import save_model_weights
    from hpd_megatron.convert import hf_to_megatron, megatron_to_hf
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    root_path = Path(root)
    initialize_parallel(ParallelLayout(1, 1), seed=5)
    for name, fields in MODELS.items():
        description = ModelDescription.from_dict(fields)
        cpu = root_path / "megatron" / name
        if name == "qk_norm":
            model = build_gpt_model(description, transformer_config(description))
            save_model_weights(model, cpu)
        else:
            shutil.copytree(Path(init) / name, cpu)
        (cpu / "model.yaml").write_text(yaml.safe_dump(description.to_dict()))
        megatron_to_hf.convert(cpu, root_path / "hf" / name, progress=False)
        hf_to_megatron.convert(
            root_path / "hf" / name, root_path / "converted" / name, progress=False
        )
    keys = _keys_asked_and_written(root_path)
    destroy_parallel()
    return keys


def _keys_asked_and_written(root: Path) -> dict:
    """Per model: what the stand-in model asks for, upstream's list, and what the converter
    wrote; and what Megatron's local model asks for."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from hpd_megatron.checkpoint.extra_state import te_extra_state_keys, te_tensor_keys
    from hpd_megatron.checkpoint.verify import read_index
    from hpd_megatron.models.builder import build_gpt_model, transformer_config
    from hpd_megatron.models.description import ModelDescription
    from tests import te_standin

    def asked(model: torch.nn.Module) -> set[str]:
        return {
            value.unique_key if isinstance(value, ShardedObject) else value.key
            for value in model.sharded_state_dict().values()
        }

    found = {}
    for name, fields in MODELS.items():
        description = ModelDescription.from_dict(fields)
        local = asked(build_gpt_model(description, transformer_config(description)))
        found[name] = {
            "upstream": te_tensor_keys(description) | te_extra_state_keys(description),
            "local": local,
            "written": set(read_index(root / "converted" / name).state_dict_metadata),
        }
    te_standin.install()
    for name, fields in MODELS.items():
        description = ModelDescription.from_dict(fields)
        found[name]["standin"] = asked(
            build_gpt_model(description, transformer_config(description))
        )
    return found


def _train_through_standin(recipe: str, overrides: list[str]) -> dict:
    from tests import te_standin

    te_standin.install()
    return train_on_rank(recipe, overrides)


def _verify_and_evaluate_through_standin(root: str, data: str, ports: list[int]) -> dict:
    """--verify of the converter's output and of an export (against its HF conversion),
    then ``evaluate`` of that export, each loaded into stand-in models at TP2 x PP2."""
    import os

    from hpd_megatron.convert import megatron_to_hf
    from hpd_megatron.convert.verify import verify
    from hpd_megatron.evaluate import main as evaluate
    from hpd_megatron.models.description import ModelDescription
    from hpd_megatron.parallel.initialize import destroy_parallel, initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout
    from tests import te_standin

    te_standin.install()
    root_path = Path(root)
    initialize_parallel(ParallelLayout(1, 1), seed=5)
    # The export's own Hugging Face model, for --verify (the conversion runs on all ranks).
    megatron_to_hf.convert(
        root_path / "run" / "export", root_path / "hf" / "export", progress=False
    )
    destroy_parallel()
    os.environ["MASTER_PORT"] = str(ports[0])
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    initialize_parallel(ParallelLayout(2, 2), seed=5)
    reports = {}
    for name, megatron_dir in (
        ("converted", root_path / "converted" / "student"),
        ("export", root_path / "run" / "export"),
    ):
        description = ModelDescription.from_dict(
            yaml.safe_load((megatron_dir / "model.yaml").read_text())
        )
        hf_dir = root_path / "hf" / ("student" if name == "converted" else "export")
        reports[name] = verify(hf_dir, megatron_dir, description, tokens=tokens)
    destroy_parallel()
    os.environ["MASTER_PORT"] = str(ports[1])  # the last group was torn down
    data_dir = Path(data).parent
    evaluate(
        [
            "--ckpt", str(root_path / "run" / "export"),
            "--data", str(data_dir / "test.jsonl"),
            "--tokenizer", str(data_dir / "tokenizer.model"),
            "--tp", "2", "--pp", "2",
            "--max-new-tokens", "4",
            "--out", str(root_path / "evaluation"),
            "--no-tracking",
        ]
    )  # fmt: skip
    return reports


# ---- the tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin_root(setup) -> dict:
    root = setup["root"] / "standin"
    keys = run_on_ranks(_write_sources, 1, str(root), str(setup["root"] / "init"))[0]
    return {"root": root, "keys": keys}


@pytest.fixture(scope="module")
def sources(standin_root) -> Path:
    return standin_root["root"]


def test_te_model_asks_for_upstreams_keys_and_the_converter_writes_them(standin_root):
    found = standin_root["keys"]
    for name, keys in found.items():
        assert keys["standin"] == keys["upstream"], name
        assert keys["written"] == keys["upstream"], name
        # What the CPU checkpoints lack, and what made a TE model refuse them.
        norms = {key for key in keys["upstream"] - keys["local"] if "layernorm._extra_state" in key}
        assert "decoder.final_layernorm._extra_state/shard_0_1" in norms, name
        assert keys["upstream"] - keys["local"] == norms, name
        assert bool(QK_NORM is MODELS[name]) == any("q_layernorm._extra_state" in k for k in norms)


@pytest.fixture(scope="module")
def cpu_run(setup, sources) -> dict:
    """A local-spec run at TP2 x PP2 (3 steps, saves at 2 and 3, export at the end)."""
    run_dir = sources / "run"
    overrides = TP2_PP2 + [
        f"run_dir={run_dir}",
        "schedule.train_steps=3",
        "checkpoint.save_interval=2",
        f"checkpoint.export_dir={run_dir / 'export'}",
    ]
    history = logged(run_on_ranks(train_on_rank, 4, setup["recipe"], overrides))
    return {"run_dir": run_dir, "overrides": overrides, "history": history}


def test_cpu_checkpoint_resumes_through_te_standin_at_tp2_pp2(setup, sources, cpu_run):
    """A CPU checkpoint (no norm extra states) resumed by TE models: step 3 as the CPU run."""
    resumed = sources / "resumed"
    shutil.copytree(cpu_run["run_dir"] / "checkpoints", resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "iter_0000003")
    (resumed / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("2\n")
    overrides = TP2_PP2 + [f"run_dir={resumed}", "schedule.train_steps=3"]
    # The teacher's weights from the converter's output of the same teacher (HF round trip).
    overrides += [f"teacher.checkpoint={sources / 'converted' / 'teacher'}"]
    history = logged(run_on_ranks(_train_through_standin, 4, setup["recipe"], overrides))
    assert [h["step"] for h in history] == [3]
    expected = cpu_run["history"][-1]
    for key in ("loss", "cross_entropy", "grad_norm"):
        assert history[0][key] == pytest.approx(expected[key], rel=1e-5), key


def test_converter_output_trains_through_te_standin_at_tp2_pp2(setup, sources):
    overrides = TP2_PP2 + [
        f"run_dir={sources / 'from_converted'}",
        "schedule.train_steps=1",
        "schedule.warmup_steps=0",
        f"checkpoint.load={sources / 'converted' / 'student'}",
        f"teacher.checkpoint={sources / 'converted' / 'teacher'}",
    ]
    ranks = run_on_ranks(_train_through_standin, 4, setup["recipe"], overrides)
    history = logged(ranks)
    assert [h["step"] for h in history] == [1]
    assert math.isfinite(history[0]["loss"]) and all(r["teacher_unchanged"] for r in ranks)


def test_export_and_converter_output_verify_and_evaluate_through_te_standin(
    setup, sources, cpu_run, prepared_data
):
    from tests.multiprocess import free_port

    ports = [free_port(), free_port()]
    reports = run_on_ranks(
        _verify_and_evaluate_through_standin, 4, str(sources), prepared_data, ports
    )[0]
    for name, report in reports.items():
        assert report["passed"], (name, report)
    assert (sources / "evaluation").exists()


def _fp8_teacher_casts(recipe: str, overrides: list[str], pair_forwards_flag: bool) -> dict:
    """Train with an FP8 teacher on a node that reports Transformer Engine (the stand-in's
    modules stand in for it); per teacher linear, the scales of the weight casts made."""
    from hpd_megatron.training import performance
    from hpd_megatron.training.config import load_run_config
    from hpd_megatron.training.pair import DistillationPair
    from hpd_megatron.training.trainer import DistillationTrainer
    from tests import te_standin

    te_standin.install()
    node = performance.Kernels(cuda=True, apex_weight_gradient=False, te_version="2.10.0")
    performance.Kernels.detect = classmethod(lambda cls: node)
    if not pair_forwards_flag:  # the pair as it was: the student's config decides for both
        del DistillationPair.set_is_first_microbatch

    class Watching(DistillationTrainer):
        def build_models(self, resuming: bool):
            self.watched = super().build_models(resuming)
            return self.watched

    trainer = Watching(load_run_config(recipe, overrides))
    try:
        history = trainer.train()
        teacher = trainer.watched.pair.teacher
        linears = te_standin.standin_modules(teacher, te_standin.FirstMicrobatchCast)
        for linear in linears:
            linear.is_first_microbatch = False
        trainer.watched.pair.set_is_first_microbatch()
        flags_after_call = [linear.is_first_microbatch for linear in linears]
        fp8 = teacher.config.fp8, teacher.config.fp8_recipe
        startup = trainer._startup_line()
    finally:
        trainer.close()
    return {
        "history": history,
        "fp8": fp8,
        "scales": [linear.cast_scales for linear in linears],
        "flags_after_call": flags_after_call,
        "startup": startup,
    }


FP8_TEACHER = [
    "performance.teacher_precision=fp8",
    "performance.apply_rope_fusion=false",  # TE's fused RoPE: not in the stand-in
    "schedule.train_steps=2",
]


@pytest.mark.parametrize("recipe", ["tensorwise", "delayed"])
def test_fp8_teacher_recasts_its_weights_every_step(setup, recipe):
    overrides = FP8_TEACHER + [
        f"run_dir={setup['root'] / f'fp8_{recipe}'}",
        f"performance.teacher_fp8_recipe={recipe}",
    ]
    if recipe == "tensorwise":
        overrides = overrides[:-1]  # the default
    result = run_on_ranks(_fp8_teacher_casts, 1, setup["recipe"], overrides, True)[0]
    assert result["fp8"] == ("e4m3", recipe)
    assert "layer spec transformer_engine 2.10.0 (no apex)" in result["startup"]
    assert f"teacher bf16 with fp8 linears ({recipe} scaling)" in result["startup"]
    assert result["scales"] and all(result["flags_after_call"])
    for scales in result["scales"]:
        if recipe == "delayed":
            # A warm-up forward (cast at TE's initial scale 1), then one cast per step,
            # each at the scale the warm-up's amax gave.
            assert len(scales) == 3 and scales[0] == 1.0
            assert scales[1] == scales[2] != 1.0
        else:
            assert len(scales) == 2 and 1.0 not in scales
    assert [h["step"] for h in result["history"]] == [1, 2]


def test_fp8_teacher_kept_its_first_cast_when_the_pair_did_not_forward_the_flag(setup):
    """The fault: the pair carries the student's config (no fp8), so Megatron's
    ``set_is_first_microbatch`` never reached the teacher, which cast its weights once."""
    overrides = FP8_TEACHER + [f"run_dir={setup['root'] / 'fp8_unforwarded'}"]
    result = run_on_ranks(_fp8_teacher_casts, 1, setup["recipe"], overrides, False)[0]
    assert all(len(scales) == 1 for scales in result["scales"])
    assert not any(result["flags_after_call"])
