"""The hot operations behind one signature each; fast kernels replace the reference twins.

`linear`, `moe_experts`, `attention`, `rms_norm` and `rotary` are what the model calls. Each call
goes to the `Backend` chosen for its tensor's device type, once: the first time a device type is
seen (or when `Model.from_pretrained` loads onto it), `select` decides between the C++ kernels of
`gptoss.ops.cpu` (CPU), the Triton kernels of `gptoss.ops.triton` (CUDA, sm75+), and the
plain-torch twins in `gptoss.ops.reference`, and that is where a failed kernel build or a GPU the
kernels cannot use is reported (one warning, or an error under GPTOSS_REQUIRE_KERNELS=1).
`GPTOSS_KERNELS=reference` at start-up forces the twins; `use("reference")` does it at run time
(tests, training).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from gptoss.ops import reference
from gptoss.ops.reference import ExpertWeights, route, swiglu  # noqa: F401
from gptoss.ops import cpu  # noqa: E402  (imports reference, above)

log = logging.getLogger("gptoss")


@dataclass(frozen=True)
class Backend:
    """One implementation of every hot op. A kernel may still hand an input it does not handle
    (autograd, an odd dtype) to its reference twin; that is the kernel's business, per input."""

    name: str
    linear: Callable
    rms_norm: Callable
    rotary: Callable
    linear_int8: Callable
    quantize_rows_int8: Callable
    moe_experts: Callable
    attention: Callable
    decode_attention: Callable


def decode_attention_via(attention_fn: Callable) -> Callable:
    """`decode_attention` for a backend whose `attention` reads paged keys by row."""
    def decode(q, k_pool, v_pool, sinks, q_pos, block_table, first_page, context_lens, window):
        rows, pos = reference.table_keys(block_table, first_page, context_lens, k_pool.shape[1])
        return attention_fn(q, k_pool.reshape(-1, *k_pool.shape[2:]), v_pool.reshape(-1, *v_pool.shape[2:]),
                            sinks, q_pos, pos, window, rows)
    return decode


REFERENCE = Backend("reference (plain torch)", reference.linear, reference.rms_norm, reference.rotary,
                    reference.linear_int8, reference.quantize_rows_int8, reference.moe_experts,
                    reference.attention, reference.decode_attention)

_chosen: dict[str, Backend] = {}  # device type -> its backend, decided once
_forced: str | None = None


def _cpu_backend() -> Backend:
    return Backend("cpu", cpu.dispatch_linear, cpu.rms_norm, cpu.rotary, cpu.linear_int8,
                   cpu.quantize_rows_int8, cpu.moe_experts, cpu.attention, decode_attention_via(cpu.attention))


def select(device: torch.device | str = "cpu") -> Backend:
    """The backend for `device`'s type: decided on the first call (building the CPU kernels if
    needed), then kept."""
    kind = torch.device(device).type
    backend = _chosen.get(kind)
    if backend is None:
        wanted = _forced or os.environ.get("GPTOSS_KERNELS", "").strip().lower() or "auto"
        if wanted not in ("auto", "reference", "cpu", "triton"):
            log.warning("GPTOSS_KERNELS=%s is not a backend (use 'reference', or leave it unset); "
                        "choosing automatically", wanted)
        if kind == "cuda":
            backend = _chosen[kind] = _gpu_backend(torch.device(device), wanted)
        else:
            fast = kind == "cpu" and wanted != "reference" and cpu.available()
            backend = _chosen[kind] = _cpu_backend() if fast else REFERENCE
    return backend


def _gpu_backend(device: torch.device, wanted: str) -> Backend:
    """The Triton kernels where they run, else the reference path with one line saying why."""
    from gptoss.ops import triton as gpu

    if wanted == "reference":
        return REFERENCE
    reason = gpu.unavailable_reason(device)
    if reason is not None:
        if os.environ.get("GPTOSS_REQUIRE_KERNELS", "").strip() not in ("", "0"):
            raise RuntimeError(f"GPTOSS_REQUIRE_KERNELS is set and the GPU kernels cannot run: {reason}")
        log.warning("GPU kernels off: %s; running the plain-torch reference path on %s (slow)", reason, device)
        return REFERENCE
    return gpu.backend(device)


def use(name: str | None) -> None:
    """Force a backend from now on: "reference", "cpu" (the kernels where they build), or None to
    decide again from GPTOSS_KERNELS."""
    global _forced
    if name not in (None, "reference", "cpu"):
        raise ValueError(f"unknown backend {name!r}: use 'reference', 'cpu' or None")
    _forced = name
    _chosen.clear()


def _for(t: torch.Tensor) -> Backend:
    return _chosen.get(t.device.type) or select(t.device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return _for(x).linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _for(x).rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _for(x).rotary(x, cos, sin)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    return _for(x).linear_int8(x, weight, scale, bias)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _for(weight).quantize_rows_int8(weight)


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights) -> torch.Tensor:
    return _for(x).moe_experts(x, expert_indices, expert_weights, experts)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None, seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    return _for(q).attention(q, k, v, sinks, q_pos, k_pos, window, key_rows, seq_starts)


def decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, sinks: torch.Tensor,
                     q_pos: torch.Tensor, block_table: torch.Tensor, first_page: torch.Tensor,
                     context_lens: torch.Tensor, window: int) -> torch.Tensor:
    return _for(q).decode_attention(q, k_pool, v_pool, sinks, q_pos, block_table, first_page, context_lens, window)


def backend_name(device: torch.device | str = "cpu") -> str:
    """Which implementation runs on `device`'s tensors, for benchmarks and logs."""
    name = select(device).name
    return f"cpu-{cpu.isa()}" if name == "cpu" else name
