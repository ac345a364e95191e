"""Fast CPU kernels behind the reference signatures (a C++ extension built on first use).

`kernels.cpp` is compiled by `torch.utils.cpp_extension.load` the first time a kernel is needed,
into `$GPTOSS_CACHE/ext` (default `~/.cache/gptoss/ext`), one folder per source hash and torch
version, and loaded from there afterwards. It picks an instruction set at run time:
avx512bf16 > avx512 > avx2 > scalar; `GPTOSS_CPU_ISA` (or `set_isa`) forces one.

If the build fails (no compiler, no ninja), one warning is logged and every function here falls
back to its plain-torch twin in `gptoss.ops.reference`; with `GPTOSS_REQUIRE_KERNELS=1` (set by
the test suite under CI) the failure is an error instead. Each function also falls back for inputs
it does not handle (non-CPU tensors, dtypes other than float32/bfloat16, autograd).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

from gptoss.ops import reference
from gptoss.ops.reference import ExpertWeights

log = logging.getLogger("gptoss")

_SOURCE = Path(__file__).with_name("kernels.cpp")
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_FLOAT_TYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_ext = None
_error: str | None = None

def cache_dir() -> Path:
    """Where compiled kernels live: $GPTOSS_CACHE/ext, else ~/.cache/gptoss/ext (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("GPTOSS_CACHE")
    if root:
        return Path(root).expanduser() / "ext"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "gptoss" / "ext"


def _build_folder() -> tuple[str, Path]:
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_CFLAGS + _LDFLAGS).encode()).hexdigest()[:12]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}"
    name = f"gptoss_cpu_{digest}"
    return name, cache_dir() / tag / name


def _apply_env(setter, variable: str) -> None:
    """Pass an environment setting to the extension; a bad value is ignored with one warning."""
    value = os.environ.get(variable, "").strip().lower()
    if value:
        try:
            setter(value)
        except RuntimeError as e:
            log.warning("%s=%s ignored: %s", variable, value, str(e).splitlines()[0])


def _load():
    """Build (first use) and import the extension; on failure remember why and warn once."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is not None or _error is not None:
            return _ext
        try:
            from torch.utils import cpp_extension

            name, folder = _build_folder()
            folder.mkdir(parents=True, exist_ok=True)
            fresh = not any(folder.glob(f"{name}*.so"))
            if fresh:
                print("building gptoss CPU kernels (first use)…", file=sys.stderr, flush=True)
            start = time.perf_counter()
            ext = cpp_extension.load(name=name, sources=[str(_SOURCE)], extra_cflags=_CFLAGS,
                                     extra_ldflags=_LDFLAGS, build_directory=str(folder), verbose=False)
            if fresh:
                log.info("built gptoss CPU kernels in %.1f s (%s)", time.perf_counter() - start, folder)
            _apply_env(ext.set_int8_activations, "GPTOSS_INT8_ACTIVATIONS")
            _apply_env(ext.set_isa, "GPTOSS_CPU_ISA")
            _ext = ext
        except Exception as e:  # no compiler, no ninja, a compile error: keep working without
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            _error = f"{type(e).__name__}: {lines[-1] if lines else e}"
            if os.environ.get("GPTOSS_REQUIRE_KERNELS", "").strip() not in ("", "0"):
                raise RuntimeError(f"GPTOSS_REQUIRE_KERNELS is set and the gptoss CPU kernels are "
                                   f"unavailable: {_error}") from e
            log.warning("gptoss CPU kernels unavailable (%s); using the plain-torch reference", _error)
    return _ext


def _required():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"gptoss CPU kernels are unavailable: {_error}")
    return ext


def available() -> bool:
    """True when the extension is built and loaded (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def isa() -> str:
    """The instruction-set path in use: avx512bf16, avx512, avx2, scalar, or 'reference' without the extension."""
    ext = _load()
    return ext.get_isa() if ext is not None else "reference"


def supported_isas() -> list[str]:
    """The paths this CPU can run, best first (empty without the extension)."""
    ext = _load()
    return list(ext.supported_isas()) if ext is not None else []


def set_isa(name: str) -> None:
    """Force a path (avx512bf16, avx512, avx2, scalar); raises if this CPU lacks it."""
    _required().set_isa(name)


def int8_activations() -> str:
    """When the experts round their activations to int8 (see kernels.cpp): never, bf16 or always."""
    ext = _load()
    return ext.get_int8_activations() if ext is not None else "never"


def set_int8_activations(mode: str) -> None:
    """never: exact fp32 activations; bf16 (default): for bfloat16 inputs; always: also for float32."""
    _required().set_int8_activations(mode)


def int8_activations_supported() -> bool:
    """True when this CPU has AVX-512 VNNI and VBMI and an avx512 path is in use (not forced to avx2/scalar)."""
    ext = _load()
    return ext is not None and ext.int8_activations_supported()


def _plain(*tensors: torch.Tensor | None) -> bool:
    """All on the CPU, and no gradient to track."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or (grad and t.requires_grad)):
            return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b; a bandwidth-bound GEMV for few rows, a register-blocked product otherwise."""
    ext = _load()
    if (ext is None or not _plain(x, weight, bias) or weight.dim() != 2 or x.dim() == 0
            or x.dtype != weight.dtype or x.dtype not in _FLOAT_TYPES or x.shape[-1] != weight.shape[1]):
        return reference.linear(x, weight, bias)
    return ext.linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ext = _load()
    if (ext is None or not _plain(x, weight) or x.dim() == 0 or x.dtype not in _FLOAT_TYPES
            or weight.dtype not in _FLOAT_TYPES or weight.shape != x.shape[-1:]):
        return reference.rms_norm(x, weight, eps)
    return ext.rms_norm(x, weight, float(eps))


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    ext = _load()
    b, t = (x.shape[0], x.shape[1]) if x.dim() == 4 else (0, 0)
    if (ext is None or not _plain(x, cos, sin) or x.dim() != 4 or x.dtype not in _FLOAT_TYPES or x.shape[3] % 2
            or cos.shape != (b, t, 1, x.shape[3] // 2) or sin.shape != cos.shape):
        return reference.rotary(x, cos, sin)
    return ext.rotary(x, cos, sin)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The --dense-int8 product: VNNI matrix-vector for few rows, widened tiles otherwise."""
    ext = _load()
    if (ext is None or not _plain(x, weight, scale, bias) or x.dim() == 0 or x.dtype not in _FLOAT_TYPES
            or weight.dtype != torch.uint8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or weight.shape[1] % 32 != 0):
        return reference.linear_int8(x, weight, scale, bias)
    return ext.linear_int8(x, weight, scale, bias)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's quantize_rows_int8, in parallel C++ (the lm_head of the 20b has 579 M weights)."""
    ext = _load()
    if ext is None or not _plain(weight) or weight.dim() != 2:
        return reference.quantize_rows_int8(weight)
    q, scale = ext.quantize_rows_int8(weight)
    return q, scale


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights) -> torch.Tensor:
    """The reference's experts, reading MXFP4 straight from the packed bytes (float experts, which
    only fine-tunes and training use, run the reference)."""
    ext = _load()
    if not experts.is_mxfp4:
        return reference.moe_experts(x, expert_indices, expert_weights, experts)
    tensors = (x, expert_indices, expert_weights, experts.gate_up_blocks, experts.gate_up_scales,
               experts.gate_up_bias, experts.down_blocks, experts.down_scales, experts.down_bias)
    if ext is None or not _plain(*tensors) or x.dim() != 2 or x.dtype not in _FLOAT_TYPES:
        return reference.moe_experts(x, expert_indices, expert_weights, experts)
    return ext.moe_experts(x, expert_indices, expert_weights, experts.gate_up_blocks, experts.gate_up_scales,
                           experts.gate_up_bias, experts.down_blocks, experts.down_scales, experts.down_bias,
                           float(experts.swiglu_limit))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with sinks, GQA and sliding window; per query over its visible keys (decode and prefill).

    With `key_rows`, the keys are read in place from a paged cache (see the reference)."""
    ext = _load()
    if (ext is None or not _plain(q, k, v, sinks, q_pos, k_pos) or q.dim() != 4 or q.dtype not in _FLOAT_TYPES
            or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[2] % k.shape[-2] != 0):
        return reference.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows)
    return ext.attention(q, k, v, sinks, q_pos, k_pos, int(window), key_rows)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernels' MXFP4 decoder (what prefill tiles use), for tests against gptoss.mxfp4.dequantize."""
    ext = _load()
    if ext is None or dtype not in _FLOAT_TYPES:
        from gptoss import mxfp4
        return mxfp4.dequantize(blocks, scales, dtype)
    return ext.mxfp4_dequantize(blocks, scales, dtype == torch.bfloat16)


def read_probe(t: torch.Tensor) -> int:
    """Read every byte of `t` once as fast as the CPU can (for measuring memory bandwidth)."""
    ext = _load()
    if ext is None:
        return int(t.view(torch.uint8).sum())
    return ext.read_probe(t)
