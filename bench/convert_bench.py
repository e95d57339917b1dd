"""Memory and time of the HF -> Megatron converter at TP=2 x PP=2 against one process.

    python bench/convert_bench.py --json OUT [--hidden 1024 --layers 12 --vocab 32000]

Writes a llama-style model of a few hundred MB (random bf16 weights, one safetensors file
per layer plus an index, written tensor by tensor so the generator never holds it all),
then converts it twice: with one process (the baseline, which writes every position's
pieces itself) and with 4 processes under torchrun at TP=2 x PP=2. Each process reports
its wall time, the RSS it had after imports (before reading any weight), its peak RSS
(getrusage), the peak RSS of the checkpoint writer's forked helper processes, and the
bytes of its shard. The target, per process: peak RSS above the after-import baseline
<= 1.5 x its shard + one layer. The absolute peak is reported too (it includes the
~0.5 GB that torch, Megatron-Core and transformers cost before any weight is read).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 2**20


def llama_config(
    hidden: int, layers: int, vocab: int, ffn: int, heads: int, kv_heads: int
) -> dict[str, object]:
    """The config.json of the benchmark's bf16 llama-style model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }


def make_model(
    directory: Path, hidden: int, layers: int, vocab: int, ffn: int, heads: int, kv_heads: int
) -> int:
    """A random llama-style HF checkpoint; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file

    from hpd_megatron.convert.mapping import hf_shapes
    from hpd_megatron.models.description import ModelDescription

    directory.mkdir(parents=True)
    config = llama_config(hidden, layers, vocab, ffn, heads, kv_heads)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    description = ModelDescription(
        family="llama",
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        ffn_hidden_size=ffn,
        vocab_size=vocab,
    )
    groups: dict[str, dict] = {}
    for name, shape in hf_shapes(description, vocab).items():
        part = name.split(".")[2] if name.startswith("model.layers.") else "other"
        groups.setdefault(part, {})[name] = shape
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, (_, shapes) in enumerate(sorted(groups.items())):
        file = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {
            name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            for name, shape in shapes.items()
        }
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    return total


def worker(hf_dir: str, out: str, tp: int, pp: int, report_dir: str) -> None:
    """One conversion process: RSS after imports, the conversion, peak RSS."""
    import ctypes

    import psutil
    import torch  # noqa: F401  (imports first, so the baseline includes them)
    import transformers  # noqa: F401
    from megatron.core import dist_checkpointing  # noqa: F401

    from hpd_megatron.convert.hf_to_megatron import convert
    from hpd_megatron.convert.launch import conversion_processes

    # Hand the heap that imports freed back to the OS, so the baseline is what the
    # process really keeps (otherwise weights silently reuse it and look free).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with conversion_processes(tp, pp):
        import torch.distributed as dist

        measured = {}

        def measure_before_save() -> None:
            measured["rss_before_save"] = psutil.Process().memory_info().rss

        stats = convert(hf_dir, out, tp, pp, progress=False, before_save=measure_before_save)
        dist.barrier()
        rank = dist.get_rank()
    elapsed = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    helpers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    Path(report_dir, f"rank{rank}.json").write_text(
        json.dumps(
            {
                "rank": rank,
                "positions": stats["positions"],
                "wall_s": elapsed,
                "rss_after_imports_mib": baseline / MiB,
                "peak_rss_mib": own / MiB,
                "peak_rss_above_imports_mib": (own - baseline) / MiB,
                "writer_helper_peak_rss_mib": helpers / MiB,
                "rss_after_reading_shard_mib": measured["rss_before_save"] / MiB,
                "shard_mib": stats["shard_bytes"] / MiB,
                "bytes_read_mib": stats["bytes_read"] / MiB,
            }
        )
    )


def run(hf_dir: Path, out: Path, tp: int, pp: int, processes: int, layer_bytes: int) -> dict:
    reports = Path(tempfile.mkdtemp(prefix="convert_bench_"))
    command = [
        sys.executable,
        __file__,
        "--worker",
        str(hf_dir),
        str(out),
        str(tp),
        str(pp),
        str(reports),
    ]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            *command[1:],
        ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)))
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(reports.glob("rank*.json"))]
    shutil.rmtree(reports)
    for rank in ranks:
        budget = 1.5 * rank["shard_mib"] + layer_bytes / MiB
        rank["target_mib"] = budget
        rank["target_met"] = rank["peak_rss_above_imports_mib"] <= budget
    return {
        "processes": processes,
        "tp": tp,
        "pp": pp,
        "wall_s_including_launch": wall,
        "ranks": ranks,
        "target_met_on_every_rank": all(r["target_met"] for r in ranks),
    }


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument(
        "--workdir", default=None, help="scratch directory (default: a temporary one)"
    )
    return parser.parse_args()


def layer_bytes_of(args: argparse.Namespace) -> int:
    """Bytes of one decoder layer in bf16."""
    kv = args.hidden // args.heads * args.kv_heads
    return 2 * (
        2 * args.hidden * args.hidden
        + 2 * args.hidden * kv
        + 3 * args.hidden * args.ffn
        + 2 * args.hidden
    )


def summarise(
    args: argparse.Namespace, model_bytes: int, layer_bytes: int, baseline: dict, sharded: dict
) -> dict:
    """The results file: the model, both runs and the 4-process run against the baseline."""
    worst = max(r["peak_rss_above_imports_mib"] for r in sharded["ranks"])
    return {
        "what": "python bench/convert_bench.py --json OUT",
        "model": {
            "family": "llama",
            "hidden": args.hidden,
            "layers": args.layers,
            "vocab": args.vocab,
            "ffn": args.ffn,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "dtype": "bfloat16",
            "size_mib": model_bytes / MiB,
            "layer_mib": layer_bytes / MiB,
        },
        "machine": {"cpus": os.cpu_count()},
        "baseline_1_process": baseline,
        "tp2_pp2_4_processes": sharded,
        "ratios_4_processes_vs_1": {
            "worst_peak_rss_above_imports": worst
            / baseline["ranks"][0]["peak_rss_above_imports_mib"],
            "worst_shard": max(r["shard_mib"] for r in sharded["ranks"])
            / baseline["ranks"][0]["shard_mib"],
            "wall_including_launch": sharded["wall_s_including_launch"]
            / baseline["wall_s_including_launch"],
        },
        "target": "peak RSS above the after-import RSS <= 1.5 x shard + one layer, per process",
        "target_met": sharded["target_met_on_every_rank"],
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        hf_dir, out, tp, pp, report_dir = sys.argv[2:7]
        worker(hf_dir, out, int(tp), int(pp), report_dir)
        return
    args = parse_arguments()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    try:
        hf_dir = work / "hf"
        model_bytes = make_model(
            hf_dir, args.hidden, args.layers, args.vocab, args.ffn, args.heads, args.kv_heads
        )
        layer_bytes = layer_bytes_of(args)
        baseline = run(hf_dir, work / "single", 1, 1, 1, layer_bytes)
        sharded = run(hf_dir, work / "tp2pp2", 2, 2, 4, layer_bytes)
        results = summarise(args, model_bytes, layer_bytes, baseline, sharded)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
