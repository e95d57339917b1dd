"""Will a recipe fit, and how long will a step take? Answered before any GPU is allocated.

    python -m hpd_megatron.plan --config recipes/llama3.1_70b_to_8b_hpd.yaml \
        --nodes 4 --gpus-per-node 8 --gpu-mem-gb 80 [--tflops 400] [--hbm-gb-s 3350] \
        [--intra-node-gb-s 450] [--inter-node-gb-s 200] [--top 5] [--json plan.json]

Prints the recipe's own layout in detail, then every TP x PP layout of the same GPUs that
fits, ranked by estimated step time. Planning reads no checkpoint or data path (an unset
${VARIABLE} in the recipe stays as written); --check-inputs also checks that they exist.
Every time is an estimate from this model, not a measurement.

Sequence parallelism (SP) is assumed where the trainer turns it on on GPUs: TP > 1 with
Transformer Engine, unless performance.sequence_parallel says otherwise.

The model, one module per part; each module's docstring gives its formulas:

  counts         parameters by part, FLOPs per token
  setting        what the numbers depend on: the run, its layout, both models, the padded
                 vocabulary, micro-batches, SP, each DP rank's rollout rows
  memory         memory per GPU and pipeline stage, the loss head's by loss.fused_head
  communication  links, ring collectives, TP, pipeline and DP seconds
  timing         the step's seconds: compute, communication, the 1F1B bubble
  rollouts       the student's generation before the training forward
  ranking        a layout's plan and problems; every fitting layout, fastest first
  report         the printed table and ranking, the JSON
  cli            arguments, loading the recipe, the exit code
"""

from hpd_megatron.plan.cli import main
from hpd_megatron.plan.communication import Interconnect
from hpd_megatron.plan.counts import (
    ParameterCount,
    count_parameters,
    stage_parameters_per_gpu,
    training_flops_per_token,
)
from hpd_megatron.plan.memory import GIB, StageMemory
from hpd_megatron.plan.ranking import Plan, make_plan, rank_layouts
from hpd_megatron.plan.report import format_ranking, format_table
from hpd_megatron.plan.rollouts import RolloutCost
from hpd_megatron.plan.timing import StepTime

__all__ = [
    "GIB",
    "Interconnect",
    "ParameterCount",
    "Plan",
    "RolloutCost",
    "StageMemory",
    "StepTime",
    "count_parameters",
    "format_ranking",
    "format_table",
    "main",
    "make_plan",
    "rank_layouts",
    "stage_parameters_per_gpu",
    "training_flops_per_token",
]
