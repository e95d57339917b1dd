"""The memory/compute planner and the large recipes: numbers checked against hand arithmetic."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hpd_megatron.config import expand_variables, unset_variables_kept
from hpd_megatron.errors import ConfigError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.plan import (
    GIB,
    Interconnect,
    count_parameters,
    format_ranking,
    format_table,
    make_plan,
    rank_layouts,
    stage_parameters_per_gpu,
)
from hpd_megatron.plan import main as plan_main
from hpd_megatron.training.config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
RECIPE_70B = "recipes/llama3.1_70b_to_8b_hpd.yaml"
TINY = "recipes/tiny_cpu.yaml"
RECIPES = [
    RECIPE_70B,
    "recipes/qwen2.5_7b_to_1.5b_math_hpd.yaml",
    "recipes/qwen2.5_7b_to_1.5b_code_hpd.yaml",
    "recipes/qwen2.5_7b_to_1.5b_math_opd.yaml",
]
# The recipe's layout before the planner ranked layouts (PP across nodes), without sequence
# parallelism: the memory arithmetic below is written for it.
TP8_PP2 = ["parallel.tensor_model_parallel_size=8", "parallel.pipeline_model_parallel_size=2"]
NO_SP = ["performance.sequence_parallel=false"]
UNFUSED = ["loss.fused_head=false"]
MATH = "recipes/qwen2.5_7b_to_1.5b_math_hpd.yaml"
VARIABLES = {
    "HPD_TEACHER_CKPT": "/ckpt/teacher",
    "HPD_STUDENT_CKPT": "/ckpt/student",
    "HPD_DATA": "/data/train",
}


@pytest.fixture
def site_env(monkeypatch):
    monkeypatch.chdir(ROOT)  # model paths in recipes are relative to the repository root
    monkeypatch.delenv("HPD_RUN_DIR", raising=False)
    for name, value in VARIABLES.items():
        monkeypatch.setenv(name, value)


def model(name: str) -> ModelDescription:
    return ModelDescription.from_yaml(ROOT / "recipes/models" / name)


def test_llama_parameter_counts_match_hand_arithmetic():
    # 8B: embedding + output 128256 x 4096 each; per layer q 4096x4096, k and v 4096x1024,
    # o 4096x4096, SwiGLU 3 x 4096 x 14336, two norms of 4096; final norm 4096.
    layer_8b = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336 + 2 * 4096
    assert 2 * 128256 * 4096 + 32 * layer_8b + 4096 == 8_030_261_248
    assert count_parameters(model("llama3.1_8b.yaml")).total == 8_030_261_248
    layer_70b = 8192 * 8192 + 2 * 8192 * 1024 + 8192 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    assert 2 * 128256 * 8192 + 80 * layer_70b + 8192 == 70_553_706_496
    assert count_parameters(model("llama3.1_70b.yaml")).total == 70_553_706_496


def test_qwen_counts_include_qkv_bias_and_tied_embedding():
    # 1.5B: tied (one 151665 x 1536 matrix), q 12 x 128 = 1536 wide, k and v 2 x 128 = 256,
    # qkv bias 1536 + 2 x 256.
    layer = 1536 * (1536 + 512) + (1536 + 512) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert count_parameters(model("qwen2.5_1.5b.yaml")).total == 151665 * 1536 + 28 * layer + 1536
    # Hugging Face's 1,543,714,304 counts its 151,936-row embedding: 271 rows more.
    assert count_parameters(model("qwen2.5_1.5b.yaml"), 151936).total == 1_543_714_304


def test_memory_components_of_the_70b_to_8b_recipe(site_env):
    run = load_run_config(RECIPE_70B, TP8_PP2 + NO_SP + UNFUSED)
    plan = make_plan(run, nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.layout == {"TP": 8, "PP": 2, "DP": 2} and plan.padded_vocab == 129024
    assert not plan.sequence_parallel
    # Stage 0 per TP rank: 16 layers and the (129,024-row) embedding split 8 ways, norms whole.
    student = (16 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) + 129024 * 4096) // 8 + 16 * 8192
    assert student == 502_398_976
    teacher = (
        40 * (8192 * 10240 + 8192 * 8192 + 3 * 8192 * 28672) + 129024 * 8192
    ) // 8 + 40 * 16384
    assert teacher == 4_410_966_016
    first = plan.stages[0]
    assert first.teacher_weights * GIB == pytest.approx(2 * teacher)
    assert first.student_weights * GIB == pytest.approx(2 * student)  # bf16
    assert first.student_grads * GIB == pytest.approx(4 * student)  # fp32 grad buffer
    assert first.optimizer * GIB == pytest.approx(12 * student / 2)  # master + Adam over DP=2
    # 2 micro-batches in flight x 16 layers x 2 B x 8192 tokens x (4 x 4096 + (8192 + 2048 +
    # 3 x 14336) / 8), plus the embedding output.
    layer = 2 * 8192 * (4 * 4096 + (8192 + 2048 + 3 * 14336) // 8)
    assert first.activations * GIB == pytest.approx(2 * 16 * layer + 2 * 2 * 8192 * 4096)
    assert first.logits_and_loss == 0
    last = plan.stages[1]
    assert last.logits_and_loss * GIB == pytest.approx(3 * 8192 * 16128 * 4 + 6 * 1024 * 16128 * 4)
    assert plan.worst_stage == 0 and plan.fits
    assert first.total == pytest.approx(29.21, abs=0.01)
    # 6 x student + 2 x teacher matmul parameters (output layer included, input embedding not)
    # plus attention 4 x s x 4096 (8B) / 8192 (70B) per layer, x3 for the student.
    flops = (
        3
        * (
            2
            * (32 * (layer_params := 4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336) + 129024 * 4096)
            + 4 * 8192 * 4096 * 32
        )
        + 2 * (80 * (8192 * 10240 + 8192 * 8192 + 3 * 8192 * 28672) + 129024 * 8192)
        + 4 * 8192 * 8192 * 80
    )
    assert layer_params == 218_103_808
    assert plan.flops_per_token == flops


def test_sequence_parallelism_splits_the_layer_inputs_along_the_sequence(site_env):
    plan = make_plan(load_run_config(RECIPE_70B, TP8_PP2), nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.sequence_parallel  # the default at TP > 1 with Transformer Engine
    # The 4h of norm and matmul inputs, and the embedding output, are divided by TP too.
    layer = 2 * 8192 * (4 * 4096 // 8 + (8192 + 2048 + 3 * 14336) // 8)
    assert plan.stages[0].activations * GIB == pytest.approx(
        2 * 16 * layer + 2 * 2 * 8192 * 4096 / 8
    )


def test_communication_terms_match_hand_arithmetic(site_env):
    """TP4 x PP2 x DP4 on 4 nodes of 8: TP inside a node, the pipeline and DP across nodes."""
    run = load_run_config(
        RECIPE_70B,
        ["parallel.tensor_model_parallel_size=4", "parallel.pipeline_model_parallel_size=2"],
    )
    plan = make_plan(run, nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.layout == {"TP": 4, "PP": 2, "DP": 4} and plan.sequence_parallel
    nvlink, network = 450e9, 200e9 / 8  # defaults; the network per node is shared by 8 GPUs
    m, s, b, e = 128 // 4, 8192, 1, 2  # micro-batches per DP rank, tokens, micro-batch, bf16
    # One all-reduce (or, with SP, reduce-scatter + all-gather) of one layer's output over
    # TP=4: 2 x (tp-1)/tp x s x b x h x e bytes through each GPU's link.
    student_layer = 2 * 3 / 4 * s * b * 4096 * e
    teacher_layer = 2 * 3 / 4 * s * b * 8192 * e
    # Per micro-batch: 2 per layer and pass, +1 for embedding/output; the student's forward and
    # backward, the teacher's forward; each of the 2 stages carries half.
    tp = (2 * (2 * 32 + 1) * student_layer + (2 * 80 + 1) * teacher_layer) / 2 / nvlink
    assert tp == pytest.approx(0.05057, rel=1e-3)
    # Pipeline: a stage's sequence shard (s / TP) of both hidden states, forward and back.
    p2p = 2 * b * s // 4 * (4096 + 8192) * e / network
    assert p2p == pytest.approx(0.004027, rel=1e-3)
    compute = s * b * plan.flops_per_token / (4 * 2 * 400e12)
    # DP: reduce-scatter the fp32 gradients, all-gather the bf16 parameters of the larger
    # stage (the last: the output layer and the final norm).
    n = (16 * 218_103_808 + 128_512 * 4096) // 4 + 16 * 8192 + 4096
    dp = 3 / 4 * 4 * n / network + 3 / 4 * 2 * n / network
    step = plan.step
    assert step.compute == pytest.approx(m * compute)
    assert step.tensor_parallel == pytest.approx(m * tp)
    assert step.pipeline_p2p == pytest.approx(m * p2p)
    assert step.bubble == pytest.approx(compute + tp + p2p)  # PP - 1 = 1 slot
    assert step.data_parallel == pytest.approx(dp)
    assert plan.step_seconds == pytest.approx((m + 1) * (compute + tp + p2p) + dp)
    # A TP group wider than a node gets its share of the network, not NVLink.
    assert Interconnect().bytes_per_second(16, 8) == network
    assert Interconnect().bytes_per_second(8, 8) == nvlink


def test_ranking_orders_the_fitting_layouts_by_estimated_step_time(site_env):
    ranking = rank_layouts(load_run_config(RECIPE_70B), nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    times = [plan.step_seconds for plan in ranking]
    assert times == sorted(times) and all(plan.fits for plan in ranking)
    layouts = [(p.layout["TP"], p.layout["PP"], p.layout["DP"]) for p in ranking]
    assert len(layouts) == 13 and (1, 1, 32) not in layouts  # 141 GB of teacher on one GPU
    # Same compute everywhere. At PP1 each GPU all-reduces whole layer outputs m = 128 / DP
    # times per step at 2 x (tp-1)/tp each: TP8 32 x 1.75 = 56 volumes, TP4 16 x 1.5 = 24.
    tp4, tp8 = ranking[layouts.index((4, 1, 8))], ranking[layouts.index((8, 1, 4))]
    assert tp8.step.tensor_parallel / tp4.step.tensor_parallel == pytest.approx(56 / 24)
    assert layouts.index((4, 1, 8)) < layouts.index((8, 1, 4))


def _sbatch_header(script: str) -> dict[str, int]:
    text = (ROOT / "slurm" / script).read_text()
    return {k: int(v) for k, v in re.findall(r"^#SBATCH --([a-z-]+)=(\d+)$", text, re.M)}


def test_the_70b_recipe_uses_the_planners_first_choice_for_its_nodes(site_env):
    header = _sbatch_header("hpd_70b_to_8b.sh")
    shape = {"nodes": header["nodes"], "gpus_per_node": header["gpus-per-node"]}
    assert shape == {"nodes": 4, "gpus_per_node": 8}
    run = load_run_config(RECIPE_70B)
    best = rank_layouts(run, **shape, gpu_mem_gib=80)[0]
    chosen = make_plan(run, **shape, gpu_mem_gib=80)
    assert chosen.fits and chosen.layout == best.layout == {"TP": 4, "PP": 1, "DP": 8}
    assert chosen.step_seconds == best.step_seconds


def test_stage_split_puts_embedding_first_and_output_last():
    count = count_parameters(model("llama3.1_8b.yaml"), 128256)
    first, last = (stage_parameters_per_gpu(count, 1, 2, s) for s in (0, 1))
    assert first - last == -4096  # same layers and vocab rows; the final norm is on the last


def test_single_gpu_cannot_hold_the_70b_pair(site_env):
    plan = make_plan(
        load_run_config(
            RECIPE_70B,
            ["parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1"],
        ),
        nodes=1,
        gpus_per_node=1,
        gpu_mem_gib=80,
    )
    assert not plan.fits and plan.problems == []
    assert plan.stages[0].teacher_weights == pytest.approx(2 * 70_553_706_496 / GIB)


def test_divisibility_violations_are_each_listed(site_env):
    run = load_run_config(
        RECIPE_70B,
        [
            "parallel.tensor_model_parallel_size=3",
            "parallel.pipeline_model_parallel_size=2",
            "schedule.global_batch_size=102",
        ],
    )
    plan = make_plan(run, nodes=3, gpus_per_node=8, gpu_mem_gib=80)
    assert not plan.fits
    text = "\n".join(plan.problems)
    assert "student: TP=3 does not divide num_attention_heads=32" in text
    assert "teacher: TP=3 does not divide num_query_groups (KV heads)=8" in text
    assert "global_batch_size 102 is not a multiple of micro_batch_size x DP = 1 x 4" in text
    assert "data.seq_length: 8192 is not a multiple of the TP size 3, which sequence" in text


def test_cli_plans_without_site_paths_prints_ranking_writes_json(tmp_path):
    # None of the recipe's site variables is set: planning reads no path.
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES} | {"PYTHONWARNINGS": "ignore"}
    out = tmp_path / "plan.json"
    ok = subprocess.run(
        [sys.executable, "-m", "hpd_megatron.plan", "--config", RECIPE_70B, "--nodes", "4"]
        + ["--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "note: HPD_TEACHER_CKPT, HPD_DATA, HPD_STUDENT_CKPT not set" in ok.stdout
    assert "teacher_weights" in ok.stdout and "worst stage 0: 60.18 GiB of 80.00 GiB" in ok.stdout
    assert "at least 17.9 s per step from compute alone (lower bound)" in ok.stdout
    assert "the 5 fastest of 13 layouts that fit" in ok.stdout
    assert re.search(r"^\* TP4 PP1 DP8 SP +19\.93 +17\.89 +1\.62 ", ok.stdout, re.M), ok.stdout
    assert "loss head: fused (loss.fused_head: true)" in ok.stdout
    data = json.loads(out.read_text())
    assert data["fits"] and data["layout"] == {"TP": 4, "PP": 1, "DP": 8}
    assert data["loss_head"] == "fused"
    assert data["student_parameters"] == 8_030_261_248
    assert data["step_seconds_lower_bound"] == data["step"]["compute"]
    assert data["step_seconds_estimate"] == pytest.approx(19.93, abs=0.005)
    assert len(data["ranking"]) == 13 and data["ranking"][0]["layout"] == data["layout"]


def test_cli_refuses_a_layout_that_does_not_fit(site_env, capsys):
    code = plan_main(
        [
            "--config",
            RECIPE_70B,
            "parallel.tensor_model_parallel_size=1",
            "parallel.pipeline_model_parallel_size=1",
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
        ]
    )
    assert code == 1
    assert (
        "does not fit: 305.42 GiB needed on the worst stage (stage 0), 80.00 GiB available"
        in capsys.readouterr().err
    )


# ---- the loss head: loss.fused_head (issue 28) ---------------------------------------------
# The math recipe on 1 node x 8 GPUs at TP2 (DP4, sequence parallel, bf16): Qwen2.5-1.5B
# student (h 1536, vocab 151,665 padded to 151,808: 75,904 per TP rank), Qwen2.5-7B teacher
# (h 3584), 1 x 10,240 tokens per micro-batch, loss.method hpd (a token method).
MATH_SHARD, MATH_TOKENS = 151_808 // 2, 10240


def test_fused_head_keeps_the_math_recipes_loss_under_one_gib(site_env):
    plan = make_plan(load_run_config(MATH), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.layout == {"TP": 2, "PP": 1, "DP": 4} and plan.sequence_parallel
    assert plan.loss_head == "fused" and plan.padded_vocab == 151_808
    shard, tokens = MATH_SHARD, MATH_TOKENS
    chunk = 2**24 // shard  # loss.chunk_size unset: 16 Mi elements of the shard
    assert chunk == 221
    fused = (
        chunk * shard * (4 * 4 + 2)  # four fp32 [chunk, V/TP] buffers + the bf16 GEMM output
        + tokens * 72  # per-token state
        + tokens * 1536 * 2  # the student hidden states' gradient
        + shard * 1536 * 2  # the dummy weight gradient DDP's hook receives
        + tokens * (1536 + 3584) * 2  # SP: both models' all-gathered hidden states
    )
    assert fused == 672_175_360
    assert plan.stages[0].logits_and_loss * GIB == fused
    assert plan.stages[0].logits_and_loss < 1  # GiB
    assert plan.stages[0].logits_and_loss == pytest.approx(0.626, abs=0.001)


def test_materialised_logits_of_the_math_recipe_without_the_fused_head(site_env):
    fused = make_plan(load_run_config(MATH), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    plan = make_plan(load_run_config(MATH, UNFUSED), nodes=1, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.layout == fused.layout and plan.loss_head == "materialised"
    shard, tokens = MATH_SHARD, MATH_TOKENS
    # Student logits, their gradient and the teacher's logits in fp32, plus the loss kernel's
    # six fp32 buffers of loss.chunk_size unset: 1,024 tokens.
    materialised = 3 * tokens * shard * 4 + 6 * 1024 * shard * 4
    assert materialised == 11_192_500_224
    assert plan.stages[0].logits_and_loss * GIB == materialised
    assert plan.stages[0].logits_and_loss == pytest.approx(10.42, abs=0.005)
    # Nothing else changes: the difference is the loss head's alone.
    assert plan.worst_gib - fused.worst_gib == pytest.approx((materialised - 672_175_360) / GIB)
    assert plan.step_seconds == fused.step_seconds
    chunked = make_plan(
        load_run_config(MATH, UNFUSED + ["loss.chunk_size=512"]),
        nodes=1,
        gpus_per_node=8,
        gpu_mem_gib=80,
    )
    assert chunked.stages[0].logits_and_loss * GIB == materialised - 6 * 512 * shard * 4


def test_fused_head_of_a_full_vocabulary_method_in_fp32(site_env):
    """The tiny recipe (fp32, TP1, no SP; 4 x 96 = 384 tokens, vocab 128, student h 96,
    teacher h 192) with fkl and 100-token chunks: seven fp32 buffers and no narrower GEMM
    output, and the teacher's hidden states kept for the backward."""
    run = load_run_config(TINY, ["loss.fused_head=true", "loss.method=fkl", "loss.chunk_size=100"])
    plan = make_plan(run, nodes=1, gpus_per_node=2, gpu_mem_gib=80)
    assert plan.layout == {"TP": 1, "PP": 2, "DP": 1} and not plan.sequence_parallel
    fused = 100 * 128 * 7 * 4 + 384 * 72 + 384 * 96 * 4 + 128 * 96 * 4 + 384 * 192 * 4
    assert fused == 877_568
    assert [m.logits_and_loss * GIB for m in plan.stages] == [0, fused]


def test_the_table_and_the_json_name_the_loss_head(site_env, tmp_path, capsys):
    def plan(overrides: list[str]) -> tuple[str, dict]:
        out = tmp_path / "plan.json"
        args = ["--config", MATH, *overrides, "--nodes", "1", "--json", str(out)]
        assert plan_main(args) == 0
        return capsys.readouterr().out, json.loads(out.read_text())

    text, data = plan([])
    assert re.search(r"^loss head: fused \(loss\.fused_head: true\)", text, re.M)
    assert re.search(r"^logits_and_loss +0\.63$", text, re.M)
    assert data["loss_head"] == "fused"
    assert data["stages"][0]["logits_and_loss"] == pytest.approx(672_175_360 / GIB)
    text, data = plan(UNFUSED)
    assert re.search(r"^loss head: materialised logits \(loss\.fused_head: false\)", text, re.M)
    assert re.search(r"^logits_and_loss +10\.42$", text, re.M)
    assert data["loss_head"] == "materialised"


def test_only_check_inputs_needs_the_site_variables(site_env, monkeypatch, capsys):
    monkeypatch.delenv("HPD_TEACHER_CKPT")
    args = ["--config", RECIPES[1], "--nodes", "1"]
    assert plan_main(args) == 0
    assert "note: HPD_TEACHER_CKPT not set" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="teacher.checkpoint: environment variable HPD_TEACHER"):
        plan_main(args + ["--check-inputs"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_load_with_variables_set(site_env, recipe):
    run = load_run_config(recipe)
    assert run.teacher.checkpoint == "/ckpt/teacher" and run.checkpoint.load == "/ckpt/student"
    assert run.data.train == "/data/train" and run.run_dir.startswith("runs/")
    assert make_plan(run, nodes=4, gpus_per_node=8, gpu_mem_gib=80).fits


def test_math_recipe_has_the_papers_settings(site_env):
    run = load_run_config(RECIPES[1])
    assert (run.optimizer.lr, run.schedule.warmup_steps, run.optimizer.min_lr_ratio) == (
        1e-4,
        10,
        0.1,
    )
    assert (run.optimizer.weight_decay, run.optimizer.clip_grad) == (0.1, 1.0)
    assert (run.schedule.global_batch_size, run.data.seq_length) == (256, 10240)


def test_unset_variable_names_file_key_and_variable(site_env, monkeypatch):
    monkeypatch.delenv("HPD_TEACHER_CKPT")
    with pytest.raises(ConfigError) as error:
        load_run_config(RECIPE_70B)
    message = str(error.value)
    assert (
        RECIPE_70B in message and "teacher.checkpoint" in message and "HPD_TEACHER_CKPT" in message
    )


def test_expansion_defaults_and_nesting(monkeypatch):
    monkeypatch.setenv("A", "x")
    monkeypatch.delenv("B", raising=False)
    data = {"k": "${A}/${B:-d}/${B:-}", "n": 3, "l": ["${A}"], "s": {"t": "$A plain"}}
    assert expand_variables(data, "f.yaml") == {
        "k": "x/d/",
        "n": 3,
        "l": ["x"],
        "s": {"t": "$A plain"},
    }
    with pytest.raises(ConfigError, match=r"f.yaml: l\[0\]: environment variable B is not set"):
        expand_variables({"l": ["${B}"]}, "f.yaml")
    with unset_variables_kept() as unset:
        kept = expand_variables({"l": ["${B}/${B}", "${B:-d}"], "k": "${A}"}, "f.yaml")
    assert kept == {"l": ["${B}/${B}", "d"], "k": "x"} and unset == ["B"]
    with pytest.raises(ConfigError, match="environment variable B is not set"):
        expand_variables("${B}", "f.yaml")  # strict again after the block


# ---- rollouts (issue 19) --------------------------------------------------------------------
# The 70B recipe with rollouts: one record per sample, no sequence parallelism (the trainer
# refuses both otherwise), replies of half the sequence.
ROLLOUTS = ["data.pack=false", "performance.sequence_parallel=false", "rollout.max_new_tokens=4096"]


def test_rollout_flops_kv_cache_and_time_match_hand_arithmetic(site_env):
    """The tiny recipe (TP1 PP2 DP2, fp32): student 2 layers, h 96, 4 heads of 24, 2 KV
    groups, FFN 256, vocab 128 (untied, no padding at TP1); seq 96, global batch 16."""
    run = load_run_config(TINY, ["rollout.fraction=0.5", "rollout.max_new_tokens=32"])
    kwargs = {"nodes": 1, "gpus_per_node": 4, "gpu_mem_gib": 80}
    plan = make_plan(run, **kwargs, tflops=1e-6, hbm_gb_s=1.0)  # 1e6 FLOP/s: compute-bound
    assert plan.layout == {"TP": 1, "PP": 2, "DP": 2} and plan.padded_vocab == 128
    cost = plan.rollout
    # 8 rows of 16 per step, 4 per DP rank; prompt estimated at 96 - 32 = 64 tokens.
    assert (cost.rows, cost.rows_per_dp_rank, cost.prompt_tokens, cost.new_tokens) == (
        8,
        4,
        64,
        32,
    )
    # Matmul weights: 2 x (qkv 96 x 192 + o 96 x 96 + SwiGLU 3 x 96 x 256) + output 128 x 96.
    matmul = 2 * (96 * 192 + 96 * 96 + 3 * 96 * 256) + 128 * 96
    assert matmul == 215_040

    def forward(context: int) -> int:  # per token: 2 per weight + 4 x c x 4 heads x 24 x 2
        return 2 * matmul + 4 * context * 4 * 24 * 2

    # Prefill: 64 tokens at s = 64, the output layer on the last position only.
    prefill = 64 * forward(64) - 63 * 2 * 128 * 96
    assert prefill == 29_122_560
    # Decode: the tokens at positions 64..94 are fed back (the 32nd, at 95, is not): contexts
    # 65..95.
    decode = 31 * 2 * matmul + 4 * 4 * 24 * 2 * sum(range(65, 96))
    assert decode == 15_237_120
    assert (cost.prefill_flops, cost.decode_flops) == (8 * prefill, 8 * decode)
    # The stages take turns: the busiest rank's 4 rows at 1e6 FLOP/s on TP = 1.
    assert cost.prefill_seconds == pytest.approx(4 * prefill / 1e6)
    assert cost.decode_seconds == pytest.approx(4 * decode / 1e6)
    # KV cache per GPU: 2 (K, V) x 1 layer per stage x 2 groups x 24 x 4 B x 4 rows x 96.
    assert [m.kv_cache * GIB for m in plan.stages] == [147_456, 147_456]
    assert plan.step.rollout == cost.seconds

    # Memory-bound at 1e6 B/s: each forward reads the 215,040 fp32 weights of both stages,
    # a decode step at context c also 2 x 2 layers x 2 groups x 24 x 4 B x 4 rows x c.
    slow = make_plan(run, **kwargs, tflops=1e6, hbm_gb_s=1e-3).rollout
    weights = 4 * matmul
    assert slow.prefill_seconds == pytest.approx(weights / 1e6)
    kv = sum(2 * 2 * 2 * 24 * 4 * 4 * c for c in range(65, 96))
    assert slow.decode_seconds == pytest.approx((31 * weights + kv) / 1e6)
    assert slow.decode_seconds == pytest.approx(34.28352)
    # The trainer's choice (training/rollout.py): floor(0.35 x 16) = 5 rows, at positions 2, 5
    # of rank 0's slice 0..7 and 8, 11, 14 of rank 1's: the busier rank's 3 set the time and
    # the cache.
    odd = make_plan(
        load_run_config(TINY, ["rollout.fraction=0.35", "rollout.max_new_tokens=32"]), **kwargs
    )
    assert (odd.rollout.rows, odd.rollout.rows_per_dp_rank) == (5, 3)
    assert odd.stages[0].kv_cache * GIB == 147_456 // 4 * 3


def test_kv_cache_competes_with_activations_not_added_to_them(site_env):
    run = load_run_config(
        TINY,
        ["rollout.fraction=1", "rollout.max_new_tokens=32", "schedule.global_batch_size=1024"],
    )
    stage = make_plan(run, nodes=1, gpus_per_node=2, gpu_mem_gib=80).stages[0]
    # 1024 rows on one DP rank: the cache outgrows the training phase and replaces it.
    assert stage.kv_cache * GIB == 2 * 1 * 2 * 24 * 4 * 1024 * 96
    assert stage.kv_cache > stage.activations + stage.logits_and_loss
    weights = stage.teacher_weights + stage.student_weights + stage.student_grads
    assert stage.total == pytest.approx(weights + stage.optimizer + stage.kv_cache + 4.0)
    small = make_plan(
        load_run_config(TINY, ["rollout.fraction=0.0625", "rollout.max_new_tokens=32"]),
        nodes=1,
        gpus_per_node=2,
        gpu_mem_gib=80,
    ).stages[0]
    assert 0 < small.kv_cache < small.activations
    assert (
        small.total
        == make_plan(load_run_config(TINY), nodes=1, gpus_per_node=2, gpu_mem_gib=80)
        .stages[0]
        .total
    )


def test_fraction_zero_is_todays_plan(site_env):
    """With fraction 0 the other rollout settings change nothing: today's numbers and text."""
    today = make_plan(load_run_config(RECIPE_70B), nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    zero = make_plan(
        load_run_config(RECIPE_70B, ["rollout.fraction=0", "rollout.max_new_tokens=4096"]),
        nodes=4,
        gpus_per_node=8,
        gpu_mem_gib=80,
    )
    assert dataclasses.asdict(zero) == dataclasses.asdict(today)
    assert zero.rollout is None and zero.step.rollout == 0 and zero.rollout_share == 0
    assert all(m.kv_cache == 0 for m in zero.stages)
    # The figures of docs/performance.md and the recipe's header.
    assert zero.worst_gib == pytest.approx(60.18, abs=0.005)
    assert zero.step_seconds == pytest.approx(19.93, abs=0.005)
    text = format_table(zero) + format_ranking([zero], zero, 1)
    assert text == format_table(today) + format_ranking([today], today, 1)
    assert "rollout" not in text and "kv_cache" not in text


def test_rollout_time_grows_with_fraction(site_env):
    plans = [
        make_plan(
            load_run_config(RECIPE_70B, ROLLOUTS + [f"rollout.fraction={fraction}"]),
            nodes=4,
            gpus_per_node=8,
            gpu_mem_gib=80,
        )
        for fraction in (0, 0.25, 0.5, 1)
    ]
    rollout = [plan.step.rollout for plan in plans]
    assert rollout[0] == 0 and rollout == sorted(rollout) and len(set(rollout)) == 4
    # 32, 64 and 128 rows of 128: 4, 8 and 16 per DP rank (DP 8); the FLOPs scale with rows.
    assert [p.rollout.rows_per_dp_rank for p in plans[1:]] == [4, 8, 16]
    assert plans[3].rollout.flops == pytest.approx(4 * plans[1].rollout.flops)
    # Decoding is memory-bound: 4x the rows cost far less than 4x the time.
    assert plans[3].rollout.decode_seconds < 2 * plans[1].rollout.decode_seconds
    # The training part of the step is untouched.
    training = {plan.step.total - plan.step.rollout for plan in plans}
    assert max(training) == pytest.approx(min(training))
    kv = [plan.stages[0].kv_cache * GIB for plan in plans]
    assert kv == [0, *(2 * 32 * 2 * 128 * 2 * rows * 8192 for rows in (4, 8, 16))]


def test_the_70b_recipe_shows_the_rollout_share(site_env, tmp_path, capsys):
    def plan(fraction: float) -> dict:
        overrides = [*ROLLOUTS, f"rollout.fraction={fraction}"]
        out = tmp_path / f"{fraction}.json"
        assert (
            plan_main(["--config", RECIPE_70B, *overrides, "--nodes", "4", "--json", str(out)]) == 0
        )
        return json.loads(out.read_text())

    zero, data = plan(0), plan(0.25)
    out = capsys.readouterr().out
    assert data["layout"] == {"TP": 4, "PP": 1, "DP": 8} and not data["sequence_parallel"]
    assert 0 < data["rollout_share"] < 1 and zero["rollout_share"] == 0
    assert data["step_seconds_estimate"] > zero["step_seconds_estimate"]
    assert data["step_seconds_estimate"] == pytest.approx(
        zero["step_seconds_estimate"] + data["step"]["rollout"]
    )
    assert data["rollout"]["rows"] == 32 and data["rollout"]["prompt_tokens"] == 4096
    assert data["stages"][0]["kv_cache"] == pytest.approx(1.0)  # 4 rows: 1 GiB
    assert all(0 < plan["rollout_share"] < 1 for plan in data["ranking"])
    assert "rollouts: 32 rows per step (4 on the busiest DP rank)" in out
    assert re.search(r"^kv_cache +1\.00$", out, re.M)
    assert re.search(r"of the step$", out, re.M)


def test_sequence_parallelism_with_rollouts_is_a_listed_problem(site_env):
    run = load_run_config(RECIPE_70B, ["data.pack=false", "rollout.fraction=0.25"])
    plan = make_plan(run, nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.sequence_parallel and not plan.fits
    assert "set performance.sequence_parallel=false" in "\n".join(plan.problems)


def test_the_opd_recipe_is_the_math_recipe_on_policy(site_env):
    opd, hpd = load_run_config(RECIPES[3]), load_run_config(RECIPES[1])
    assert opd.loss.method == "opd" and opd.rollout.fraction == 1 and not opd.data.pack
    assert (opd.student, opd.teacher.model, opd.optimizer, opd.schedule) == (
        hpd.student,
        hpd.teacher.model,
        hpd.optimizer,
        hpd.schedule,
    )
    assert opd.rollout.max_new_tokens < opd.data.seq_length == hpd.data.seq_length
    plan = make_plan(opd, nodes=4, gpus_per_node=8, gpu_mem_gib=80)
    assert plan.fits and 0 < plan.rollout_share < 1
    # The recipe's header quotes these.
    assert plan.step_seconds == pytest.approx(14.5, abs=0.05)
    assert plan.step.rollout == pytest.approx(7.3, abs=0.05)
    assert plan.rollout_share == pytest.approx(0.51, abs=0.005)
