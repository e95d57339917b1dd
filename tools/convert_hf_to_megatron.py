"""Convert a Hugging Face checkpoint (safetensors) into a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out OUT [--tp T --pp P] \\
        [--dtype bf16|fp32|fp16] [--verify]
    torchrun --nproc-per-node T*P tools/convert_hf_to_megatron.py --hf-dir DIR --out OUT \\
        --tp T --pp P

OUT is the distributed checkpoint (loadable at any TP/PP), plus OUT/model.yaml for the
trainer (``student.model: OUT/model.yaml``, ``student.checkpoint: OUT``) and OUT/hf/ with
the original config and tokenizer. Under T*P processes each reads and writes only its own
shard. --verify compares logits with transformers' model at TP x PP and writes
OUT/verify.json; it exits 2 when a threshold is exceeded. Bad input: one line, exit 1,
nothing under OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hpd_megatron.cli import run_cli
from hpd_megatron.convert import hf_to_megatron, verify
from hpd_megatron.convert.launch import conversion_processes, world_layout
from hpd_megatron.errors import ConversionError
from hpd_megatron.models.dtypes import DTYPES


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="config.json + safetensors (+ tokenizer)")
    parser.add_argument("--out", required=True, help="new directory for the checkpoint")
    parser.add_argument(
        "--tp", type=int, default=1, help="tensor-parallel size (processes: 1 or TP x PP)"
    )
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="weights' dtype (default: config.json's torch_dtype)",
    )
    parser.add_argument("--no-progress", action="store_true")
    verify.add_verify_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    # Every input check runs before a process group exists or a byte is written.
    source = hf_to_megatron.open_hf_checkpoint(args.hf_dir)
    hf_to_megatron.check_layout(source.description, args.tp, args.pp)
    hf_to_megatron.resolve_dtype(args.dtype, source.dtype)
    world_layout(args.tp, args.pp)
    if Path(args.out).exists():
        raise ConversionError(f"{args.out}: already exists; remove it or choose another --out")
    with conversion_processes(args.tp, args.pp):
        import torch.distributed as dist

        hf_to_megatron.convert(
            args.hf_dir, args.out, args.tp, args.pp, args.dtype, progress=not args.no_progress
        )
        if dist.get_rank() == 0:
            print(f"wrote {args.out}", flush=True)
        if args.verify:
            return verify.verify_for_cli(
                args,
                args.hf_dir,
                args.out,
                hf_to_megatron.read_output_description(args.out),
                "hf_to_megatron",
                args.out,
            )
    return 0


if __name__ == "__main__":
    run_cli(main)
