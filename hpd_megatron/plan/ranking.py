"""A layout's plan (memory, FLOPs, step time, problems), and every fitting layout ranked."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

from hpd_megatron.parallel.layout import LayoutError, ParallelLayout, validate_layout
from hpd_megatron.plan.communication import Interconnect
from hpd_megatron.plan.counts import count_parameters, training_flops_per_token
from hpd_megatron.plan.memory import StageMemory, stage_memory
from hpd_megatron.plan.rollouts import HBM_GB_S, RolloutCost, rollout_cost
from hpd_megatron.plan.setting import Setting, make_setting
from hpd_megatron.plan.timing import StepTime, step_time
from hpd_megatron.training.config import RunConfig
from hpd_megatron.training.performance import (
    sequence_parallel_problems,
    transformer_engine_problems,
)


@dataclass
class Plan:
    layout: dict
    sequence_parallel: bool
    world_size: int
    micro_batches_per_step: int
    padded_vocab: int
    loss_head: str
    """``fused`` (loss.fused_head: no logits materialised) or ``materialised``."""
    student_parameters: int
    teacher_parameters: int
    stages: list[StageMemory]
    worst_stage: int
    worst_gib: float
    available_gib: float
    flops_per_token: float
    tokens_per_step: int
    step: StepTime
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rollout: RolloutCost | None = None
    """None without rollouts (rollout.fraction 0)."""

    @property
    def fits(self) -> bool:
        return not self.problems and self.worst_gib <= self.available_gib

    @property
    def step_seconds(self) -> float:
        """The estimated step time, communication, bubble and rollouts included."""
        return self.step.total

    @property
    def rollout_share(self) -> float:
        """The rollouts' share of the estimated step time."""
        return self.step.rollout / self.step.total

    def summary(self) -> dict:
        """The ranking's fields of this plan, for the JSON file."""
        return {
            "layout": self.layout,
            "sequence_parallel": self.sequence_parallel,
            "step_seconds_estimate": self.step.total,
            "step_seconds_lower_bound": self.step.compute,
            "step": asdict(self.step),
            "rollout_share": self.rollout_share,
            "worst_gib": self.worst_gib,
        }


def layout_problems(
    run: RunConfig, world: int, gpus_per_node: int
) -> tuple[ParallelLayout, list[str], list[str]]:
    """Every violated divisibility rule (one string each) and warnings; the layout with DP set."""
    models = run.named_models()
    problems: list[str] = []
    layout = run.parallel
    try:
        layout = validate_layout(run.parallel, world, models)
    except LayoutError as error:
        problems += str(error).removeprefix("invalid parallel layout: ").split("; ")
        tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
        layout = ParallelLayout(
            tp,
            pp,
            layout.context_parallel_size,
            max(world // max(tp * pp * layout.context_parallel_size, 1), 1),
        )
    dp, mbs = layout.data_parallel_size, run.schedule.micro_batch_size
    if run.schedule.global_batch_size % (mbs * dp):
        problems.append(
            f"global_batch_size {run.schedule.global_batch_size} is not a multiple of "
            f"micro_batch_size x DP = {mbs} x {dp}"
        )
    warnings = []
    if layout.tensor_model_parallel_size > gpus_per_node:
        warnings.append(
            f"TP={layout.tensor_model_parallel_size} spans nodes ({gpus_per_node} GPUs "
            f"per node): tensor-parallel all-reduces would cross the network"
        )
    return layout, problems, warnings


def performance_problems(setting: Setting) -> list[str]:
    """What the trainer refuses at start-up about sequence parallelism and Transformer Engine."""
    run, tp, sp = (
        setting.run,
        setting.layout.tensor_model_parallel_size,
        setting.sequence_parallel,
    )
    problems = sequence_parallel_problems(run, tp, sp)
    if run.performance.transformer_impl == "transformer_engine":
        problems += transformer_engine_problems(run, tp, sp)
    return problems


def make_plan(
    run: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    tflops: float = 400.0,
    links: Interconnect | None = None,
    hbm_gb_s: float = HBM_GB_S,
) -> Plan:
    world = nodes * gpus_per_node
    layout, problems, warnings = layout_problems(run, world, gpus_per_node)
    setting = make_setting(run, layout)
    stages = [stage_memory(setting, stage) for stage in range(layout.pipeline_model_parallel_size)]
    worst = max(stages, key=lambda m: m.total)
    flops = training_flops_per_token(
        setting.student, setting.teacher, run.data.seq_length, layout.tensor_model_parallel_size
    )
    step = step_time(setting, flops, gpus_per_node, tflops, links or Interconnect())
    rollout = rollout_cost(setting, tflops, hbm_gb_s)
    if rollout is not None:
        step.rollout = rollout.seconds
    return Plan(
        layout={
            "TP": layout.tensor_model_parallel_size,
            "PP": layout.pipeline_model_parallel_size,
            "DP": layout.data_parallel_size,
        },
        sequence_parallel=setting.sequence_parallel,
        world_size=world,
        micro_batches_per_step=setting.micro_batches,
        padded_vocab=setting.vocab,
        loss_head="fused" if run.loss.fused_head else "materialised",
        student_parameters=count_parameters(setting.student).total,
        teacher_parameters=count_parameters(setting.teacher).total if setting.teacher else 0,
        stages=stages,
        worst_stage=worst.stage,
        worst_gib=worst.total,
        available_gib=gpu_mem_gib,
        flops_per_token=flops,
        tokens_per_step=run.schedule.global_batch_size * run.data.seq_length,
        step=step,
        problems=problems + performance_problems(setting),
        warnings=warnings,
        rollout=rollout,
    )


def rank_layouts(
    run: RunConfig,
    nodes: int,
    gpus_per_node: int,
    gpu_mem_gib: float,
    tflops: float = 400.0,
    links: Interconnect | None = None,
    hbm_gb_s: float = HBM_GB_S,
) -> list[Plan]:
    """Every TP x PP layout of these GPUs that passes the rules and fits, fastest first (ties:
    smaller TP, then smaller PP). The recipe's other settings are kept."""
    world = nodes * gpus_per_node
    plans = []
    for tp in (n for n in range(1, world + 1) if world % n == 0):
        for pp in (n for n in range(1, world // tp + 1) if world // tp % n == 0):
            candidate = dataclasses.replace(run, parallel=ParallelLayout(tp, pp))
            plan = make_plan(candidate, nodes, gpus_per_node, gpu_mem_gib, tflops, links, hbm_gb_s)
            if plan.fits:
                plans.append(plan)
    return sorted(plans, key=lambda p: (p.step_seconds, p.layout["TP"], p.layout["PP"]))
