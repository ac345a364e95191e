"""The hot operations behind one signature each; fast kernels replace the reference twins.

`linear`, `moe_experts`, `attention`, `rms_norm` and `rotary` are what the model calls. On CPU
tensors they run the C++ kernels of `gptoss.ops.cpu` (built on first use) when those are
available, and the plain-torch twins in `gptoss.ops.reference` otherwise. `GPTOSS_KERNELS=reference` forces the twins everywhere.
"""

from __future__ import annotations

import os

import torch

from gptoss.ops import reference
from gptoss.ops.reference import ExpertWeights, route, swiglu  # noqa: F401
from gptoss.ops import cpu  # noqa: E402  (imports reference, above)


def _cpu_kernels(t: torch.Tensor) -> bool:
    return t.is_cpu and os.environ.get("GPTOSS_KERNELS", "").strip().lower() != "reference" and cpu.available()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _cpu_kernels(x):
        return cpu.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _cpu_kernels(x):
        return cpu.rms_norm(x, weight, eps)
    return reference.rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if _cpu_kernels(x):
        return cpu.rotary(x, cos, sin)
    return reference.rotary(x, cos, sin)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    if _cpu_kernels(x):
        return cpu.linear_int8(x, weight, scale, bias)
    return reference.linear_int8(x, weight, scale, bias)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _cpu_kernels(weight):
        return cpu.quantize_rows_int8(weight)
    return reference.quantize_rows_int8(weight)


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights) -> torch.Tensor:
    if _cpu_kernels(x):
        return cpu.moe_experts(x, expert_indices, expert_weights, experts)
    return reference.moe_experts(x, expert_indices, expert_weights, experts)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None) -> torch.Tensor:
    if _cpu_kernels(q):
        return cpu.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows)
    return reference.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows)


def backend_name() -> str:
    """Which implementation runs on CPU tensors here, for benchmarks and logs."""
    if os.environ.get("GPTOSS_KERNELS", "").strip().lower() == "reference" or not cpu.available():
        return "reference (plain torch)"
    return f"cpu-{cpu.isa()}"
