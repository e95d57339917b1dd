"""Write the demo's synthetic arithmetic task (train/test JSONL, optionally a tokenizer).

    python tools/make_arithmetic_task.py --out data/arith --train 2000 --test 200 --seed 0 \
        [--max-digits 3] [--tokenizer-vocab-size 128]

See hpd_megatron/data/arithmetic.py for the format.
"""

from __future__ import annotations

import argparse

from hpd_megatron.cli import run_cli
from hpd_megatron.data.arithmetic import write_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train", type=int, required=True, help="training problems")
    parser.add_argument("--test", type=int, required=True, help="held-out problems (disjoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument(
        "--tokenizer-vocab-size",
        type=int,
        default=0,
        help="also train OUT/tokenizer.model (SentencePiece) of this size on the training split",
    )
    args = parser.parse_args(argv)
    paths = write_task(
        args.out, args.train, args.test, args.seed, args.max_digits, args.tokenizer_vocab_size
    )
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    run_cli(main)
