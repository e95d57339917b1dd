"""A CPU stand-in for what Transformer Engine changes in checkpoints and schedules.

Transformer Engine (TE) cannot run here, yet it decides two things a CPU test can see:

- **checkpoint keys**: TE's modules save an ``_extra_state`` (FP8 scaling state) that
  ``dist_checkpointing.load`` then asks for: the linears (as Megatron's local ones do) and
  the norms (which torch's do not), and the TE spec fuses the input norms into the next
  linear (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``);
- **the FP8 weight cache**: a TE linear casts its weight to FP8 when ``is_first_microbatch``
  is True (or None) and reuses that cast while it is False; Megatron's wrappers clear the
  flag after each forward and ``MegatronModule.set_is_first_microbatch`` sets it again.

``install()`` makes every model the product builds take these modules: either layer spec is
Megatron's local spec with the TE spec's module tree (``standin_local_spec``), and the final
norm is the stand-in norm (upstream's ``transformer_block.LayerNormImpl`` is ``TENorm``
whenever TE is importable). The arithmetic stays the local spec's, so a stand-in model gives
the local model's outputs from the same weights. The stand-in's FP8 is forward-only, as the
project's FP8 teacher: the cast weight carries no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import transformer_block
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

E4M3_MAX = 448.0
_LOCAL_SPEC = gpt_layer_specs.get_gpt_layer_local_spec


class StandInNorm(torch.nn.RMSNorm):
    """``TENorm`` as a checkpoint sees it: RMSNorm with an extra state, empty without FP8."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.loaded_extra_state: Any = "never loaded"

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        self.loaded_extra_state = state


def fp8_cast(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight through E4M3 at ``scale`` and back (what the FP8 GEMM multiplies)."""
    scaled = (weight.detach().float() * scale).clamp(-E4M3_MAX, E4M3_MAX)
    return (scaled.to(torch.float8_e4m3fn).float() / scale).to(weight.dtype)


class FirstMicrobatchCast:
    """TE's ``is_first_microbatch`` contract on a Megatron linear (config.fp8 set).

    Delayed scaling takes the scale from the amax of earlier casts, 1 before any (TE's
    initial scale); current (tensorwise) scaling from the weight being cast.
    """

    def _init_cast(self) -> None:
        self.is_first_microbatch = True
        self.cached_weight: torch.Tensor | None = None
        self.cast_scales: list[float] = []
        self.amax_history: list[float] = []

    def _scale(self) -> float:
        if self.config.fp8_recipe == "delayed":
            return E4M3_MAX / max(self.amax_history) if self.amax_history else 1.0
        return E4M3_MAX / self.weight.detach().abs().max().item()

    def gemm_weight(self) -> torch.Tensor:
        """The weight this forward multiplies; the flag is cleared, as Megatron's TE
        wrappers clear it after every forward."""
        if self.config.fp8 is None:
            return self.weight
        if self.is_first_microbatch or self.cached_weight is None:
            scale = self._scale()
            self.cached_weight = fp8_cast(self.weight, scale)
            self.cast_scales.append(scale)
            self.amax_history.append(self.weight.detach().abs().max().item())
        self.is_first_microbatch = False
        return self.cached_weight


class StandInColumnParallelLinear(FirstMicrobatchCast, ColumnParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_cast()

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, **kwargs: Any):
        return super().forward(input_, self.gemm_weight() if weight is None else weight, **kwargs)


class StandInLayerNormColumnParallelLinear(StandInColumnParallelLinear):
    """``TELayerNormColumnParallelLinear``: the RMSNorm before the GEMM is its own weight."""

    def __init__(self, input_size: int, output_size: int, *, config: Any, **kwargs: Any) -> None:
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype)
        )
        self.eps = config.layernorm_epsilon

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, **kwargs: Any):
        normed = F.rms_norm(input_, (input_.shape[-1],), self.layer_norm_weight, self.eps)
        return super().forward(normed, weight, **kwargs)


class StandInRowParallelLinear(FirstMicrobatchCast, RowParallelLinear):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_cast()

    def forward(self, input_: torch.Tensor):
        weight = self.gemm_weight()
        if weight is self.weight:
            return super().forward(input_)
        # RowParallelLinear multiplies self.weight: the cast stands in for this call only.
        original = self._parameters["weight"]
        self._parameters["weight"] = weight
        try:
            return super().forward(input_)
        finally:
            self._parameters["weight"] = original


def standin_local_spec(**kwargs: Any) -> ModuleSpec:
    """Megatron's local spec with the TE spec's module tree (its parameter names and extra
    states): the norms before attention and MLP fused into ``linear_qkv`` / ``linear_fc1``."""
    spec = _LOCAL_SPEC(**kwargs)
    layer = spec.submodules
    layer.input_layernorm = IdentityOp
    layer.pre_mlp_layernorm = IdentityOp
    layer.sharded_state_dict_keys_map = {}  # TE's names are the module names
    attention = layer.self_attention.submodules
    attention.linear_qkv = StandInLayerNormColumnParallelLinear
    attention.linear_proj = StandInRowParallelLinear
    if kwargs.get("qk_layernorm"):
        attention.q_layernorm = attention.k_layernorm = StandInNorm
    mlp = layer.mlp.submodules
    mlp.linear_fc1 = StandInLayerNormColumnParallelLinear
    mlp.linear_fc2 = StandInRowParallelLinear
    return spec


def install() -> None:
    """Every model built from now on in this process takes the stand-in modules."""
    from hpd_megatron.models import builder

    builder.get_gpt_layer_local_spec = standin_local_spec
    builder.get_gpt_layer_with_transformer_engine_spec = lambda qk_layernorm: standin_local_spec(
        qk_layernorm=qk_layernorm, normalization="RMSNorm"
    )
    transformer_block.LayerNormImpl = StandInNorm


def standin_modules(model: torch.nn.Module, kind: type) -> list[torch.nn.Module]:
    return [module for module in model.modules() if isinstance(module, kind)]
