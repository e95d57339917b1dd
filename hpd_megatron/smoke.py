"""A TP x PP forward/backward of a tiny Llama-like model, printed step by step.

    torchrun --standalone --nproc-per-node 4 -m hpd_megatron.smoke [--tp 2 --pp 2]

This is what `make demo` runs until the distillation trainer exists: it exercises the
whole stack (launcher environment, parallel_state, the model builder, Megatron-Core's
pipeline schedule and vocab-parallel cross-entropy, Adam) on whatever the machine
has: NCCL on GPUs, gloo plus the CPU emulation layer otherwise.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from hpd_megatron.cli import run_cli
from hpd_megatron.models.builder import build_gpt_model, padded_vocab_size, transformer_config
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel.initialize import (
    ParallelContext,
    destroy_parallel,
    initialize_parallel,
)
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.training.schedule import causal_lm_forward, run_schedule

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "recipes" / "models" / "tiny_llama.yaml"


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model description YAML")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    return parser.parse_args()


def learnable_batches(vocab_size: int, args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    """One fixed batch of a learnable pattern (each token is the previous plus one), so the
    loss must fall if forward, backward and the update are right."""
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(
        0, vocab_size, (args.micro_batches, args.micro_batch_size, 1), generator=generator
    )
    sequences = (starts + torch.arange(args.seq_length + 1)) % vocab_size
    positions = torch.arange(args.seq_length).expand(args.micro_batch_size, -1)
    return [
        {"tokens": seq[:, :-1], "labels": seq[:, 1:], "position_ids": positions}
        for seq in sequences
    ]


def cross_entropy_step(stage: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The schedule's forward step: logits, and a vocab-parallel cross-entropy loss."""
    logits = causal_lm_forward(stage, batch)

    def loss_func(output):
        # Megatron's cross-entropy takes any leading dims with the vocab shard last.
        losses = vocab_parallel_cross_entropy(output.float(), batch["labels"])
        loss = losses.mean()
        # clone: the schedule divides the returned loss by the micro-batch count in place.
        return loss, {"loss": loss.detach().clone()}

    return logits, loss_func


def train_steps(
    model: torch.nn.Module,
    micro_batches: list[dict[str, torch.Tensor]],
    args: argparse.Namespace,
    context: ParallelContext,
) -> list[float]:
    """``args.steps`` Adam steps on the batch, each printed; the losses (last stage, TP
    rank 0; empty elsewhere)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        reports = run_schedule(
            model, micro_batches, cross_entropy_step, args.seq_length, args.micro_batch_size
        )
        optimizer.step()
        elapsed = time.perf_counter() - start
        if reports and context.tp_rank == 0:
            loss = torch.stack([r["loss"] for r in reports]).mean().item()
            losses.append(loss)
            print(f"step {step}: loss {loss:.4f}  ({elapsed:.2f} s)", flush=True)
    return losses


def main() -> None:
    args = parse_arguments()
    torch.set_num_threads(1)
    description = ModelDescription.from_yaml(args.model)
    context = initialize_parallel(
        ParallelLayout(args.tp, args.pp), seed=1234, models=[(str(args.model), description)]
    )
    model = build_gpt_model(description, transformer_config(description))
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"[rank {context.rank}] {context.layout.describe()} tp_rank={context.tp_rank} "
        f"pp_rank={context.pp_rank} backend={context.backend} device={context.device} "
        f"parameters on this rank={parameters:,}",
        flush=True,
    )
    torch.distributed.barrier()
    losses = train_steps(model, learnable_batches(description.vocab_size, args), args, context)
    if losses:
        padded = padded_vocab_size(description.vocab_size, args.tp)
        print(
            f"done: {args.steps} steps of {args.micro_batches} micro-batches x "
            f"{args.micro_batch_size} x {args.seq_length} tokens through the "
            f"{'1F1B pipeline' if args.pp > 1 else 'no-pipeline'} schedule at "
            f"{context.layout.describe()}; vocab {description.vocab_size} padded to {padded}; "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}",
            flush=True,
        )
    destroy_parallel()


if __name__ == "__main__":
    run_cli(main)
