"""Does the Megatron model compute what the Hugging Face model computes?

Runs transformers' AutoModelForCausalLM (fp32, from the Hugging Face directory) and the
Megatron GPTModel (fp32, loaded from the distributed checkpoint at the current
parallel_state layout) on the same prompts and reports, over the real vocabulary: the
largest absolute logit difference, how often the top-1 token agrees, the mean KL
divergence KL(hf || megatron) per position, and both models' greedy continuations.

Collective: every process of the launch calls ``verify``; the Megatron logits are
gathered on the last pipeline stage's TP rank 0, which also runs the Hugging Face
model, and the report is broadcast to all.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel import placement
from hpd_megatron.parallel.cpu_emulation import original_torch_factories

PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 17 times 23? Answer: let us compute step by step.",
)


@dataclass
class Thresholds:
    max_abs_diff: float = 1e-2
    min_top1: float = 0.99
    max_kl: float = 1e-3

    def passed(self, numbers: dict[str, float]) -> bool:
        """Whether ``compare_logits``' numbers are within every threshold."""
        return bool(
            numbers["max_abs_logit_diff"] <= self.max_abs_diff
            and numbers["top1_agreement"] >= self.min_top1
            and numbers["mean_kl"] <= self.max_kl
        )


def prompt_tokens(
    hf_dir: Path | None, vocab_size: int, batch: int = 2, length: int = 32, seed: int = 0
) -> torch.Tensor:
    """(batch, length) token ids: the tokenizer's encoding of fixed texts, else seeded random
    ids."""
    from hpd_megatron.convert.hf_to_megatron import hf_tokenizer

    tokenizer = hf_tokenizer(hf_dir) if hf_dir is not None else None
    if tokenizer is not None:
        rows = []
        for index in range(batch):
            ids = [i for i in tokenizer.encode(PROMPTS[index % len(PROMPTS)]) if i < vocab_size]
            if ids:
                rows.append((ids * (length // len(ids) + 1))[:length])
        if len(rows) == batch:
            return torch.tensor(rows, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


def _reporting_rank() -> int:
    """Global rank of the last pipeline stage's TP rank 0 (where the full logits end up)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    mine = (
        dist.get_rank()
        if (
            parallel_state.is_pipeline_last_stage()
            and parallel_state.get_tensor_model_parallel_rank() == 0
        )
        else -1
    )
    flag = torch.tensor([mine], device=placement.current_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def megatron_logits(
    model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int
) -> torch.Tensor | None:
    """Real-vocabulary logits (batch, seq, vocab) on the reporting rank, on the device; None
    elsewhere. ``tokens`` may be on the host: the schedule moves each micro-batch."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from hpd_megatron.training.schedule import causal_lm_forward, run_schedule

    batch, length = tokens.shape
    positions = torch.arange(length).unsqueeze(0).expand(batch, -1)

    def forward_step(stage, micro_batch):
        output = causal_lm_forward(stage, micro_batch)

        def gather(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size]
            return full.sum() * 0, {"logits": full.detach().float().clone()}

        return output, gather

    with torch.no_grad():
        reports = run_schedule(
            model,
            [{"tokens": tokens, "position_ids": positions}],
            forward_step,
            seq_length=length,
            micro_batch_size=batch,
            forward_only=True,
        )
    if reports and parallel_state.get_tensor_model_parallel_rank() == 0:
        return reports[0]["logits"]
    return None


def megatron_greedy(
    model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int, steps: int, reporter: int
) -> torch.Tensor:
    """``steps`` greedy tokens after ``tokens`` (a full forward per token), on every rank.

    The sequences grow on the host; each token is broadcast on the device.
    """
    import torch.distributed as dist

    generated = tokens.clone()
    for _ in range(steps):
        logits = megatron_logits(model, generated, vocab_size)
        following = torch.zeros(
            tokens.shape[0], 1, dtype=torch.long, device=placement.current_device()
        )
        if logits is not None:
            following = logits[:, -1].argmax(-1, keepdim=True)
        dist.broadcast(following, src=reporter)
        generated = torch.cat([generated, following.cpu()], dim=1)
    return generated[:, tokens.shape[1] :]


def hf_model(hf_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with original_torch_factories():
        return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def hf_logits_and_greedy(
    hf_dir: Path, tokens: torch.Tensor, vocab_size: int, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    model = hf_model(hf_dir)
    with torch.no_grad(), original_torch_factories():
        logits = model(input_ids=tokens).logits[..., :vocab_size].float()
        generated = tokens.clone()
        for _ in range(steps):
            following = (
                model(input_ids=generated).logits[:, -1, :vocab_size].argmax(-1, keepdim=True)
            )
            generated = torch.cat([generated, following], dim=1)
    return logits, generated[:, tokens.shape[1] :]


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Max |diff|, top-1 agreement and mean KL(reference || other) per position."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(other.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {
        "max_abs_logit_diff": (reference - other).abs().max().item(),
        "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).double().mean().item(),
        "mean_kl": kl.mean().item(),
        "max_abs_logit": reference.abs().max().item(),
    }


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
    }


def megatron_side(
    megatron_dir: str | Path, description: ModelDescription, tokens: torch.Tensor, steps: int
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """Collective: the Megatron model at the current layout, loaded from ``megatron_dir``:
    its logits (on the reporting rank, else None), its ``steps`` greedy tokens, and the
    reporting rank; all on the host, where the transformers model they are compared with
    runs."""
    from hpd_megatron.checkpoint.weights import load_model_weights
    from hpd_megatron.models.builder import build_gpt_model, transformer_config

    model = build_gpt_model(description, transformer_config(description, torch.float32))
    load_model_weights(model, megatron_dir)
    model.eval()
    reporter = _reporting_rank()
    logits = megatron_logits(model, tokens, description.vocab_size)
    greedy = megatron_greedy(model, tokens, description.vocab_size, steps, reporter)
    return (None if logits is None else logits.cpu()), greedy, reporter


def verify(
    hf_dir: str | Path,
    megatron_dir: str | Path,
    description: ModelDescription,
    tokens: torch.Tensor | None = None,
    greedy_steps: int = 4,
    thresholds: Thresholds | None = None,
    report_path: str | Path | None = None,
    direction: str = "hf_to_megatron",
    keep_logits: bool = False,
) -> dict[str, Any]:
    """Compare both models; return the report on every rank (rank 0 writes ``report_path``).

    ``keep_logits`` adds both logit tensors to the returned report (never to the JSON).
    """
    import torch.distributed as dist

    hf_dir, thresholds = Path(hf_dir), thresholds or Thresholds()
    if tokens is None:
        tokens = prompt_tokens(hf_dir, description.vocab_size)
    logits, greedy, reporter = megatron_side(megatron_dir, description, tokens, greedy_steps)
    payload: list[Any] = [None]
    if dist.get_rank() == reporter:
        reference, reference_greedy = hf_logits_and_greedy(
            hf_dir, tokens, description.vocab_size, greedy_steps
        )
        numbers = compare_logits(reference, logits)
        report: dict[str, Any] = {
            "direction": direction,
            "hf_dir": str(hf_dir),
            "megatron_dir": str(megatron_dir),
            "layout": _layout(),
            "prompts": list(tokens.shape),
            "real_vocab_size": description.vocab_size,
            **numbers,
            "greedy_hf": reference_greedy.tolist(),
            "greedy_megatron": greedy.tolist(),
            "greedy_identical": bool(torch.equal(reference_greedy, greedy)),
            "thresholds": asdict(thresholds),
            "passed": thresholds.passed(numbers),
        }
        if keep_logits:
            report["logits"] = {"hf": reference, "megatron": logits}
        payload = [report]
    dist.broadcast_object_list(payload, src=reporter)
    report = payload[0]
    if report_path is not None and dist.get_rank() == 0:
        shown = {k: v for k, v in report.items() if k != "logits"}
        Path(report_path).write_text(json.dumps(shown, indent=2) + "\n")
    return report


def summary(report: dict[str, Any]) -> str:
    verdict = "passed" if report["passed"] else "FAILED"
    return (
        f"verify ({report['direction']}, TP={report['layout']['tp']} PP={report['layout']['pp']}, "
        f"{report['prompts'][0]}x{report['prompts'][1]} tokens): max |logit diff| "
        f"{report['max_abs_logit_diff']:.3g}, top-1 agreement {report['top1_agreement']:.4f}, "
        f"mean KL {report['mean_kl']:.3g}, greedy identical {report['greedy_identical']}: {verdict}"
    )


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    """The --verify flags both converters share."""
    parser.add_argument("--verify", action="store_true", help="compare logits with transformers")
    parser.add_argument(
        "--verify-max-diff", type=float, default=1e-2, help="max |logit diff| allowed"
    )
    parser.add_argument("--verify-min-top1", type=float, default=0.99, help="min top-1 agreement")
    parser.add_argument(
        "--verify-max-kl", type=float, default=1e-3, help="max mean KL(hf || megatron)"
    )
    parser.add_argument(
        "--verify-length", type=int, default=32, help="tokens per verification prompt"
    )


def verify_for_cli(
    args: argparse.Namespace,
    hf_dir: str | Path,
    megatron_dir: str | Path,
    description: ModelDescription,
    direction: str,
    report_dir: str | Path,
) -> int:
    """Run ``verify`` with the command line's thresholds; print the summary; 0 or exit code 2."""
    import torch.distributed as dist

    thresholds = Thresholds(args.verify_max_diff, args.verify_min_top1, args.verify_max_kl)
    tokens = prompt_tokens(Path(hf_dir), description.vocab_size, length=args.verify_length)
    report = verify(
        hf_dir,
        megatron_dir,
        description,
        tokens=tokens,
        thresholds=thresholds,
        direction=direction,
        report_path=Path(report_dir) / "verify.json",
    )
    if dist.get_rank() == 0:
        print(summary(report), flush=True)
    return 0 if report["passed"] else 2
