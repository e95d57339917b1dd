"""Convert a Megatron-Core distributed checkpoint (any TP/PP) into Hugging Face safetensors.

    python tools/convert_megatron_to_hf.py --ckpt DIR --out OUT [--model model.yaml] \\
        [--shard-size 5GB] [--verify]
    torchrun --nproc-per-node N tools/convert_megatron_to_hf.py --ckpt DIR --out OUT \\
        [--tp T --pp P]

DIR is a distributed checkpoint with model.yaml (unless --model is given) and optionally
hf/ (original config.json, generation config, tokenizer; config.json is synthesised
from the description otherwise). OUT gets safetensors shards with an index, config.json,
generation_config.json and the tokenizer, loadable by AutoModelForCausalLM. --verify
runs the Megatron model at TP x PP (1 or TP x PP processes) against the new directory
and writes OUT/verify.json; it exits 2 when a threshold is exceeded.
"""

from __future__ import annotations

import argparse

from hpd_megatron.cli import run_cli
from hpd_megatron.convert import megatron_to_hf, verify
from hpd_megatron.convert.hf_to_megatron import check_layout
from hpd_megatron.convert.launch import conversion_processes, world_layout
from hpd_megatron.models.dtypes import DTYPES


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ckpt", required=True, help="Megatron-Core distributed checkpoint directory"
    )
    parser.add_argument("--out", required=True, help="new Hugging Face model directory")
    parser.add_argument(
        "--model", default=None, help="model description YAML (default: CKPT/model.yaml)"
    )
    parser.add_argument(
        "--shard-size", default="5GB", help="largest safetensors file (default 5GB)"
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="output dtype (default: hf/config.json's dtype, else the checkpoint's)",
    )
    parser.add_argument("--tp", type=int, default=1, help="layout the --verify model runs at")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--no-progress", action="store_true")
    verify.add_verify_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    checked = megatron_to_hf.plan(args.ckpt, args.out, args.model, args.shard_size, args.dtype)
    if args.verify:
        check_layout(checked.description, args.tp, args.pp)
    world_layout(args.tp, args.pp)
    with conversion_processes(args.tp, args.pp):
        import torch.distributed as dist

        megatron_to_hf.convert(
            args.ckpt,
            args.out,
            args.model,
            args.shard_size,
            args.dtype,
            progress=not args.no_progress,
        )
        if dist.get_rank() == 0:
            print(f"wrote {args.out}", flush=True)
        if args.verify:
            return verify.verify_for_cli(
                args, args.out, args.ckpt, checked.description, "megatron_to_hf", args.out
            )
    return 0


if __name__ == "__main__":
    run_cli(main)
