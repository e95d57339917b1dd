"""Time and peak memory of distillation_loss against a dense PyTorch version and Megatron's CE.

    python bench/loss_bench.py --json bench/results/loss_bench.json
    python bench/loss_bench.py --shapes 2048x32000 --methods hpd --reps 3

For each shape (tokens x vocabulary entries per rank, fp32 by default) and method it
runs, interleaved and repeated, forward + backward (the gradient with respect to the
student logits, freshly allocated each time as in a training step) of

* ``hpd_megatron``: ``hpd_megatron.losses.distillation_loss`` (chunked, O(tokens) state),
  for HPD once per sampler (inverse-CDF and Gumbel-max);
* ``dense``: the same formulas written the plain way: full fp32 log_softmax of both
  models over the whole [tokens, vocab] block, autograd through it (what the reference
  implementation does). HPD's sample is drawn by inverse CDF over the dense softmax
  (cumsum + searchsorted); torch.multinomial, which the reference code uses, costs
  about 2.5 s more per 2048 x 32,000 block on the 2-core machine and is not timed;
* ``megatron_ce``: Megatron-Core's ``vocab_parallel_cross_entropy`` on the same student
  logits (a fresh copy each time, since it overwrites its fp32 input in place): the
  floor, which an SFT step pays too.

It runs at TP=1, with Megatron's parallel_state initialised over gloo (world size 1).

Times come from this process (glibc's default allocator behaviour). Peak memory on the
CPU comes from a child process per shape, run right after the timings: the extra
resident memory during the call, i.e. the peak RSS (VmHWM, reset through
/proc/self/clear_refs just before the call) minus the RSS just before it, with the
inputs already resident. The child sets MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ so that glibc serves every allocation above 64 KiB with mmap
and trims eagerly: freed tensors leave the RSS and each measurement starts from the
same baseline (forcing this in the timing process would add page faults to every
variant). On a GPU both come from one process, with torch.cuda.max_memory_allocated.
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
from pathlib import Path

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpd_megatron.losses import SamplingOptions, distillation_loss  # noqa: E402

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}

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


# ---------------------------------------------------------------- the dense version


def dense_loss(student, teacher, labels, method, generator):
    """The formulas written densely: full fp32 log_softmax of both models, autograd through it."""
    logq = torch.log_softmax(student.float(), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(teacher.float(), dim=-1)
    mask = labels != -100
    y = labels.clamp_min(0).unsqueeze(-1)
    if method == "fkl":
        per_token = (logp.exp() * (logp - logq)).sum(-1)
    elif method == "rkl":
        per_token = (logq.exp() * (logq - logp)).sum(-1)
    elif method == "hpd":
        with torch.no_grad():
            cdf = logq.exp().cumsum_(-1)
            u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
            ys = torch.searchsorted(cdf, u, right=True).clamp_max_(cdf.shape[-1] - 1)
            del cdf
        lq_y, lq_s = logq.gather(-1, y).squeeze(-1), logq.gather(-1, ys).squeeze(-1)
        with torch.no_grad():
            lp_y, lp_s = logp.gather(-1, y).squeeze(-1), logp.gather(-1, ys).squeeze(-1)
            qy, py, qs, ps = lq_y.exp(), lp_y.exp(), lq_s.exp(), lp_s.exp()
            m1, m2 = py > qy, qs > ps
            a = qy * (lp_y - lq_y) + py * m1 + py * (m1 & m2)
            b = qs * (lp_s - lq_s) * m2 * (ys.squeeze(-1) != y.squeeze(-1))
        per_token = -(a * lq_y + b * lq_s)
    else:
        raise ValueError(method)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------- variants


def make_inputs(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    # Filled in place: no temporaries, so the resident baseline is just the inputs.
    student = torch.empty(tokens, vocab, dtype=dtype, device=device).normal_(0, 3, generator=g)
    teacher = torch.empty(tokens, vocab, dtype=dtype, device=device).normal_(0, 3, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device=device)
    return student.requires_grad_(), teacher, labels


def variants(methods, samplers, chunk_size):
    """name -> (method, prepare(inputs) -> step, step() -> gradient)."""
    out = {}

    def ours(method, sampler):
        def prepare(student, teacher, labels):
            sampling = SamplingOptions(sampler=sampler, seed=1)

            def step():
                loss, _ = distillation_loss(
                    student,
                    teacher,
                    labels,
                    method,
                    vocab_size=student.shape[-1],
                    chunk_size=chunk_size,
                    sampling=sampling,
                )
                return torch.autograd.grad(loss, student)[0]

            return step

        return prepare

    def dense(method):
        def prepare(student, teacher, labels):
            generator = torch.Generator(device=student.device).manual_seed(1)

            def step():
                loss = dense_loss(student, teacher, labels, method, generator)
                return torch.autograd.grad(loss, student)[0]

            return step

        return prepare

    def megatron_ce(student, teacher, labels):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        logits = student.detach().clone().requires_grad_()  # consumed in place by the CE

        def step():
            per_token = vocab_parallel_cross_entropy(logits, labels)
            return torch.autograd.grad(per_token.sum() / labels.numel(), logits)[0]

        return step

    for method in methods:
        for sampler in samplers if method == "hpd" else [None]:
            name = f"hpd_megatron:{method}" + (f":{sampler}" if sampler else "")
            out[name] = (method, ours(method, sampler or "inverse_cdf"))
        out[f"dense:{method}"] = (method, dense(method))
    out["megatron_ce"] = ("sft", megatron_ce)
    return out


def measure(prepare, inputs, device):
    """(seconds, extra peak bytes) of one forward + backward."""
    step = prepare(*inputs)  # outside the measurement: Megatron's input copy is an input
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        grad = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    del grad, step
    return seconds, memory.extra


def run_timings(inputs, device, table, reps):
    """Interleaved repetitions (the order rotates every round) after one warm-up each."""
    names = list(table)
    samples = {name: {"seconds": [], "extra_bytes": []} for name in names}
    for name in names:  # warm-up: code paths, allocator, page tables
        measure(table[name][1], inputs, device)
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            seconds, extra = measure(table[name][1], inputs, device)
            samples[name]["seconds"].append(seconds)
            samples[name]["extra_bytes"].append(extra)
    return samples


def run_memory_child(spec: str, args) -> dict[str, list[int]]:
    """Peak extra bytes per variant, measured in a fresh process with mmap-only malloc."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-child",
        "--shapes",
        spec,
        "--methods",
        args.methods,
        "--samplers",
        args.samplers,
        "--dtype",
        args.dtype,
    ]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(
        command, env={**os.environ, **_MALLOC_ENV}, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"memory child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_child(inputs, device, table) -> None:
    """Prints each variant's extra bytes; the library variants get a warm-up call first
    (the dense ones are plain tensor code with nothing to warm up)."""
    out = {}
    for name, (_, prepare) in table.items():
        calls = 1 if name.startswith("dense") else 2
        out[name] = [measure(prepare, inputs, device)[1] for _ in range(calls)]
    print(json.dumps(out))


def summarise(shape_result):
    rows = []
    variants_ = shape_result["variants"]
    floor = variants_["megatron_ce"]
    for name, r in variants_.items():
        if not name.startswith("hpd_megatron"):
            continue
        dense = variants_[f"dense:{r['method']}"]
        rows.append(
            {
                "variant": name,
                "seconds": r["median_seconds"],
                "dense_seconds": dense["median_seconds"],
                "megatron_ce_seconds": floor["median_seconds"],
                "time_vs_megatron_ce": r["median_seconds"] / floor["median_seconds"],
                "time_vs_dense": r["median_seconds"] / dense["median_seconds"],
                "extra_MiB": r["extra_bytes"] / 2**20,
                "dense_extra_MiB": dense["extra_bytes"] / 2**20,
                "megatron_ce_extra_MiB": floor["extra_bytes"] / 2**20,
                "gradient_MiB": shape_result["gradient_bytes"] / 2**20,
                "memory_target_MiB": (
                    shape_result["gradient_bytes"] + shape_result["chunk_fp32_bytes"]
                )
                / 2**20,
                "dense_over_ours_memory": dense["extra_bytes"] / max(r["extra_bytes"], 1),
            }
        )
    return rows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes", default="2048x32000,8192x32000", help="comma-separated TOKENSxVOCAB_PER_RANK"
    )
    parser.add_argument("--methods", default="hpd,fkl,rkl")
    parser.add_argument("--samplers", default="inverse_cdf,gumbel", help="HPD samplers to time")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions per variant (after a warm-up)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="tokens per chunk (default: the library's)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from hpd_megatron.losses.kernel import DEFAULT_CHUNK_ELEMENTS
    from hpd_megatron.parallel.initialize import destroy_parallel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    _init_parallel()
    table = variants(args.methods.split(","), args.samplers.split(","), args.chunk_size)
    shapes, summary = [], []
    for spec in args.shapes.split(","):
        tokens, vocab = (int(x) for x in spec.lower().split("x"))
        inputs = make_inputs(tokens, vocab, dtype, device)
        if args.memory_child:
            memory_child(inputs, device, table)
            destroy_parallel()
            return
        samples = run_timings(inputs, device, table, args.reps)
        del inputs
        memory = run_memory_child(spec, args) if device.type == "cpu" else None
        chunk_tokens = min(args.chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // vocab), tokens)
        result = {
            "shape": spec,
            "tokens": tokens,
            "vocab_per_rank": vocab,
            "dtype": args.dtype,
            "gradient_bytes": tokens * vocab * dtype.itemsize,
            "chunk_tokens": chunk_tokens,
            "chunk_fp32_bytes": chunk_tokens * vocab * 4,
            "variants": {},
        }
        for name, (method, _) in table.items():
            extra = memory[name] if memory is not None else samples[name]["extra_bytes"]
            result["variants"][name] = {
                "method": method,
                "median_seconds": statistics.median(samples[name]["seconds"]),
                "seconds": samples[name]["seconds"],
                "extra_bytes": int(extra[-1])
                if memory is not None
                else int(statistics.median(extra)),
                "extra_bytes_all": extra,
            }
        shapes.append(result)
        for row in summarise(result):
            summary.append({"shape": spec, **row})
            print(
                f"{spec:>12} {row['variant']:<32} {row['seconds']:7.3f} s  "
                f"(dense {row['dense_seconds']:6.3f}, "
                f"megatron_ce {row['megatron_ce_seconds']:6.3f}; "
                f"x{row['time_vs_megatron_ce']:.2f} CE, x{row['time_vs_dense']:.2f} dense)  "
                f"extra {row['extra_MiB']:7.0f} MiB (dense {row['dense_extra_MiB']:6.0f}, "
                f"CE {row['megatron_ce_extra_MiB']:5.0f}, "
                f"target <= {row['memory_target_MiB']:.0f})",
                flush=True,
            )
    destroy_parallel()

    report = {
        "what": (
            "Forward + backward (gradient w.r.t. the student logits) of one loss call at TP=1. "
            "seconds: wall time of each interleaved repetition after one warm-up; median_seconds "
            "their median. extra_bytes: peak memory of the call beyond the resident inputs "
            "(CPU: measured in a child process per shape with glibc forced to mmap/trim, as "
            "VmHWM (reset via /proc/self/clear_refs) minus VmRSS before the call, the last of the "
            "calls for the library and Megatron, the only call for dense; GPU: "
            "torch.cuda.max_memory_allocated minus memory_allocated). It includes "
            "the freshly allocated gradient (gradient_bytes), which Megatron's CE instead writes "
            "over its own input. memory_target = gradient + one fp32 chunk. The dense HPD samples "
            "by inverse CDF (torch.multinomial would add ~2.5 s per 2048x32000 on 2 cores)."
        ),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "megatron_core": __import__("megatron.core", fromlist=["__version__"]).__version__,
            "device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(),
        },
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "shapes": shapes,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
