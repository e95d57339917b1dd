"""Communication of one step: the links, ring collectives, and TP, pipeline and DP seconds.

Collectives are rings: a reduce-scatter or an all-gather of a tensor of M bytes over n GPUs
moves (n-1)/n*M bytes through each GPU's link, an all-reduce twice that. Links (GB/s, one
direction, nominal H100-class rates, so the communication terms are optimistic): inside a
node NVLink, 450 GB/s per GPU (--intra-node-gb-s); between nodes 200 GB/s per node (4 x 400
Gb/s InfiniBand, --inter-node-gb-s), shared by the node's GPUs, which all communicate at once.
Megatron orders ranks TP fastest, then DP, then PP: a TP group fits in a node when TP <= GPUs
per node, a DP group when TP*DP does, a pipeline when the whole world does; a group that does
not uses the inter-node figure. Left out: the loss kernel's collectives (a few floats per
token), the tied-embedding gradient all-reduce between the first and last stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from hpd_megatron.models.description import ModelDescription
from hpd_megatron.plan.counts import stage_parameters_per_gpu
from hpd_megatron.plan.setting import Setting


@dataclass
class Interconnect:
    """Link bandwidths in GB/s (1e9 bytes/s) in one direction (defaults: module doc)."""

    intra_node_gb_s: float = 450.0
    """Per GPU inside a node: H100 NVLink, 18 links x 25 GB/s."""
    inter_node_gb_s: float = 200.0
    """Per node between nodes: 4 x 400 Gb/s InfiniBand, shared by the node's GPUs."""

    def bytes_per_second(self, span: int, gpus_per_node: int) -> float:
        """What one GPU gets in a group whose members lie within ``span`` consecutive ranks."""
        if span <= gpus_per_node:
            return self.intra_node_gb_s * 1e9
        return self.inter_node_gb_s * 1e9 / gpus_per_node


def ring_seconds(tensor_bytes: float, ranks: int, bandwidth: float, phases: int = 1) -> float:
    """A ring reduce-scatter or all-gather (one phase) of a ``tensor_bytes`` tensor over
    ``ranks`` GPUs: each GPU sends (ranks-1)/ranks of it; an all-reduce is two phases. Zero
    for one GPU."""
    return phases * (ranks - 1) / ranks * tensor_bytes / bandwidth


def tensor_parallel_seconds(setting: Setting, bandwidth: float) -> float:
    """TP communication of one micro-batch on one stage.

    With A = b*s*h*e bytes (one layer's output, e bytes per element), a model's pass
    all-reduces 2*L + 1 such tensors: two per layer (in the forward after the attention's
    and the MLP's row-parallel linear; in the backward the input gradients of the
    column-parallel QKV and FC1), plus one for the vocab-parallel embedding and output
    layer. The student makes two passes (forward, backward), the teacher one (forward).
    One ring all-reduce of A over t GPUs takes 2*(t-1)/t*A / bandwidth. With SP each
    all-reduce becomes a reduce-scatter plus an all-gather of (t-1)/t*A each: the same
    time (Megatron's extra all-gather of the input in the backward, for the weight
    gradient, runs beside the input-gradient GEMM and is not counted). The stages split
    the layers evenly: each carries 1/PP of the total.
    """
    layout, run = setting.layout, setting.run
    tokens = run.schedule.micro_batch_size * run.data.seq_length

    def passes(model: ModelDescription | None, count: int) -> float:
        if model is None:
            return 0.0
        return count * (2 * model.num_layers + 1) * tokens * model.hidden_size

    elements = passes(setting.student, 2) + passes(setting.teacher, 1)
    per_stage = elements * setting.element_bytes / layout.pipeline_model_parallel_size
    return ring_seconds(per_stage, layout.tensor_model_parallel_size, bandwidth, phases=2)


def pipeline_p2p_seconds(setting: Setting, bandwidth: float) -> float:
    """Pipeline send/receive of one micro-batch on one stage: the activation forward and its
    gradient backward, each b*s/t*(h_student + h_teacher)*e bytes (the teacher's hidden state
    rides along; t = TP with SP, which sends the sequence shard, else 1). A stage sends and
    receives at once (full-duplex links): two messages' time."""
    layout, run = setting.layout, setting.run
    if layout.pipeline_model_parallel_size == 1:
        return 0.0
    width = setting.student.hidden_size + (setting.teacher.hidden_size if setting.teacher else 0)
    shard = layout.tensor_model_parallel_size if setting.sequence_parallel else 1
    message = run.schedule.micro_batch_size * run.data.seq_length // shard * width
    return 2 * message * setting.element_bytes / bandwidth


def data_parallel_seconds(setting: Setting, bandwidth: float) -> float:
    """Once per step, over the student's parameters n on the largest stage: with the
    distributed optimizer a reduce-scatter of the fp32 gradients (4n bytes) and an all-gather
    of the updated parameters (e*n bytes), else an all-reduce of the gradients."""
    layout = setting.layout
    dp = layout.data_parallel_size
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    n = max(stage_parameters_per_gpu(setting.student_count, tp, pp, s) for s in range(pp))
    if setting.run.optimizer.use_distributed_optimizer:
        gradients = ring_seconds(4 * n, dp, bandwidth)
        return gradients + ring_seconds(setting.element_bytes * n, dp, bandwidth)
    return ring_seconds(4 * n, dp, bandwidth, phases=2)
