"""Generate replies to a JSONL file's prompts with a checkpoint, on any TP x PP x DP grid.

The part ``hpd_megatron.evaluate`` (scores the replies) and ``tools/generate_data.py``
(keeps them as training data) share: resolve the checkpoint, read and encode the prompts,
start the process groups, build and load the model, generate, and collect every reply on
rank 0.

Work split: the (prompt, sample) pairs are ordered by prompt length (less padding per
batch), cut into batches of ``batch_size`` sequences, and batch b goes to data-parallel
replica ``b mod DP``. Batch b samples with a seed derived from (seed, b), so the replies do
not depend on TP, PP or DP size (greedy ones not on the batch size either).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hpd_megatron.checkpoint.verify import check_safe_loading, read_index
from hpd_megatron.checkpoint.weights import load_model_weights, weights_directory
from hpd_megatron.data.chat import resolve_chat_template
from hpd_megatron.data.tokenizer import (
    Tokenizer,
    TokenizerIdentity,
    load_tokenizer,
    tokenizer_mismatch,
)
from hpd_megatron.errors import ConfigError, DataError
from hpd_megatron.eval.generate import Generation, SamplingSettings, generate
from hpd_megatron.eval.prompts import (
    EvalRecord,
    describe_skipped,
    encode_prompts,
    read_eval_records,
)
from hpd_megatron.eval.source import CheckpointInfo, inspect_checkpoint
from hpd_megatron.models.builder import build_gpt_model, transformer_config
from hpd_megatron.models.dtypes import DTYPES
from hpd_megatron.parallel.initialize import (
    ParallelContext,
    destroy_parallel,
    initialize_parallel,
)
from hpd_megatron.parallel.layout import ParallelLayout
from hpd_megatron.training.components import sample_seed


@dataclass
class GenerationJob:
    ckpt: str
    data: str
    tokenizer: str | None = None
    model: str | None = None
    chat_template: str | None = None
    """None: the training data's format when the checkpoint's run is known, else auto."""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 0
    context_length: int | None = None
    """None: the model's max_position_embeddings."""
    params_dtype: str = "fp32"
    limit: int | None = None
    """Only the first ``limit`` records."""
    require_answer: bool = True
    records: list[EvalRecord] | None = None
    """The prompts, already read (and limited): the evaluation's benchmark files
    (``eval/benchmarks.py``); None: read from ``data``."""

    def check(self) -> None:
        """Settings errors, named by their option, before anything is loaded."""
        for name in (
            "tensor_parallel",
            "pipeline_parallel",
            "samples",
            "max_new_tokens",
            "batch_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}"
                )
        if self.temperature < 0:
            raise ConfigError(f"--temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and (self.samples > 1 or self.top_p < 1):
            raise ConfigError(
                "--temperature 0 is greedy: --samples > 1 would repeat one reply and "
                "--top-p does not apply; set --temperature > 0 to sample"
            )
        if self.params_dtype not in DTYPES:
            raise ConfigError(
                f"--params-dtype: expected one of {', '.join(DTYPES)}, got {self.params_dtype!r}"
            )
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit: must be >= 1, got {self.limit}")


@dataclass
class Reply:
    record: EvalRecord
    sample: int
    prompt_tokens: int
    generation: Generation
    text: str
    """The decoded reply, without the closing EOS."""


@dataclass
class GenerationRun:
    info: CheckpointInfo
    layout: ParallelLayout
    context_length: int
    records: int
    """Records read (after --limit)."""
    skipped: list[int]
    """Lines of the prompts skipped for length."""
    replies: list[Reply] = field(default_factory=list)
    """In file order, samples in order; filled on rank 0 only."""
    is_writer: bool = False
    """True on the rank that holds the replies (global rank 0)."""
    elapsed_s: float = 0.0


def add_generation_arguments(parser: argparse.ArgumentParser, benchmarks: bool = False) -> None:
    """The options of GenerationJob, shared by the evaluation and data-generation commands;
    ``benchmarks``: --data takes several files, JSONL or verl parquet (``eval/benchmarks.py``)."""
    parser.add_argument(
        "--ckpt",
        required=True,
        help="an export, a conversion, a training checkpoint root or an iter_XXXXXXX directory",
    )
    if benchmarks:
        parser.add_argument(
            "--data",
            required=True,
            nargs="+",
            help="benchmark files: verl parquet or JSONL prompts, one row of the table each",
        )
    else:
        parser.add_argument(
            "--data", required=True, help="JSONL prompts ({prompt} or {messages}, with an answer)"
        )
    parser.add_argument(
        "--tokenizer", help="default: found from the checkpoint (see eval/source.py)"
    )
    parser.add_argument("--model", help="model.yaml; default: the checkpoint's")
    parser.add_argument(
        "--chat-template", help="auto, builtin or a Jinja file; default: as the training data"
    )
    parser.add_argument(
        "--tp", dest="tensor_parallel", type=int, default=1, help="tensor-parallel size"
    )
    parser.add_argument(
        "--pp", dest="pipeline_parallel", type=int, default=1, help="pipeline-parallel size"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        help="replies per prompt (k of avg@k; default: %(default)s)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (default: %(default)s)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="default: %(default)s")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--context-length", type=int, help="default: the model's max_position_embeddings"
    )
    parser.add_argument("--params-dtype", default="fp32", help=f"one of {', '.join(DTYPES)}")
    parser.add_argument("--limit", type=int, help="only the first N records")


def job_from_arguments(args: argparse.Namespace, require_answer: bool) -> GenerationJob:
    """The job ``add_generation_arguments``' options describe."""
    names = GenerationJob.__dataclass_fields__
    return GenerationJob(
        **{k: v for k, v in vars(args).items() if k in names}, require_answer=require_answer
    )


def inspect_job(job: GenerationJob) -> CheckpointInfo:
    """The job's settings checked, and what its checkpoint needs (no process group)."""
    job.check()
    # A pickled index is checked before anything else of the checkpoint is read
    # (checkpoint/verify.py); a directory without one is reported when it is loaded.
    check_safe_loading()
    directory = weights_directory(job.ckpt)
    if (directory / ".metadata").is_file():
        read_index(directory)
    return inspect_checkpoint(job.ckpt, job.model, job.tokenizer, job.chat_template)


@dataclass
class EncodedPrompts:
    """The job's prompts, read and encoded (``encode_job_prompts``)."""

    tokenizer: Tokenizer
    context_length: int
    records: int
    """Records read (after --limit)."""
    kept: list[tuple[EvalRecord, list[int]]]
    """(record, prompt ids) of every prompt that leaves room for a reply."""
    skipped: list[EvalRecord]
    """The prompts skipped for length."""


def encode_job_prompts(job: GenerationJob, info: CheckpointInfo) -> EncodedPrompts:
    """The tokenizer, the context length and the encoded prompts; every input error fails
    here, alike on every rank, before any process group exists."""
    description = info.description
    tokenizer = load_tokenizer(info.tokenizer)
    mismatch = tokenizer_mismatch(
        TokenizerIdentity(
            f"tokenizer {info.tokenizer}", tokenizer.vocab_size, tokenizer.fingerprint()
        ),
        TokenizerIdentity(
            f"the model of {info.path}",
            description.vocab_size,
            description.extra.get("tokenizer_fingerprint"),
        ),
    )
    if mismatch is not None:
        raise DataError(f"{mismatch}: pass the tokenizer the model was converted with")
    template = resolve_chat_template(tokenizer, info.chat_template)
    context_length = job.context_length or description.max_position_embeddings
    if not 1 < context_length <= description.max_position_embeddings:
        raise ConfigError(
            f"--context-length: must be in 2..{description.max_position_embeddings} "
            f"(the model's max_position_embeddings), got {context_length}"
        )
    records = job.records
    if records is None:
        records = read_eval_records(job.data, job.require_answer)[: job.limit]
    kept, skipped = encode_prompts(records, tokenizer, template, context_length)
    if not kept:
        raise DataError(describe_skipped(skipped, context_length) + "; nothing left to generate")
    return EncodedPrompts(tokenizer, context_length, len(records), kept, skipped)


def run_generation(
    job: GenerationJob, info: CheckpointInfo | None = None, log: Callable[[str], object] = print
) -> GenerationRun:
    """Generate on this rank's share; rank 0 returns every reply. ``info``: the job's
    ``inspect_job``, when the caller has it already. ``log`` runs on rank 0."""
    info = info or inspect_job(job)
    prompts = encode_job_prompts(job, info)
    context = initialize_parallel(
        ParallelLayout(job.tensor_parallel, job.pipeline_parallel),
        seed=job.seed,
        models=[("model", info.description)],
    )
    run = GenerationRun(
        info,
        context.layout,
        prompts.context_length,
        prompts.records,
        [record.line for record in prompts.skipped],
        is_writer=context.rank == 0,
    )
    say = log if run.is_writer else (lambda _message: None)
    try:
        if prompts.skipped:
            say(describe_skipped(prompts.skipped, prompts.context_length))
        model = build_gpt_model(
            info.description,
            transformer_config(info.description, params_dtype=DTYPES[job.params_dtype]),
        )
        load_model_weights(model, info.path)
        model.eval()
        start = time.perf_counter()
        mine = generate_share(model, job, info, prompts, context, say)
        # One copy per replica travels: its first TP and PP rank's.
        shared = mine if context.tp_rank == 0 and context.pp_rank == 0 else {}
        gathered: list | None = [None] * context.world_size if run.is_writer else None
        dist.gather_object(shared, gathered, dst=0)
        run.elapsed_s = time.perf_counter() - start
        if run.is_writer:
            run.replies = collect_replies(gathered, prompts)
        return run
    finally:
        destroy_parallel()


def generate_share(
    model: torch.nn.Module,
    job: GenerationJob,
    info: CheckpointInfo,
    prompts: EncodedPrompts,
    context: ParallelContext,
    say: Callable[[str], object],
) -> dict[tuple[int, int], Generation]:
    """This replica's batches (module doc): (prompt index, sample) -> its generation."""
    kept = prompts.kept
    sequences = sorted(
        (
            (i, j)
            for i, (record, _) in enumerate(kept)
            for j in range(record.samples or job.samples)
        ),
        key=lambda pair: len(kept[pair[0]][1]),
    )
    batches = [sequences[b : b + job.batch_size] for b in range(0, len(sequences), job.batch_size)]
    say(
        f"{len(sequences)} sequences ({len(kept)} prompts, {job.samples} samples at most) in "
        f"{len(batches)} batches at {context.layout.describe()}"
    )
    settings = SamplingSettings(job.temperature, job.top_p, job.max_new_tokens)
    start = time.perf_counter()
    mine: dict[tuple[int, int], Generation] = {}
    for b in range(context.dp_rank, len(batches), context.layout.data_parallel_size):
        generations = generate(
            model,
            [kept[i][1] for i, _ in batches[b]],
            settings,
            vocab_size=info.description.vocab_size,
            eos_id=prompts.tokenizer.eos_id,
            context_length=prompts.context_length,
            seed=sample_seed(job.seed, 0, b),
        )
        mine.update(zip(batches[b], generations))
        say(f"batch {b + 1}/{len(batches)} done ({time.perf_counter() - start:.1f} s)")
    return mine


def collect_replies(
    gathered: list[dict[tuple[int, int], Generation]], prompts: EncodedPrompts
) -> list[Reply]:
    """Every replica's generations as replies in file order, samples in order."""
    every: dict[tuple[int, int], Generation] = {}
    for part in gathered:
        every.update(part)
    replies = []
    for (i, j), generation in sorted(every.items()):
        record, ids = prompts.kept[i]
        tokens = generation.tokens[:-1] if generation.finish == "eos" else generation.tokens
        replies.append(Reply(record, j, len(ids), generation, prompts.tokenizer.decode(tokens)))
    return replies


def describe_run(run: GenerationRun) -> dict[str, object]:
    """The facts about a generation run every output summary starts with."""
    tokens = sum(len(reply.generation.tokens) for reply in run.replies)
    return {
        "checkpoint": str(run.info.path),
        "checkpoint_step": run.info.step,
        "tokenizer": str(run.info.tokenizer),
        "chat_template": run.info.chat_template,
        "layout": run.layout.describe(),
        "context_length": run.context_length,
        "records": run.records,
        "skipped_overlong": len(run.skipped),
        "skipped_lines": run.skipped,
        "sequences": len(run.replies),
        "generated_tokens": tokens,
        "elapsed_s": round(run.elapsed_s, 3),
        "tokens_per_s": round(tokens / run.elapsed_s, 3) if run.elapsed_s else None,
    }
