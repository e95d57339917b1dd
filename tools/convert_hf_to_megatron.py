"""Convert a Hugging Face checkpoint (safetensors) into a Megatron-Core distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out OUT [--tp T --pp P] [--dtype bf16|fp32] [--verify]
    torchrun --nproc-per-node T*P tools/convert_hf_to_megatron.py --hf-dir DIR --out OUT --tp T --pp P

OUT is the distributed checkpoint (loadable at any TP/PP), plus OUT/model.yaml for the
trainer (``student.model: OUT/model.yaml``, ``student.checkpoint: OUT``) and OUT/hf/ with
the original config and tokenizer. Under T*P processes each reads and writes only its own
shard. --verify compares logits with transformers' model at TP x PP and writes
OUT/verify.json; it exits 2 when a threshold is exceeded. Bad input: one line, exit 1,
nothing under OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="config.json + safetensors (+ tokenizer)")
    parser.add_argument("--out", required=True, help="new directory for the checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (processes: 1 or TP x PP)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--dtype", choices=("bf16", "fp32", "fp16"), default=None,
                        help="weights' dtype (default: config.json's torch_dtype)")
    parser.add_argument("--verify", action="store_true", help="compare logits with transformers")
    parser.add_argument("--verify-max-diff", type=float, default=1e-2, help="max |logit diff| allowed")
    parser.add_argument("--verify-min-top1", type=float, default=0.99, help="min top-1 agreement")
    parser.add_argument("--verify-max-kl", type=float, default=1e-3, help="max mean KL(hf || megatron)")
    parser.add_argument("--verify-length", type=int, default=32, help="tokens per verification prompt")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from hpd_megatron.convert import hf_to_megatron, verify
    from hpd_megatron.convert.launch import conversion_processes, world_layout

    try:
        # Every input check runs before a process group exists or a byte is written.
        source = hf_to_megatron.open_hf_checkpoint(args.hf_dir)
        hf_to_megatron.check_layout(source.description, args.tp, args.pp)
        hf_to_megatron.resolve_dtype(args.dtype, source.dtype)
        world_layout(args.tp, args.pp)
        if Path(args.out).exists():
            raise hf_to_megatron.ConversionError(f"{args.out}: already exists; remove it or choose another --out")
        with conversion_processes(args.tp, args.pp):
            import torch.distributed as dist

            hf_to_megatron.convert(args.hf_dir, args.out, args.tp, args.pp, args.dtype,
                                   progress=not args.no_progress)
            if dist.get_rank() == 0:
                print(f"wrote {args.out}", flush=True)
            if args.verify:
                thresholds = verify.Thresholds(args.verify_max_diff, args.verify_min_top1, args.verify_max_kl)
                description = hf_to_megatron.read_output_description(args.out)
                tokens = verify.prompt_tokens(Path(args.hf_dir), description.vocab_size,
                                              length=args.verify_length)
                report = verify.verify(args.hf_dir, args.out, description, tokens=tokens,
                                       thresholds=thresholds,
                                       report_path=Path(args.out) / "verify.json")
                if dist.get_rank() == 0:
                    print(verify.summary(report), flush=True)
                if not report["passed"]:
                    return 2
    except ValueError as error:  # ConversionError, ConfigError: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
