"""Tokenize off-policy JSONL with the student's tokenizer into Megatron indexed datasets.

    python tools/prepare_data.py --input train.jsonl --tokenizer TOKENIZER \
        --output-prefix data/train --seq-length 256 [--overlong truncate|drop] \
        [--chat-template auto|builtin|FILE.jinja]

Writes PREFIX_tokens.bin/.idx, PREFIX_loss_mask.bin/.idx and PREFIX.json (see
hpd_megatron/data/prepare.py); a bad input is one error naming the file and line, and then
nothing is written.
"""

from __future__ import annotations

import argparse

from hpd_megatron.cli import run_cli
from hpd_megatron.data.prepare import OVERLONG, prepare


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", required=True, help="JSONL: {prompt, response} or {messages} per line"
    )
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model, tokenizer.json, or a directory"
    )
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--seq-length", type=int, required=True, help="training sequence length")
    parser.add_argument(
        "--overlong",
        choices=OVERLONG,
        default="truncate",
        help="records longer than seq-length + 1 tokens (default: truncate)",
    )
    parser.add_argument(
        "--chat-template",
        default="auto",
        help="auto (the tokenizer's, else builtin), builtin, or a Jinja file",
    )
    args = parser.parse_args(argv)
    prepare(
        args.input,
        args.tokenizer,
        args.output_prefix,
        args.seq_length,
        args.overlong,
        args.chat_template,
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
