"""Generate teacher replies to JSONL prompts as training data for tools/prepare_data.py.

    torchrun --nproc-per-node N tools/generate_data.py --ckpt TEACHER --data prompts.jsonl \
        --out teacher.jsonl [--tp T --pp P] [--samples k --temperature T --top-p P] \
        [--max-new-tokens N] [--only-correct] [--keep-unfinished]

Prompts are read and encoded as by ``python -m hpd_megatron.evaluate`` (an answer is only
needed with --only-correct); see hpd_megatron/eval/teacher_data.py for what is kept. The
output is written to a temporary file and renamed at the end.
"""

from __future__ import annotations

import argparse
import json

from hpd_megatron.cli import run_cli
from hpd_megatron.data.files import check_outputs, staged_files
from hpd_megatron.eval.runner import (
    add_generation_arguments,
    inspect_job,
    job_from_arguments,
    run_generation,
)
from hpd_megatron.eval.teacher_data import training_records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_generation_arguments(parser)
    parser.add_argument("--out", required=True, help="output JSONL")
    parser.add_argument(
        "--only-correct",
        action="store_true",
        help="keep only replies whose extracted answer matches the reference",
    )
    parser.add_argument(
        "--keep-unfinished", action="store_true", help="also keep replies cut off before EOS"
    )
    args = parser.parse_args(argv)
    job = job_from_arguments(args, require_answer=args.only_correct)
    info = inspect_job(job)
    check_outputs("--out", [args.out], {"--data": job.data, "--tokenizer": info.tokenizer})
    run = run_generation(job, info)
    if run.is_writer:
        records, dropped = training_records(run.replies, args.only_correct, args.keep_unfinished)
        with staged_files([args.out]) as (out,):
            out.write_text("".join(json.dumps(record) + "\n" for record in records))
        print(
            f"wrote {len(records)} records to {args.out} (of {len(run.replies)} replies; dropped "
            f"{dropped['unfinished']} unfinished, {dropped['incorrect']} incorrect; "
            f"{len(run.skipped)} prompts skipped for length)"
        )
    return 0


if __name__ == "__main__":
    run_cli(main)
