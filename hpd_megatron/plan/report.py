"""What the planner prints and writes: the recipe's layout in detail, the ranking, the JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from hpd_megatron.plan.ranking import Plan
from hpd_megatron.plan.rollouts import RolloutCost

MEMORY_ROWS = (
    "teacher_weights",
    "student_weights",
    "student_grads",
    "optimizer",
    "activations",
    "logits_and_loss",
    "overhead",
)
LOSS_HEADS = {
    "fused": "fused (loss.fused_head: true): logits computed chunk by chunk from the hidden "
    "states, none materialised",
    "materialised": "materialised logits (loss.fused_head: false): [tokens, vocab/TP] fp32 "
    "logits of both models and the student's logit gradient",
}
"""The table's line on the last stage's loss head, by Plan.loss_head."""


def layout_name(plan: Plan) -> str:
    lay = plan.layout
    return f"TP{lay['TP']} PP{lay['PP']} DP{lay['DP']}" + (" SP" if plan.sequence_parallel else "")


def format_step(plan: Plan) -> list[str]:
    step = plan.step
    rollout = f" + rollout {step.rollout:.2f}" if plan.rollout else ""
    lines = [
        f"compute: {plan.flops_per_token / 1e9:.1f} GFLOP per token, "
        f"{plan.tokens_per_step:,} tokens per step: at least {step.compute:.1f} s per step "
        "from compute alone (lower bound)",
        f"estimated step: {step.total:.1f} s = compute {step.compute:.2f} + TP comm "
        f"{step.tensor_parallel:.2f} + PP p2p {step.pipeline_p2p:.2f} + bubble {step.bubble:.2f}"
        f" + DP comm {step.data_parallel:.2f}{rollout} (an estimate from the model, not a "
        "measurement)",
    ]
    return lines + (format_rollout(plan.rollout, plan.rollout_share) if plan.rollout else [])


def format_rollout(cost: RolloutCost, share: float) -> list[str]:
    return [
        f"rollouts: {cost.rows} rows per step ({cost.rows_per_dp_rank} on the busiest DP rank), "
        f"prompts estimated at data.seq_length - max_new_tokens = {cost.prompt_tokens} tokens, "
        f"replies at max_new_tokens = {cost.new_tokens}",
        f"rollout: {cost.flops / 1e12:,.1f} TFLOP per step (prefill "
        f"{cost.prefill_flops / 1e12:,.1f} + decode {cost.decode_flops / 1e12:,.1f}), "
        f"{cost.seconds:.2f} s (prefill {cost.prefill_seconds:.2f} + decode "
        f"{cost.decode_seconds:.2f}; decoding at the nominal HBM bandwidth, latency left out: a "
        f"lower bound): {share:.1%} of the step",
    ]


def format_memory(plan: Plan) -> list[str]:
    """GiB per GPU, a row per part and a column per pipeline stage."""
    rows = [*MEMORY_ROWS, "kv_cache"] if plan.rollout else list(MEMORY_ROWS)
    lines = [
        f"{'GiB per GPU':<18}" + "".join(f"{'stage ' + str(m.stage):>10}" for m in plan.stages)
    ]
    for row in rows:
        lines.append(f"{row:<18}" + "".join(f"{getattr(m, row):>10.2f}" for m in plan.stages))
    lines.append(f"{'total':<18}" + "".join(f"{m.total:>10.2f}" for m in plan.stages))
    if plan.rollout:
        lines.append("(kv_cache is freed before the training forward: the total counts the larger")
        lines.append(" of kv_cache and activations + logits_and_loss)")
    return lines


def format_table(plan: Plan) -> str:
    lay = plan.layout
    lines = [
        f"world {plan.world_size} GPUs: TP={lay['TP']} PP={lay['PP']} DP={lay['DP']}"
        f"{', sequence parallel' if plan.sequence_parallel else ''}, "
        f"{plan.micro_batches_per_step} micro-batches per step, "
        f"padded vocab {plan.padded_vocab:,}",
        f"parameters (real vocab): student {plan.student_parameters:,}, "
        f"teacher {plan.teacher_parameters:,}",
        f"loss head: {LOSS_HEADS[plan.loss_head]}",
        "",
        *format_memory(plan),
        "",
        f"worst stage {plan.worst_stage}: {plan.worst_gib:.2f} GiB of {plan.available_gib:.2f} GiB",
        *format_step(plan),
    ]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def format_ranking(plans: Sequence[Plan], chosen: Plan, top: int) -> str:
    """The fastest ``top`` fitting layouts; * marks the recipe's."""
    rollout = chosen.rollout is not None
    lines = [
        f"the {min(top, len(plans))} fastest of {len(plans)} layouts that fit; seconds per step "
        "estimated by the model, not measured (compute alone is a lower bound):",
        f"  {'layout':<20}{'step':>8}{'compute':>9}{'TP comm':>9}{'PP p2p':>8}{'bubble':>8}"
        f"{'DP comm':>9}"
        + (f"{'rollout':>9}{'share':>7}" if rollout else "")
        + f"{'worst GiB':>11}",
    ]
    for plan in plans[:top]:
        mark = "*" if plan.layout == chosen.layout else " "
        step = plan.step
        share = f"{step.rollout:>9.2f}{plan.rollout_share:>7.1%}" if rollout else ""
        lines.append(
            f"{mark} {layout_name(plan):<20}{step.total:>8.2f}{step.compute:>9.2f}"
            f"{step.tensor_parallel:>9.2f}{step.pipeline_p2p:>8.2f}{step.bubble:>8.2f}"
            f"{step.data_parallel:>9.2f}{share}{plan.worst_gib:>11.2f}"
        )
    return "\n".join(lines)


def plan_json(plan: Plan, ranking: Sequence[Plan]) -> dict:
    """The --json file: the plan's fields (``loss_head`` among them), its totals, the ranking."""
    return asdict(plan) | {
        "fits": plan.fits,
        "stage_totals_gib": [m.total for m in plan.stages],
        "step_seconds_estimate": plan.step.total,
        "step_seconds_lower_bound": plan.step.compute,
        "rollout_share": plan.rollout_share,
        "ranking": [candidate.summary() for candidate in ranking],
    }
