"""``python -m hpd_megatron.plan``: arguments, the recipe, the printout, the exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from hpd_megatron.config import unset_variables_kept
from hpd_megatron.plan.communication import Interconnect
from hpd_megatron.plan.ranking import Plan, make_plan, rank_layouts
from hpd_megatron.plan.report import format_ranking, format_table, plan_json
from hpd_megatron.plan.rollouts import HBM_GB_S
from hpd_megatron.training.config import RunConfig, load_run_config
from hpd_megatron.training.inputs import check_inputs

TOP_LAYOUTS = 5


def summary_line() -> str:
    """The package docstring's first line, for --help."""
    return (sys.modules[__package__].__doc__ or "").split("\n")[0]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hpd_megatron.plan", description=summary_line())
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, as for training")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-mem-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    parser.add_argument("--tflops", type=float, default=400.0, help="achieved bf16 TFLOP/s per GPU")
    parser.add_argument(
        "--hbm-gb-s",
        type=float,
        default=HBM_GB_S,
        help="GPU memory bandwidth, GB/s, for the rollouts' decoding (default: H100 SXM peak)",
    )
    defaults = Interconnect()
    parser.add_argument(
        "--intra-node-gb-s",
        type=float,
        default=defaults.intra_node_gb_s,
        help="GB/s per GPU and direction inside a node (default: H100 NVLink)",
    )
    parser.add_argument(
        "--inter-node-gb-s",
        type=float,
        default=defaults.inter_node_gb_s,
        help="GB/s per node and direction between nodes (default: 4 x 400 Gb/s InfiniBand)",
    )
    parser.add_argument("--top", type=int, default=TOP_LAYOUTS, help="layouts ranked")
    parser.add_argument("--json", help="also write the plan here")
    parser.add_argument(
        "--check-inputs",
        action="store_true",
        help="also check that the checkpoints and data the run reads exist (planning alone "
        "needs neither, nor their environment variables)",
    )
    return parser.parse_args(argv)


def load_for_planning(args: argparse.Namespace) -> RunConfig:
    """The recipe, strictly expanded and its inputs checked with --check-inputs; otherwise
    unset variables stay as written (the plan reads no path) and are named in a note."""
    if args.check_inputs:
        run = load_run_config(args.config, args.overrides)
        check_inputs(run)
        return run
    with unset_variables_kept() as unset:
        run = load_run_config(args.config, args.overrides)
    if unset:
        print(f"note: {', '.join(unset)} not set: planning reads no path (--check-inputs does)")
    return run


def write_json(path: str, plan: Plan, ranking: Sequence[Plan]) -> None:
    with open(path, "w") as handle:
        json.dump(plan_json(plan, ranking), handle, indent=2)


def report_refusal(plan: Plan) -> None:
    """One line on stderr per reason the plan does not fit."""
    for problem in plan.problems:
        print(f"error: {problem}", file=sys.stderr)
    if plan.worst_gib > plan.available_gib:
        print(
            f"error: does not fit: {plan.worst_gib:.2f} GiB needed on the worst stage "
            f"(stage {plan.worst_stage}), {plan.available_gib:.2f} GiB available",
            file=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = load_for_planning(args)
    links = Interconnect(args.intra_node_gb_s, args.inter_node_gb_s)
    plan_args = (args.nodes, args.gpus_per_node, args.gpu_mem_gb, args.tflops, links, args.hbm_gb_s)
    plan = make_plan(run, *plan_args)
    ranking = rank_layouts(run, *plan_args)
    print(format_table(plan))
    print()
    print(format_ranking(ranking, plan, args.top))
    if args.json:
        write_json(args.json, plan, ranking)
    if plan.fits:
        return 0
    report_refusal(plan)
    return 1
