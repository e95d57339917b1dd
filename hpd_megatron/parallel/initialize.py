"""Start torch.distributed and Megatron's parallel_state from the launcher's environment.

The same entry point runs under torchrun (RANK, WORLD_SIZE, LOCAL_RANK), under srun
with one task per GPU (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) and in the tests'
process harness. MASTER_ADDR and MASTER_PORT name the rendezvous in every case.
NCCL is used when CUDA is present, gloo (with the CPU emulation layer) otherwise.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hpd_megatron.errors import ConfigError
from hpd_megatron.models.description import ModelDescription
from hpd_megatron.parallel import cpu_emulation
from hpd_megatron.parallel.device import Device, resolve_device
from hpd_megatron.parallel.layout import ParallelLayout, validate_layout


@dataclass(frozen=True)
class LaunchEnvironment:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits in the grid once everything is initialised."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    layout: ParallelLayout
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pipeline_model_parallel_size - 1

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == logging_rank(self.world_size)


def logging_rank(world_size: int | None = None) -> int:
    """The one rank that prints, tracks and writes metrics: the last one. It sits on the
    last pipeline stage, where the loss and its reports exist."""
    return (dist.get_world_size() if world_size is None else world_size) - 1


def _int_from(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if name in env:
            try:
                return int(env[name])
            except ValueError:
                raise ConfigError(
                    f"environment variable {name}={env[name]!r} is not an integer"
                ) from None
    return None


def read_launch_environment(env: Mapping[str, str] | None = None) -> LaunchEnvironment:
    """Rank, world size and rendezvous from torchrun's or Slurm's variables.

    torchrun's names win when both are set (torchrun under srun sets its own).
    A single process with none of them set is rank 0 of 1.
    """
    env = os.environ if env is None else env
    rank = _int_from(env, "RANK", "SLURM_PROCID")
    world_size = _int_from(env, "WORLD_SIZE", "SLURM_NTASKS")
    local_rank = _int_from(env, "LOCAL_RANK", "SLURM_LOCALID")
    if rank is None and world_size is None:
        rank, world_size = 0, 1
    if rank is None or world_size is None:
        raise ConfigError(
            "launch environment: set both RANK and WORLD_SIZE (torchrun) or SLURM_PROCID and "
            "SLURM_NTASKS (srun)"
        )
    if not 0 <= rank < world_size:
        raise ConfigError(f"launch environment: rank {rank} is outside world size {world_size}")
    master_addr = env.get("MASTER_ADDR")
    master_port = _int_from(env, "MASTER_PORT")
    if world_size > 1 and (master_addr is None or master_port is None):
        raise ConfigError(
            f"launch environment: world size {world_size} needs MASTER_ADDR and MASTER_PORT "
            "(the Slurm templates take them from the first host of the allocation)"
        )
    return LaunchEnvironment(
        rank=rank,
        world_size=world_size,
        local_rank=rank if local_rank is None else local_rank,
        master_addr=master_addr or "127.0.0.1",
        master_port=master_port or 29500,
    )


def use_one_cuda_connection(env: MutableMapping[str, str] | None = None) -> str:
    """Set CUDA_DEVICE_MAX_CONNECTIONS=1 unless the user set it; returns the value in force.

    Megatron's sequence-parallel and gradient-reduce overlap assume one hardware work queue
    per GPU, so that a collective issued first also runs first (Megatron-LM's
    arguments.py asserts 1 with TP or CP > 1 before Blackwell). The driver reads the
    variable when the CUDA context is created, so entry points call this before anything
    touches torch.cuda. A value the user exported is kept: Megatron-FSDP, MoE overlap and
    Blackwell GPUs want more than one queue, so it is a deliberate choice (and Megatron-Core
    warns in the first forward when it is not 1 under sequence parallelism).
    """
    env = os.environ if env is None else env
    return env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")


def gpu_index(local_rank: int, device_count: int) -> int:
    """The GPU this process drives. Sites that bind one GPU per task (srun --gpus-per-task,
    --gpu-bind) show each task only its own device while SLURM_LOCALID still counts the
    node's tasks, so the local rank is taken modulo the visible GPUs."""
    if device_count < 1:
        raise ConfigError(f"local rank {local_rank}: CUDA is available but shows no GPU")
    return local_rank % device_count


def _select_device(kind: str, local_rank: int) -> tuple[str, torch.device]:
    """NCCL on this process's GPU for CUDA; gloo on the CPU emulation otherwise."""
    if kind == "cuda":
        use_one_cuda_connection()  # before set_device creates the context
        index = gpu_index(local_rank, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return "nccl", torch.device("cuda", index)
    cpu_emulation.enable()
    return "gloo", torch.device("cpu")


def stage_seed(seed: int, pp_rank: int) -> int:
    """This pipeline stage's seed, as upstream's ``_set_random_seed`` (training/initialize.py)
    gives it: stages never replay each other's draws (initialisation, dropout)."""
    return seed + 100 * pp_rank


def initialize_parallel(
    layout: ParallelLayout,
    seed: int = 1234,
    models: Iterable[tuple[str, ModelDescription]] = (),
    timeout_minutes: float = 10.0,
    env: Mapping[str, str] | None = None,
    device: Device = "auto",
) -> ParallelContext:
    """Initialise torch.distributed, parallel_state and the model-parallel RNG.

    The layout is validated against the world size and ``models`` before any process
    group exists, so configuration errors surface identically on every rank.
    ``timeout_minutes`` bounds every collective, on the world group and on each group
    parallel_state creates (TP, PP, DP, ...), as upstream's ``_initialize_distributed``.
    """
    from megatron.core import parallel_state, tensor_parallel

    launch = read_launch_environment(env)
    layout = validate_layout(layout, launch.world_size, models)

    backend, selected = _select_device(resolve_device(device, env), launch.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        # Without it Megatron gives its groups its own default (30 min), not the run's.
        distributed_timeout_minutes=timeout_minutes,
    )
    # CPU initialisation (use_cpu_initialization) draws from the CPU generator, seeded the
    # same on every rank of a stage, so random weights do not depend on TP. Each stage gets
    # its own seed (upstream's _set_random_seed): a stage builds only its layers, so random
    # weights depend on PP either way; comparisons across PP load the same checkpoint.
    seed = stage_seed(seed, parallel_state.get_pipeline_model_parallel_rank())
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        rank=launch.rank,
        world_size=launch.world_size,
        local_rank=launch.local_rank,
        device=selected,
        backend=backend,
        layout=layout,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    """Tear down parallel_state and the default process group (tests reuse processes)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
