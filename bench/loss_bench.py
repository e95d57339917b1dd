"""Time and peak memory of the distillation loss with the output layer, fused and unfused.

    python bench/loss_bench.py --json bench/results/loss_bench_fused.json
    python bench/loss_bench.py --shapes 1024x32000 --methods hpd --reps 3 --chunk-size 256

Every variant does the same job, the last pipeline stage's part of a step at TP=1: from
both models' final hidden states ([s, 1, h], batch 1, so tokens = s; labels [1, s]) and
output-layer weights ([V, h]) to the student's hidden-state and weight gradients:

* ``unfused:<method>``: student logits = hidden @ W_s^T with autograd, teacher logits
  = hidden_t @ W_t^T under no_grad, ``distillation_loss`` on them, backward;
* ``fused:<method>``: ``fused_distillation_loss`` on the two ``OutputHead``s, backward
  (``--chunk-size`` sets its tokens per chunk);
* ``floor``: the student's head, Megatron-Core's ``vocab_parallel_cross_entropy`` and the
  backward, plus the teacher head's forward: an SFT step's head and loss plus the
  teacher's logits, the least a KD step on materialised logits pays.

The teacher's logits live as in the recipe's step: from the teacher's head until the loss
has read them (the schedule drops the loss closure after the forward); only the
full-vocabulary methods' loss (fkl, rkl) keeps them for its backward. The floor holds them
the same way, through the CE forward.

W_s carries Megatron DDP's preallocated fp32 ``main_grad`` and ``grad_added_to_main_grad``
in every variant, and a post-accumulate hook does what DDP's backward hook does: add
``.grad`` into ``main_grad`` unless the layer already did, then drop ``.grad``. So the
unfused and floor variants pay their [V, h_s] weight gradient as autograd produces it (a
fresh tensor, added, then freed), and the fused one pays what its backward does (it
accumulates into ``main_grad`` itself and hands autograd a placeholder).

Times come from this process (glibc's default allocator behaviour). Peak memory on the
CPU comes from a child process per shape, run right after the timings: the extra
resident memory during the call, i.e. the peak RSS (VmHWM, reset through
/proc/self/clear_refs just before the call) minus the RSS just before it, with the
inputs (hidden states, weights, main_grad) already resident. The child sets
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ so that glibc serves every allocation
above 64 KiB with mmap and trims eagerly: freed tensors leave the RSS and each
measurement starts from the same baseline. The fused variants are measured on their
second call (the first may include one-time allocations; both are kept). On a GPU both
come from one process, with torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpd_megatron.losses import (  # noqa: E402
    FULL_VOCAB_METHODS,
    SamplingOptions,
    distillation_loss,
)
from hpd_megatron.losses.distillation import fused_distillation_loss  # noqa: E402
from hpd_megatron.losses.fused_head import OutputHead, fused_chunk_tokens  # noqa: E402

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

TARGETS = {
    "fused_over_unfused_memory": {"hpd": 0.10, "fkl": 0.10, "rkl": 0.10},
    "fused_over_unfused_time": {"hpd": 1.0},
    "fused_over_floor_time": {"hpd": 1.5, "fkl": 2.0, "rkl": 2.0},
}
"""Upper limits on the fused variant's ratios, per method (issue 28)."""

# ---------------------------------------------------------------- memory probes


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class PeakMemory:
    """Extra bytes at the peak of a block, over what was allocated when it started."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _status_bytes("VmRSS:")
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self.base
        else:
            self.extra = _status_bytes("VmHWM:") - self.base


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Both models' final hidden states [s, 1, h] and output weights [V, h]; labels [1, s]."""

    hidden: torch.Tensor
    weight: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_weight: torch.Tensor
    labels: torch.Tensor

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


def _ddp_hook(param: torch.Tensor) -> None:
    """Megatron DDP's backward post-hook (``_make_backward_post_hook``) without the
    reduction; one micro-batch per step, so the flag is reset here (DDP: zero_grad_buffer)."""
    if param.grad is not None and not param.grad_added_to_main_grad:
        param.main_grad.add_(param.grad)
    param.grad = None
    param.grad_added_to_main_grad = False


def make_inputs(tokens, vocab, student_hidden, teacher_hidden, dtype, device, seed=0) -> Inputs:
    g = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        # Filled in place: no temporaries, so the resident baseline is just the inputs.
        return torch.empty(*shape, dtype=dtype, device=device).normal_(0, std, generator=g)

    # Logits = hidden @ W^T have standard deviation 3 for both models.
    hidden = normal(tokens, 1, student_hidden, std=1.0).requires_grad_()
    weight = normal(vocab, student_hidden, std=3 / student_hidden**0.5).requires_grad_()
    weight.main_grad = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    weight.grad_added_to_main_grad = False
    weight.register_post_accumulate_grad_hook(_ddp_hook)
    t_hidden = normal(tokens, 1, teacher_hidden, std=1.0)
    t_weight = normal(vocab, teacher_hidden, std=3 / teacher_hidden**0.5)
    labels = torch.randint(0, vocab, (1, tokens), generator=g, device=device)
    return Inputs(hidden, weight, t_hidden, t_weight, labels)


# ---------------------------------------------------------------- variants


def _backward(loss: torch.Tensor, x: Inputs) -> None:
    loss.backward()
    x.hidden.grad = None  # the decoder's backward would consume it


def _heads(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Both models' logits [s, 1, V]: the student's with autograd, the teacher's without."""
    logits = F.linear(x.hidden, x.weight)
    with torch.no_grad():
        teacher = F.linear(x.teacher_hidden, x.teacher_weight)
    return logits, teacher


def unfused(method: str):
    def step(x: Inputs) -> None:
        logits, teacher = _heads(x)
        loss, _ = distillation_loss(
            logits.transpose(0, 1),
            teacher.transpose(0, 1),
            x.labels,
            method,
            vocab_size=x.vocab,
            sampling=SamplingOptions(seed=1),
        )
        del logits, teacher  # the loss keeps what its backward needs
        _backward(loss, x)

    return step


def fused(method: str, chunk_size: int | None):
    def step(x: Inputs) -> None:
        loss, _ = fused_distillation_loss(
            OutputHead(x.hidden, x.weight),
            OutputHead(x.teacher_hidden, x.teacher_weight),
            x.labels,
            method,
            vocab_size=x.vocab,
            chunk_size=chunk_size,
            sampling=SamplingOptions(seed=1),
        )
        _backward(loss, x)

    return step


def floor(x: Inputs) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    logits, teacher = _heads(x)
    per_token = vocab_parallel_cross_entropy(logits, x.labels.t().contiguous())
    del logits, teacher  # the CE keeps its softmax (written over the logits) for the backward
    _backward(per_token.sum() / per_token.numel(), x)


def variants(methods: list[str], chunk_size: int | None) -> dict:
    """name -> (method, step(inputs))."""
    out = {}
    for method in methods:
        out[f"unfused:{method}"] = (method, unfused(method))
        out[f"fused:{method}"] = (method, fused(method, chunk_size))
    out["floor"] = ("sft", floor)
    return out


def gemm_flops(table: dict, tokens: int, vocab: int, student_hidden: int, teacher_hidden: int):
    """FLOPs of the output-layer GEMMs per variant: the student's forward, its two backward
    GEMMs (hidden and weight gradients) and the teacher's forward; the fused backward also
    recomputes the student's logits, and for the full-vocabulary methods the teacher's."""
    unit = 2 * tokens * vocab
    out = {}
    for name, (method, _) in table.items():
        h = 3 * student_hidden + teacher_hidden
        if name.startswith("fused"):
            h += student_hidden + (teacher_hidden if method in FULL_VOCAB_METHODS else 0)
        out[name] = unit * h
    return out


# ---------------------------------------------------------------- measurement


def measure(step, inputs: Inputs, device: torch.device) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, extra peak bytes) of one forward + backward."""
    with PeakMemory(device) as memory:
        start, cpu = time.perf_counter(), time.process_time()
        step(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, cpu, memory.extra


def run_timings(inputs: Inputs, device, table: dict, reps: int) -> dict:
    """Interleaved repetitions (the order rotates every round) after one warm-up each."""
    names = list(table)
    keys = ("seconds", "cpu_seconds", "extra_bytes", "load_average")
    samples = {name: {key: [] for key in keys} for name in names}
    for name in names:  # warm-up: code paths, allocator, page tables
        measure(table[name][1], inputs, device)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            sample = (*measure(table[name][1], inputs, device), os.getloadavg()[0])
            for key, value in zip(keys, sample):
                samples[name][key].append(value)
            print(f"  rep {rep} {name:<12} {sample[0]:7.2f} s", file=sys.stderr, flush=True)
    return samples


def run_memory_child(spec: str, args) -> dict[str, list[int]]:
    """Peak extra bytes per variant, measured in a fresh process with mmap-only malloc."""
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", "--shapes", spec]
    for flag in ("methods", "student_hidden", "teacher_hidden", "dtype", "chunk_size"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    env = {**os.environ, **_MALLOC_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(inputs: Inputs, device, table: dict) -> None:
    """Prints each variant's extra bytes; fused variants twice (the first call may include
    one-time allocations)."""
    out = {}
    for name, (_, step) in table.items():
        calls = 2 if name.startswith("fused") else 1
        out[name] = [measure(step, inputs, device)[2] for _ in range(calls)]
    print(json.dumps(out))


# ---------------------------------------------------------------- results


def variant_results(table: dict, samples: dict, memory: dict | None) -> dict:
    out = {}
    for name, (method, _) in table.items():
        extra = memory[name] if memory is not None else samples[name]["extra_bytes"]
        out[name] = {
            "method": method,
            "median_seconds": statistics.median(samples[name]["seconds"]),
            "seconds": samples[name]["seconds"],
            "median_cpu_seconds": statistics.median(samples[name]["cpu_seconds"]),
            "cpu_seconds": samples[name]["cpu_seconds"],
            "load_average": samples[name]["load_average"],
            "extra_bytes": int(extra[-1] if memory is not None else statistics.median(extra)),
            "extra_bytes_all": extra,
        }
    return out


def _verdict(kind: str, method: str, ratio: float) -> dict:
    limit = TARGETS[kind].get(method)
    return {"ratio": ratio, "limit": limit, "met": None if limit is None else ratio <= limit}


def summarise(shape_result: dict, methods: list[str]) -> list[dict]:
    v = shape_result["variants"]
    floor_ = v["floor"]
    rows = []
    for method in methods:
        f, u = v[f"fused:{method}"], v[f"unfused:{method}"]
        ratios = {
            "fused_over_unfused_memory": f["extra_bytes"] / u["extra_bytes"],
            "fused_over_unfused_time": f["median_seconds"] / u["median_seconds"],
            "fused_over_floor_time": f["median_seconds"] / floor_["median_seconds"],
        }
        rows.append(
            {
                "method": method,
                "fused_seconds": f["median_seconds"],
                "unfused_seconds": u["median_seconds"],
                "floor_seconds": floor_["median_seconds"],
                "fused_extra_MiB": f["extra_bytes"] / 2**20,
                "unfused_extra_MiB": u["extra_bytes"] / 2**20,
                "floor_extra_MiB": floor_["extra_bytes"] / 2**20,
                "targets": {k: _verdict(k, method, r) for k, r in ratios.items()},
            }
        )
    return rows


_LABELS = {
    "fused_over_unfused_memory": "extra memory fused/unfused",
    "fused_over_unfused_time": "time fused/unfused",
    "fused_over_floor_time": "time fused/floor",
}


def print_row(spec: str, row: dict) -> None:
    verdicts = "  ".join(
        f"{_LABELS[k]} {t['ratio']:.3f}"
        + ("" if t["limit"] is None else f" (<= {t['limit']}: {'met' if t['met'] else 'FAILED'})")
        for k, t in row["targets"].items()
    )
    print(
        f"{spec} {row['method']:<4} fused {row['fused_seconds']:6.2f} s / unfused "
        f"{row['unfused_seconds']:6.2f} s / floor {row['floor_seconds']:6.2f} s; extra "
        f"{row['fused_extra_MiB']:.0f} / {row['unfused_extra_MiB']:.0f} / "
        f"{row['floor_extra_MiB']:.0f} MiB; {verdicts}",
        flush=True,
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*command: str) -> str:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["git", *command], cwd=root, capture_output=True, text=True)
    return done.stdout.strip()


def code_version() -> dict:
    """The commit the run starts from, and whether the loss code differs from it."""
    changed = _git("status", "--porcelain", "--", "hpd_megatron/losses", "bench/loss_bench.py")
    return {"commit": _git("rev-parse", "--short", "HEAD") or "unknown", "changed": changed}


def machine(device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
        "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(),
    }


WHAT = (
    "One step's head + loss + backward at TP=1, batch 1: from both models' hidden states "
    "and output weights to the student's hidden and weight gradients (into a preallocated "
    "fp32 main_grad through a DDP-style post-accumulate hook). unfused: logits materialised, "
    "distillation_loss; fused: fused_distillation_loss; floor: the student's head + "
    "Megatron's vocab_parallel_cross_entropy + the teacher head's forward. seconds: wall "
    "time of each interleaved repetition after one warm-up; median_seconds their median; "
    "cpu_seconds: this process's CPU time (all threads) in each; load_average: the 1-minute "
    "load average after each (other jobs on the machine). "
    "extra_bytes: peak memory beyond the resident inputs (CPU: a child process with glibc "
    "forced to mmap/trim, VmHWM (reset via /proc/self/clear_refs) minus VmRSS before the "
    "call; fused: the second call, extra_bytes_all holds both; GPU: "
    "torch.cuda.max_memory_allocated minus memory_allocated). gemm_flops: the output-layer "
    "GEMMs' FLOPs per variant."
)

# ---------------------------------------------------------------- main


def _init_parallel() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from hpd_megatron.parallel.initialize import initialize_parallel
    from hpd_megatron.parallel.layout import ParallelLayout

    initialize_parallel(ParallelLayout(1, 1))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x152064", help="comma-separated TOKENSxVOCAB")
    parser.add_argument("--methods", default="hpd,fkl,rkl")
    parser.add_argument("--student-hidden", type=int, default=256, help="h of the student")
    parser.add_argument("--teacher-hidden", type=int, default=512, help="h of the teacher")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions per variant (after a warm-up)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="fused tokens per chunk (default: library's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def run_shape(spec: str, args, device, table: dict) -> dict | None:
    """One shape's timings and memory (None in the memory child, which prints instead)."""
    from hpd_megatron.losses.kernel import DEFAULT_CHUNK_ELEMENTS

    tokens, vocab = (int(x) for x in spec.lower().split("x"))
    hs, ht = args.student_hidden, args.teacher_hidden
    inputs = make_inputs(tokens, vocab, hs, ht, getattr(torch, args.dtype), device)
    if args.memory_child:
        memory_child(inputs, device, table)
        return None
    samples = run_timings(inputs, device, table, args.reps)
    del inputs
    memory = run_memory_child(spec, args) if device.type == "cpu" else None
    return {
        "shape": spec,
        "tokens": tokens,
        "vocab_per_rank": vocab,
        "student_hidden": hs,
        "teacher_hidden": ht,
        "dtype": args.dtype,
        "logits_fp32_bytes": tokens * vocab * 4,
        "fused_chunk_tokens": min(fused_chunk_tokens(args.chunk_size, vocab), tokens),
        "unfused_chunk_tokens": min(max(1, DEFAULT_CHUNK_ELEMENTS // vocab), tokens),
        "gemm_flops": gemm_flops(table, tokens, vocab, hs, ht),
        "variants": variant_results(table, samples, memory),
    }


def main() -> None:
    args = parse_args()
    from hpd_megatron.parallel.initialize import destroy_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    version = code_version()  # before the run: the code it imports
    methods = args.methods.split(",")
    _init_parallel()
    table = variants(methods, args.chunk_size)
    shapes, summary = [], []
    for spec in args.shapes.split(","):
        result = run_shape(spec, args, device, table)
        if result is None:
            break
        shapes.append(result)
        for row in summarise(result, methods):
            summary.append({"shape": spec, **row})
            print_row(spec, row)
    destroy_parallel()
    if args.json and not args.memory_child:
        report = {
            "what": WHAT,
            "targets": TARGETS,
            "machine": machine(device),
            "code": version,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": summary,
            "shapes": shapes,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
