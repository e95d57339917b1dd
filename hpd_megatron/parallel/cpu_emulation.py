"""Run Megatron-Core on a machine without CUDA.

Megatron-Core 0.16 assumes a GPU in a handful of places that have nothing to do with
the maths: buffers created with ``device=torch.cuda.current_device()`` or
``device="cuda"``, ``tensor.cuda()`` moves, ``torch.cuda.synchronize()`` after p2p
calls, and the model-parallel RNG tracker, which saves and restores the CUDA
generator. On a CPU-only build of torch every one of those raises.

``enable()`` routes exactly those calls to the CPU and nothing else:

* ``torch.cuda.current_device()`` returns the CPU device, and the tensor factories
  Megatron uses map a CUDA ``device=`` argument to the CPU;
* ``Tensor.cuda()`` returns the tensor itself (what ``.to()`` does for a tensor
  already on the target device);
* ``Tensor.type()`` without arguments names CPU tensors as CUDA ones
  (``torch.cuda.FloatTensor``), because the optimizer checks parameter and gradient
  types by that name; with an argument it converts as usual;
* ``torch.cuda.synchronize()`` is a no-op (CPU kernels are synchronous);
* the "CUDA" RNG the tracker forks is the CPU default generator, since that is the
  generator CPU dropout and initialisation draw from. Megatron warns whenever the
  CPU state changes inside a fork; on CPU that is the intended behaviour, so that one
  warning is filtered.

No kernel is replaced, so numerics are those of plain PyTorch on the CPU. The layer
is enabled only when CUDA is absent; on a GPU machine ``enable()`` does nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

_FACTORIES = (
    "empty",
    "zeros",
    "ones",
    "full",
    "tensor",
    "as_tensor",
    "arange",
    "rand",
    "randn",
    "randint",
    "empty_like",
    "zeros_like",
    "ones_like",
)
_enabled = False


def is_enabled() -> bool:
    """True once ``enable()`` has patched this process."""
    return _enabled


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare integer is a CUDA ordinal to torch.
    return isinstance(device, int) and not isinstance(device, bool)


def _route_device_to_cpu(factory: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(factory)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    wrapper.__wrapped_factory__ = factory  # type: ignore[attr-defined]
    return wrapper


class _ForkWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


_original_tensor_type = torch.Tensor.type


def _type_as_if_on_cuda(
    self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any
) -> Any:
    if dtype is None and not kwargs:
        name = _original_tensor_type(self)
        if name.startswith("torch.") and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch.") :]
        return name
    return _original_tensor_type(self, dtype, non_blocking, **kwargs)


def _seed_cpu_generator(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def enable() -> bool:
    """Patch this process so Megatron-Core runs on the CPU; returns whether it did.

    Idempotent. Must be called before Megatron-Core builds models or schedules run;
    ``hpd_megatron.parallel.initialize_parallel`` calls it.
    """
    global _enabled
    if _enabled:
        return True
    if torch.cuda.is_available():
        return False

    for name in _FACTORIES:
        setattr(torch, name, _route_device_to_cpu(getattr(torch, name)))
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    torch.Tensor.type = _type_as_if_on_cuda  # type: ignore[method-assign]
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
    torch.cuda.get_rng_state = _cpu_rng_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = _set_cpu_rng_state  # type: ignore[assignment]
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a lazy no-op without
    # CUDA), so seed the CPU generator directly rather than through torch.manual_seed.
    torch.cuda.manual_seed = _seed_cpu_generator  # type: ignore[assignment]

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    logging.getLogger(mcore_random.__name__).addFilter(_ForkWarningFilter())

    _enabled = True
    return True


@contextmanager
def original_torch_factories() -> Iterator[None]:
    """Undo the CPU emulation's wrapping of torch's tensor factories for a while.

    With ``torch.tensor`` wrapped, transformers 5's from_pretrained leaves the RoPE
    ``inv_freq`` buffer uninitialised (garbage logits); the Hugging Face side never
    needs the CUDA-to-CPU routing, so it loads and runs with the originals.
    """
    swapped = {
        name: getattr(torch, name)
        for name in _FACTORIES
        if hasattr(getattr(torch, name), "__wrapped_factory__")
    }
    for name, wrapper in swapped.items():
        setattr(torch, name, wrapper.__wrapped_factory__)
    try:
        yield
    finally:
        for name, wrapper in swapped.items():
            setattr(torch, name, wrapper)
