"""Batched generation with a Megatron GPTModel stage under any TP x PP layout.

Each step runs the whole growing batch through Megatron's pipeline schedule
(``run_schedule``, forward only; no KV cache), the last stage picks the next token of each
unfinished row from its vocab-parallel logits (``sampling.next_tokens``) and broadcasts the
tokens (and their entropies) to the other stages. A full forward per token costs
O(length^2) but needs nothing Megatron-Core's training path does not already have, and is
exactly the computation training does: for evaluation at scale use an inference engine
(README_SECTION.md).

Rows are right-padded and need no attention mask: attention is causal, so the logits at a
row's last real position never see the padding after it, and positions are 0..len-1 as in
training. A row stops at EOS (kept as its last token), after ``max_new_tokens``, or when
prompt plus reply fill ``context_length``; finished rows leave the batch.

Every rank of a model-parallel group (one TP x PP replica) calls ``generate`` with the same
prompts and gets the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from hpd_megatron.eval.sampling import next_tokens
from hpd_megatron.training.components import sample_seed
from hpd_megatron.training.schedule import Batch, causal_lm_forward, run_schedule

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


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    *,
    vocab_size: int,
    eos_id: Optional[int],
    context_length: int,
    seed: int = 0,
) -> list[Generation]:
    """Continue every prompt (token ids) until it finishes; collective over the TP x PP group.

    Sampled tokens depend on ``seed`` and on the batch (one uniform per row and step, drawn
    for the whole batch), not on the TP or PP size.
    """
    if settings.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {settings.max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) < context_length:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens; need 1 to {context_length - 1} "
                             f"(context_length {context_length})")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    lengths = [len(prompt) for prompt in prompts]
    width = min(context_length, max(lengths) + settings.max_new_tokens)
    tokens = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    generations = [Generation() for _ in prompts]
    active = list(range(len(prompts)))
    for step in range(settings.max_new_tokens):
        if not active:
            break
        ids, entropies = _next_step(
            model, tokens[active, : max(lengths[row] for row in active)].to(device),
            torch.tensor([lengths[row] - 1 for row in active], device=device),
            settings, vocab_size, sample_seed(seed, step, 0),
        )
        still_active = []
        for row, token, entropy in zip(active, ids.tolist(), entropies.tolist()):
            generation = generations[row]
            generation.tokens.append(token)
            generation.entropies.append(entropy)
            if token == eos_id:
                generation.finish = "eos"
                continue
            tokens[row, lengths[row]] = token
            lengths[row] += 1
            if len(generation.tokens) == settings.max_new_tokens:
                generation.finish = "length"
            elif lengths[row] == context_length:
                generation.finish = "context"
            else:
                still_active.append(row)
        active = still_active
    return generations


def _next_step(
    model: torch.nn.Module, tokens: torch.Tensor, last: torch.Tensor, settings: SamplingSettings,
    vocab_size: int, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the batch; every rank gets the next token and its entropy per row."""
    rows, length = tokens.shape
    batch: Batch = {
        "tokens": tokens,
        "position_ids": torch.arange(length, device=tokens.device).unsqueeze(0).expand(rows, -1),
    }

    def forward_step(stage: torch.nn.Module, micro_batch: Batch):
        def last_logits(logits: torch.Tensor):
            # [rows, length, vocab/TP] -> the logits that predict each row's next token.
            picked = logits[torch.arange(rows, device=logits.device), last]
            return logits.new_zeros(()), {"logits": picked}

        return causal_lm_forward(stage, micro_batch), last_logits

    reports = run_schedule(model, [batch], forward_step, seq_length=length, micro_batch_size=rows,
                           forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        ids, entropies = next_tokens(reports[0]["logits"], vocab_size, settings.temperature,
                                     settings.top_p, seed)
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
