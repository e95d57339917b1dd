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
reply fill ``context_length``; finished rows leave the batch and the cache. The batch's
state lives on the device and each step updates it with tensor ops; the host looks for
finished rows every ``CHECK_EVERY`` steps (every step where the draws depend on the batch),
so the loop does not wait for the device at every token.

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

from hpd_megatron.eval.sampling import counter_uniforms, next_tokens, seed_keys
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


RUNNING = 0
"""A row's finish code while it generates; a finished row's is 1 + its FINISH_REASONS index."""
EOS, LENGTH, CONTEXT = 1, 2, 3

CHECK_EVERY = 8
"""Decode steps between the host's looks at which rows finished, when a row's tokens do not
depend on the other rows (greedy, or per-row draws): each look waits for the device, and a
finished row only computes a few discarded tokens until the next one."""


@dataclass
class _Rows:
    """The batch being generated, on the device: prompts then replies, and which rows go on.

    Every step updates all active rows with tensor ops; the host learns which rows finished
    only when it looks (``running``), so the decode loop does not wait for the device at
    every token.
    """

    tokens: torch.Tensor
    """[rows, width] ids: each prompt, then its reply as it grows (zeros beyond)."""
    lengths: torch.Tensor
    """[rows] each row's prompt length."""
    entropies: torch.Tensor
    """[rows, width] float64: each reply token's entropy at its position."""
    replied: torch.Tensor
    """[rows] reply tokens so far."""
    finish: torch.Tensor
    """[rows] RUNNING, or the finish code (EOS, LENGTH, CONTEXT)."""
    active: list[int]
    """The rows still in the batch and the KV cache, in their order there."""
    active_index: torch.Tensor
    """``active`` on the device."""

    @classmethod
    def of(cls, prompts: Sequence[Sequence[int]], width: int) -> _Rows:
        tokens = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
        lengths = torch.tensor([len(prompt) for prompt in prompts], dtype=torch.long)
        tokens, lengths = to_device(tokens), to_device(lengths)
        return cls(
            tokens=tokens,
            lengths=lengths,
            entropies=torch.zeros(tokens.shape, dtype=torch.float64, device=tokens.device),
            replied=torch.zeros_like(lengths),
            finish=torch.zeros_like(lengths),
            active=list(range(len(prompts))),
            active_index=torch.arange(len(prompts), device=tokens.device),
        )

    def record(
        self,
        position: int,
        ids: torch.Tensor,
        entropies: torch.Tensor,
        settings: SamplingSettings,
        eos_id: int | None,
        context_length: int,
    ) -> None:
        """Each active row's token at ``position``, for all rows in one set of tensor ops:
        a row still within its prompt keeps its own, a running row appends its sample to
        the reply and may finish (EOS, then max_new_tokens, then the context), a finished
        row's sample is dropped. Follows Megatron-Core's
        ``TextGenerationController.update_generation_status`` (done flags and reply lengths
        as device tensors)."""
        rows = self.active_index
        writes = (position >= self.lengths[rows]) & (self.finish[rows] == RUNNING)
        self.tokens[rows, position] = torch.where(writes, ids, self.tokens[rows, position])
        self.entropies[rows, position] = torch.where(
            writes, entropies, self.entropies[rows, position]
        )
        replied = self.replied[rows] + writes
        self.replied[rows] = replied
        finish = self.finish[rows]
        if eos_id is not None:
            finish = torch.where(writes & (ids == eos_id), EOS, finish)
        finish = torch.where(
            writes & (finish == RUNNING) & (replied == settings.max_new_tokens), LENGTH, finish
        )
        if position + 1 == context_length:
            finish = torch.where(writes & (finish == RUNNING), CONTEXT, finish)
        self.finish[rows] = finish

    def running(self) -> list[int]:
        """Indices (into ``active``) of the rows still generating: one wait for the device."""
        return (self.finish[self.active_index] == RUNNING).nonzero().squeeze(1).tolist()

    def keep(self, kept: list[int]) -> None:
        self.active = [self.active[index] for index in kept]
        self.active_index = self.active_index[torch.tensor(kept, device=self.tokens.device)]

    def generations(self) -> list[Generation]:
        """The replies, read back from the device in one transfer per tensor."""
        tokens, entropies = self.tokens.tolist(), self.entropies.tolist()
        lengths, replied = self.lengths.tolist(), self.replied.tolist()
        return [
            Generation(
                tokens=tokens[row][lengths[row] : lengths[row] + replied[row]],
                entropies=entropies[row][lengths[row] : lengths[row] + replied[row]],
                finish=FINISH_REASONS[code - 1] if code != RUNNING else "",
            )
            for row, code in enumerate(self.finish.tolist())
        ]


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
    prompt) row r's uniform at position t is Philox4x32-10 keyed by row_seeds[r] at counter
    t (``sampling.counter_uniforms``), so a row's reply does not depend on the other rows,
    their order or when they finish.
    """
    _check_prompts(prompts, settings, context_length)
    width = min(context_length, max(map(len, prompts)) + settings.max_new_tokens)
    rows = _Rows.of(prompts, width)
    cache = StaticInferenceContext(max_batch_size=len(prompts), max_sequence_length=width)
    # The shortest prompt is encoded in one forward; from there every row moves one position
    # per step, and a row whose prompt is longer is fed its own next token instead of a sample.
    start = int(min(map(len, prompts)))
    draws = _row_draws(row_seeds, start, width, settings, rows.tokens.device)
    # Batch draws (one stream for the whole batch, from ``seed``): a finished row must leave
    # at once, or the rows after it would take other uniforms. Otherwise the host looks now
    # and then (every stage and TP rank alike: the decision follows the broadcast tokens).
    batch_draws = settings.temperature > 0 and row_seeds is None
    check_every = 1 if batch_draws else CHECK_EVERY
    chunk = rows.tokens[:, :start]
    for position in range(start, width):
        ids, entropies = _next_step(
            model,
            chunk,
            position - chunk.shape[1],
            cache,
            settings,
            vocab_size,
            sample_seed(seed, position, 0) if batch_draws else seed,
            None if draws is None else draws[rows.active_index, position - start],
        )
        rows.record(position, ids, entropies, settings, eos_id, context_length)
        # Every row finishes by the last position (its reply or the context runs out).
        if (position - start + 1) % check_every == 0 and position + 1 < width:
            kept = rows.running()
            if not kept:
                break
            if len(kept) < len(rows.active):
                _keep_rows(cache, kept)
                rows.keep(kept)
        chunk = rows.tokens[rows.active_index, position : position + 1]
    return rows.generations()


def _row_draws(
    row_seeds: Sequence[int] | None,
    start: int,
    width: int,
    settings: SamplingSettings,
    device: torch.device,
) -> torch.Tensor | None:
    """[rows, width - start] U[0, 1): row r's draw at each position from its seed, for the
    whole generation in one batched computation on the device; None without row seeds or
    where nothing is sampled (greedy, or a stage before the last)."""
    if row_seeds is None or settings.temperature == 0:
        return None
    if not parallel_state.is_pipeline_last_stage():
        return None
    keys = seed_keys(list(row_seeds), device)
    return counter_uniforms(keys, torch.arange(start, width, device=device))


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
    # On the device: the host reads them only when it looks for finished rows.
    return ids, entropies


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
