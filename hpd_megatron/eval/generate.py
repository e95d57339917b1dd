"""Batched generation with a Megatron GPTModel stage under any TP x PP layout.

Generation keeps keys and values in Megatron-Core's ``StaticInferenceContext`` (the KV
cache of its static-batching inference path): the shortest prompt's tokens go through in
one forward of the whole batch, and then every step feeds one token per row. A row whose
prompt is longer is fed its own prompt tokens until they run out, so all rows share one
position per step, as the cache needs. Each forward goes through Megatron's pipeline
schedule (``run_schedule``, forward only); the last stage picks the next token of each row
from its vocab-parallel logits (``sampling.next_tokens``) and broadcasts the tokens (and
their entropies) to the other stages. For evaluation at scale, export to Hugging Face and
use an inference engine (docs/evaluation.md).

A row stops at EOS (kept as its last token), after ``max_new_tokens``, or when prompt plus
reply fill ``context_length``; finished rows leave the batch and the cache.

Every rank of a model-parallel group (one TP x PP replica) calls ``generate`` with the same
prompts and gets the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from hpd_megatron.eval.sampling import next_tokens
from hpd_megatron.parallel.placement import to_device
from hpd_megatron.training.components import sample_seed
from hpd_megatron.training.schedule import Batch, run_schedule

FINISH_REASONS = ("eos", "length", "context")


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 256


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    """Generated ids; the EOS that ended the reply is the last one."""
    entropies: list[float] = field(default_factory=list)
    """Entropy (nats) of the distribution each token was drawn from (temperature applied)."""
    finish: str = ""
    """eos, length (max_new_tokens reached) or context (prompt + reply fill the context)."""


@dataclass
class _Rows:
    """The batch being generated: prompts then replies, and which rows still generate."""

    tokens: torch.Tensor
    """[rows, width] ids: each prompt, then its reply as it grows (zeros beyond)."""
    lengths: list[int]
    """Each row's prompt length."""
    generations: list[Generation]
    active: list[int]
    """The rows still generating, in their order in the batch and the KV cache."""
    context_length: int

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], width: int, context_length: int) -> _Rows:
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        lengths = [len(prompt) for prompt in prompts]
        generations = [Generation() for _ in prompts]
        return cls(tokens, lengths, generations, list(range(len(prompts))), context_length)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    *,
    vocab_size: int,
    eos_id: int | None,
    context_length: int,
    seed: int = 0,
    row_seeds: Sequence[int] | None = None,
) -> list[Generation]:
    """Continue every prompt (token ids) until it finishes; collective over the TP x PP group.

    Sampled tokens depend on ``seed`` and on the batch (one uniform per row and position,
    drawn for the whole batch), not on the TP or PP size. With ``row_seeds`` (one per
    prompt) row r's uniform at position t comes from (row_seeds[r], t) alone, so a row's
    reply does not depend on the other rows, their order or when they finish.
    """
    _check_prompts(prompts, settings, context_length)
    width = min(context_length, max(map(len, prompts)) + settings.max_new_tokens)
    rows = _Rows.of(prompts, width, context_length)
    cache = StaticInferenceContext(max_batch_size=len(prompts), max_sequence_length=width)
    # The shortest prompt is encoded in one forward; from there every row moves one position
    # per step, and a row whose prompt is longer is fed its own next token instead of a sample.
    start = min(rows.lengths)
    chunk = rows.tokens[:, :start]
    for position in range(start, width):
        ids, entropies = _next_step(
            model,
            # The rows stay on the host; each step's chunk goes to the device, where the
            # sampled ids and their pipeline broadcast live.
            to_device(chunk),
            position - chunk.shape[1],
            cache,
            settings,
            vocab_size,
            sample_seed(seed, position, 0),
            # Only the last stage samples; the others need no draws.
            _row_uniforms(row_seeds, rows.active, position)
            if row_seeds is not None and parallel_state.is_pipeline_last_stage()
            else None,
        )
        kept = _take_step(rows, position, ids.tolist(), entropies.tolist(), settings, eos_id)
        if not kept:
            break
        if len(kept) < len(rows.active):
            _keep_rows(cache, kept)
            rows.active = [rows.active[index] for index in kept]
        chunk = rows.tokens[rows.active, position : position + 1]
    return rows.generations


def _row_uniforms(row_seeds: Sequence[int], active: list[int], position: int) -> torch.Tensor:
    """Each active row's U[0, 1) at ``position``, from its own seed (on the host, then moved
    to the device like the tokens)."""
    draws = [
        torch.rand(
            1,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(sample_seed(row_seeds[row], position, 0)),
        )
        for row in active
    ]
    return to_device(torch.cat(draws))


def _check_prompts(
    prompts: Sequence[Sequence[int]], settings: SamplingSettings, context_length: int
) -> None:
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) < context_length:
            raise ValueError(
                f"prompt {i}: {len(prompt)} tokens; need 1 to {context_length - 1} "
                f"(context_length {context_length})"
            )


def _take_step(
    rows: _Rows,
    position: int,
    ids: list[int],
    entropies: list[float],
    settings: SamplingSettings,
    eos_id: int | None,
) -> list[int]:
    """Each active row's token at ``position``: a row still within its prompt keeps its own,
    the others append theirs to the reply. Returns the indices (into ``rows.active``) of the
    rows that go on."""
    kept = []
    for index, (row, token, entropy) in enumerate(zip(rows.active, ids, entropies)):
        if position < rows.lengths[row]:
            kept.append(index)
            continue
        generation = rows.generations[row]
        generation.tokens.append(token)
        generation.entropies.append(entropy)
        rows.tokens[row, position] = token
        if token == eos_id:
            generation.finish = "eos"
        elif len(generation.tokens) == settings.max_new_tokens:
            generation.finish = "length"
        elif position + 1 == rows.context_length:
            generation.finish = "context"
        else:
            kept.append(index)
    return kept


def _keep_rows(cache: StaticInferenceContext, rows: list[int]) -> None:
    """Finished rows leave the KV cache too ([sequence, batch, ...] per layer), so later
    steps compute only the rows still generating (``swap_key_value_dict`` only permutes)."""
    index = torch.tensor(rows)
    for layer, (keys, values) in cache.key_value_memory_dict.items():
        index = index.to(keys.device)
        cache.key_value_memory_dict[layer] = (keys[:, index], values[:, index])


def _next_step(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    offset: int,
    cache: StaticInferenceContext,
    settings: SamplingSettings,
    vocab_size: int,
    seed: int,
    uniforms: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed ``tokens`` (positions ``offset``.. of every row) through the model with the KV
    cache; every rank gets the next token and its entropy per row."""
    rows, length = tokens.shape
    batch: Batch = {
        "tokens": tokens,
        "position_ids": torch.arange(offset, offset + length, device=tokens.device)
        .unsqueeze(0)
        .expand(rows, -1),
    }
    cache.sequence_len_offset = offset
    reports = run_schedule(
        model,
        [batch],
        _cached_forward_step(cache),
        seq_length=length,
        micro_batch_size=rows,
        forward_only=True,
    )
    if parallel_state.is_pipeline_last_stage():
        ids, entropies = next_tokens(
            reports[0]["logits"],
            vocab_size,
            settings.temperature,
            settings.top_p,
            seed,
            uniforms=uniforms,
        )
    else:
        ids = torch.empty(rows, dtype=torch.long, device=tokens.device)
        entropies = torch.empty(rows, dtype=torch.float64, device=tokens.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        # Every TP rank of the last stage holds the same tokens: each pipeline (one per TP
        # rank) takes them from its own last stage.
        source = parallel_state.get_pipeline_model_parallel_last_rank()
        group = parallel_state.get_pipeline_model_parallel_group()
        dist.broadcast(ids, src=source, group=group)
        dist.broadcast(entropies, src=source, group=group)
    return ids.cpu(), entropies.cpu()


def _cached_forward_step(cache: StaticInferenceContext):
    """The schedule's forward step through the KV cache; the last stage reports this TP
    rank's shard of the last position's logits."""

    def forward_step(stage: torch.nn.Module, micro_batch: Batch):
        def last_logits(logits: torch.Tensor):
            # With a cache the last stage computes only the last position's logits, and
            # Megatron gathers them over TP; the sampler is vocab-parallel, so each TP rank
            # takes its own shard back.
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            width = logits.shape[-1] // tp_size
            first = parallel_state.get_tensor_model_parallel_rank() * width
            return logits.new_zeros(()), {"logits": logits[:, -1, first : first + width]}

        return stage(
            input_ids=micro_batch["tokens"],
            position_ids=micro_batch["position_ids"],
            attention_mask=None,
            inference_context=cache,
            runtime_gather_output=True,
        ), last_logits

    return forward_step
