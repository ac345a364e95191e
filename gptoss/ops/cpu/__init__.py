"""Fast CPU kernels behind the reference signatures: a plain C++ library called through ctypes.

`kernels.cpp` does not include torch: it exports C functions that take raw pointers, so it is
compiled once when gptoss is installed (`setup.py`, into this folder as `_kernels*.so`) and one
build serves every torch version. This module checks shapes and dtypes, makes the inputs
contiguous, allocates the outputs with torch, and passes pointers. The library picks an
instruction set at run time (avx512bf16 > avx512 > avx2 > scalar); `GPTOSS_CPU_ISA` (or
`set_isa`) forces one.

Where the installed library is missing or was built from another source (a source checkout whose
kernels.cpp changed), it is compiled into `$GPTOSS_CACHE/ext` (default `~/.cache/gptoss/ext`) by
the system C++ compiler (`$CXX`, else c++), about 10 s. `GPTOSS_KERNELS_LIBRARY=PATH` loads that
file instead; `=build` always compiles. If nothing loads, one warning is logged and every function
here runs its plain-torch twin in `gptoss.ops.reference`; with `GPTOSS_REQUIRE_KERNELS=1` (set by
the test suite under CI) that is an error instead. Each function also hands inputs it does not
handle (non-CPU tensors, dtypes other than float32/bfloat16, autograd) to its twin.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
from ctypes import c_float, c_int, c_int64, c_void_p
from pathlib import Path

import torch

from gptoss.ops import reference
from gptoss.ops.cpu.build import compile_library, source_hash
from gptoss.ops.reference import ExpertWeights

log = logging.getLogger("gptoss")

HERE = Path(__file__).resolve().parent
ABI_VERSION = 4
ISAS = ("scalar", "avx2", "avx512", "avx512bf16")  # the library's Isa enum, in order
INT8_MODES = ("never", "bf16", "always")
LIBRARY_NAME = "_kernels.so"  # what setup.py installs beside this file
_FLOAT_TYPES = (torch.float32, torch.bfloat16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_origin: str | None = None  # where the loaded library came from


def cache_dir() -> Path:
    """Where fallback builds live: the `ext` folder of gptoss's cache (gptoss.cache.cache_root)."""
    from gptoss.cache import cache_root

    return cache_root() / "ext"


def _installed_library() -> Path | None:
    path = HERE / LIBRARY_NAME
    return path if path.exists() else None


def _open(path: Path) -> ctypes.CDLL:
    """Load the library and check its interface version (its functions are declared once the
    caller knows it was built from this source). torch, imported above, has loaded its OpenMP
    runtime already, so the library shares it."""
    lib = ctypes.CDLL(str(path))
    if lib.gptoss_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has interface version {lib.gptoss_abi_version()}, this gptoss needs {ABI_VERSION}")
    lib.gptoss_source_hash.restype = ctypes.c_char_p
    lib.gptoss_last_error.restype = ctypes.c_char_p
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    p, i, i64, f = c_void_p, c_int, c_int64, c_float
    signatures = {
        "gptoss_linear": [p, p, i, p, i, i64, i64, i64, p, i, i],
        "gptoss_linear_int8": [p, i, p, p, i64, i64, i64, p, i],
        "gptoss_quantize_rows_int8": [p, i, i64, i64, p, p, i],
        "gptoss_rms_norm": [p, i, p, i, p, i64, i64, f, i],
        "gptoss_rotary": [p, i, p, p, p, i64, i64, i64, i],
        "gptoss_attention": [p, p, p, i, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, p, i],
        "gptoss_moe_experts": [p, i, p, p, i64, i64, p, p, p, p, p, p, i, i64, i64, i64, f, p, i],
        "gptoss_mxfp4_dequantize": [p, p, i64, i64, p, p, i],
        "gptoss_read_probe": [p, i64, i],
        "gptoss_set_isa": [i],
        "gptoss_set_int8_activations": [i],
        "gptoss_use_avx_vnni": [i],
        "gptoss_use_amx": [i],
        "gptoss_use_gemv_side_by_side": [i],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
    lib.gptoss_read_probe.restype = i64


def _find_and_open() -> tuple[ctypes.CDLL, str]:
    wanted = os.environ.get("GPTOSS_KERNELS_LIBRARY", "").strip()
    if wanted and wanted != "build":
        return _open(Path(wanted)), wanted
    tag = source_hash()
    installed = _installed_library()
    if installed is not None and wanted != "build":
        lib = _open(installed)
        if lib.gptoss_source_hash().decode() == tag:
            return lib, str(installed)
        log.info("the installed CPU kernels were built from another kernels.cpp; building this one")
    built = cache_dir() / f"gptoss_kernels_{tag}.so"
    if not built.exists():
        print("building gptoss CPU kernels (about 10 s, once)…", file=sys.stderr, flush=True)
        start = time.perf_counter()
        compile_library(built)
        log.info("built gptoss CPU kernels in %.1f s (%s)", time.perf_counter() - start, built)
    return _open(built), str(built)


def _apply_env(setter, variable: str) -> None:
    """Pass an environment setting to the library; a bad value is ignored with one warning."""
    value = os.environ.get(variable, "").strip().lower()
    if value:
        try:
            setter(value)
        except RuntimeError as e:
            log.warning("%s=%s ignored: %s", variable, value, str(e).splitlines()[0])


def _load() -> ctypes.CDLL | None:
    """Load the library (building it if needed); on failure remember why and warn once."""
    global _lib, _error, _origin
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is not None or _error is not None:
            return _lib
        try:
            lib, origin = _find_and_open()
            _declare(lib)
            _lib, _origin = lib, origin
        except Exception as e:  # no compiler, a compile error, a broken file: keep working without
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            _error = f"{type(e).__name__}: {lines[-1] if lines else e}"
            if os.environ.get("GPTOSS_REQUIRE_KERNELS", "").strip() not in ("", "0"):
                raise RuntimeError(f"GPTOSS_REQUIRE_KERNELS is set and the gptoss CPU kernels are "
                                   f"unavailable: {_error}") from e
            log.warning("gptoss CPU kernels unavailable (%s); using the plain-torch reference", _error)
            return None
        _apply_env(set_int8_activations, "GPTOSS_INT8_ACTIVATIONS")
        _apply_env(set_isa, "GPTOSS_CPU_ISA")
    return _lib


def _required() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"gptoss CPU kernels are unavailable: {_error}")
    return lib


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(_lib.gptoss_last_error().decode())


def available() -> bool:
    """True when the library is loaded (building it if needed)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _error


def library_path() -> str | None:
    """The file the kernels were loaded from (the installed library, or a build in the cache)."""
    _load()
    return _origin


def isa() -> str:
    """The instruction-set path in use: avx512bf16, avx512, avx2, scalar, or 'reference' without the library."""
    lib = _load()
    return ISAS[lib.gptoss_get_isa()] if lib is not None else "reference"


def supported_isas() -> list[str]:
    """The paths this CPU can run, best first (empty without the library)."""
    lib = _load()
    return list(reversed(ISAS[:lib.gptoss_best_isa() + 1])) if lib is not None else []


def set_isa(name: str) -> None:
    """Force a path (avx512bf16, avx512, avx2, scalar); raises if this CPU lacks it."""
    lib = _required()
    if name not in ISAS:
        raise RuntimeError(f"gptoss CPU kernels: unknown ISA {name!r}; choose avx512bf16, avx512, avx2 or scalar")
    if lib.gptoss_set_isa(ISAS.index(name)) != 0:
        raise RuntimeError(f"gptoss CPU kernels: this CPU does not support the {name!r} path "
                           f"(best: {ISAS[lib.gptoss_best_isa()]})")


def int8_activations() -> str:
    """When the experts round their activations to int8 (see kernels.cpp): never, bf16 or always."""
    lib = _load()
    return INT8_MODES[lib.gptoss_get_int8_activations()] if lib is not None else "never"


def set_int8_activations(mode: str) -> None:
    """never: exact fp32 activations; bf16 (default): for bfloat16 inputs; always: also for float32."""
    lib = _required()
    if mode not in INT8_MODES:
        raise RuntimeError(f"int8 activations: unknown mode {mode!r}; choose never, bf16 or always")
    lib.gptoss_set_int8_activations(INT8_MODES.index(mode))


INT8_KERNELS = ("none", "avx2", "avx-vnni", "avx512-vnni")


def int8_kernels() -> str:
    """The int8 expert kernels the current path runs: avx512-vnni (VNNI + VBMI), avx-vnni, avx2
    (vpmaddubsw), or none (scalar path, or no library)."""
    lib = _load()
    return INT8_KERNELS[lib.gptoss_int8_kernels()] if lib is not None else "none"


def int8_activations_supported() -> bool:
    """True when the current path has int8 expert kernels (AVX2 or better)."""
    return int8_kernels() != "none"


def dense_int8_supported() -> bool:
    """True when --dense-int8 has its kernels: AVX-512 VNNI and VBMI on an avx512 path."""
    return int8_kernels() == "avx512-vnni"


def use_avx_vnni(on: bool) -> None:
    """Let the avx2 path use AVX-VNNI where the CPU has it (the default), or not (tests)."""
    _required().gptoss_use_avx_vnni(int(on))


def has_avx_vnni() -> bool:
    lib = _load()
    return lib is not None and bool(lib.gptoss_has_avx_vnni())


def has_amx() -> bool:
    """The kernels can use the AMX tiles here (the CPU has AMX-INT8 and the OS granted the state)."""
    lib = _load()
    return lib is not None and bool(lib.gptoss_has_amx())


def use_amx(on: bool) -> None:
    """Take the prefill int8 tiles' block sums on AMX where the CPU has it (the default), or on
    the vector units (tests; the results are the same)."""
    _required().gptoss_use_amx(int(on))


def gemv_side_by_side() -> bool:
    """A decode step's bf16 GEMV reads 16 weight rows side by side (the default on Intel CPUs,
    where more streams read faster) rather than one row at a time with a prefetch ahead."""
    lib = _load()
    return lib is not None and bool(lib.gptoss_gemv_side_by_side())


def use_gemv_side_by_side(on: bool) -> None:
    _required().gptoss_use_gemv_side_by_side(int(on))


def has_vnni_vbmi() -> bool:
    lib = _load()
    return lib is not None and bool(lib.gptoss_has_vnni_vbmi())


_amx_bf16: bool | None = None


def has_amx_bf16() -> bool:
    """The CPU multiplies bf16 on AMX tiles (Sapphire Rapids and later Xeons), which torch's
    oneDNN matmul uses: read from /proc/cpuinfo (Linux), False elsewhere."""
    global _amx_bf16
    if _amx_bf16 is None:
        try:
            lines = Path("/proc/cpuinfo").read_text().splitlines()
            flags = next((line for line in lines if line.startswith("flags")), "")
        except OSError:
            flags = ""
        _amx_bf16 = "amx_bf16" in flags.split()
    return _amx_bf16


# Products torch's matmul runs faster than the kernels, by rows (all leading dimensions together):
# - fp32 with more than 8 rows: torch's BLAS (the kernels' fp32 tiles measured 1.1-1.2x faster at
#   9-64 rows of the 20b's q_proj and 1.3-1.6x slower at 128-512; fp32 is the exactness path, so the
#   older rule stays until its prefill is measured end to end).
# - bf16 from 6 rows on a CPU with AMX-BF16: oneDNN multiplies on the AMX tiles. On a 2-core Xeon
#   with AMX, the 20b's q_proj: 1-4 rows 1.25x faster in the kernels, 6 rows 1.06x, 8 rows 1.28x,
#   16 rows 1.9x and 512 rows 9.6x faster in torch (benchmarks/cpu_kernels.py, the q_proj rows,
#   whose reference is torch's matmul).
# Fewer rows stay in the kernels' streaming GEMV, which reads the weights at the memory's speed.
FP32_MATMUL_MIN_ROWS = 9
AMX_MATMUL_MIN_ROWS = 6


def _torch_is_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if x.dim() == 0 or x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    if x.dtype == torch.float32:
        return rows >= FP32_MATMUL_MIN_ROWS
    return x.dtype == torch.bfloat16 and rows >= AMX_MATMUL_MIN_ROWS and has_amx_bf16()


def dispatch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The model's `linear`: the kernels, except the many-row products torch runs faster (above),
    which it computes as the reference does: fp32 sums, rounded once to the dtype."""
    if _torch_is_faster(x, weight, bias):
        return reference.linear(x, weight, bias)
    return linear(x, weight, bias)


# -- the ops ---------------------------------------------------------------------------------------

def _plain(*tensors: torch.Tensor | None) -> bool:
    """All on the CPU, and no gradient to track."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (not t.is_cpu or (grad and t.requires_grad)):
            return False
    return True


def _threads() -> int:
    return torch.get_num_threads()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in the kernels, for every shape: a bandwidth-bound GEMV for few rows, a
    register-blocked product otherwise (the model calls `dispatch_linear`)."""
    lib = _load()
    if (lib is None or not _plain(x, weight, bias) or weight.dim() != 2 or x.dim() == 0
            or x.dtype != weight.dtype or x.dtype not in _FLOAT_TYPES or x.shape[-1] != weight.shape[1]):
        return reference.linear(x, weight, bias)
    n, k = weight.shape
    if bias is not None and bias.numel() != n:
        raise RuntimeError(f"linear: bias has {bias.numel()} elements, expected {n}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous() if bias.dtype in _FLOAT_TYPES else bias.float().contiguous()
    out = torch.empty(m, n, dtype=x.dtype)  # summed in fp32, rounded once by the kernel
    lib.gptoss_linear(x2.data_ptr(), w.data_ptr(), int(x.dtype == torch.bfloat16),
                      b.data_ptr() if b is not None else None, int(b is not None and b.dtype == torch.bfloat16),
                      m, n, k, out.data_ptr(), int(x.dtype == torch.bfloat16), _threads())
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    lib = _load()
    if (lib is None or not _plain(x, weight) or x.dim() == 0 or x.dtype not in _FLOAT_TYPES
            or weight.dtype not in _FLOAT_TYPES or weight.shape != x.shape[-1:]):
        return reference.rms_norm(x, weight, eps)
    x, w = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    d = x.shape[-1]
    lib.gptoss_rms_norm(x.data_ptr(), int(x.dtype == torch.bfloat16), w.data_ptr(), int(w.dtype == torch.bfloat16),
                        out.data_ptr(), x.numel() // d if d else 0, d, float(eps), _threads())
    return out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    lib = _load()
    b, t = (x.shape[0], x.shape[1]) if x.dim() == 4 else (0, 0)
    if (lib is None or not _plain(x, cos, sin) or x.dim() != 4 or x.dtype not in _FLOAT_TYPES or x.shape[3] % 2
            or cos.shape != (b, t, 1, x.shape[3] // 2) or sin.shape != cos.shape):
        return reference.rotary(x, cos, sin)
    x = x.contiguous()
    c, s = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty_like(x)
    lib.gptoss_rotary(x.data_ptr(), int(x.dtype == torch.bfloat16), c.data_ptr(), s.data_ptr(), out.data_ptr(),
                      b * t, x.shape[2], x.shape[3], _threads())
    return out


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The --dense-int8 product: VNNI matrix-vector for few rows, widened tiles otherwise."""
    lib = _load()
    if (lib is None or not _plain(x, weight, scale, bias) or x.dim() == 0 or x.dtype not in _FLOAT_TYPES
            or weight.dtype != torch.uint8 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]
            or weight.shape[1] % 32 != 0):
        return reference.linear_int8(x, weight, scale, bias)
    n, k = weight.shape
    if scale.numel() != n:
        raise RuntimeError("linear_int8: one scale per row expected")
    x2 = x.reshape(-1, k).contiguous()
    w, s = weight.contiguous(), scale.float().contiguous()
    out = torch.empty(x2.shape[0], n, dtype=torch.float32)
    lib.gptoss_linear_int8(x2.data_ptr(), int(x.dtype == torch.bfloat16), w.data_ptr(), s.data_ptr(), x2.shape[0],
                           n, k, out.data_ptr(), _threads())
    if bias is not None:
        if bias.numel() != n:
            raise RuntimeError(f"linear_int8: bias has {bias.numel()} elements, expected {n}")
        out.add_(bias.float().view(1, n))
    return out.to(x.dtype).view(*x.shape[:-1], n)


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's quantize_rows_int8, in parallel C++ (the lm_head of the 20b has 579 M weights)."""
    lib = _load()
    if lib is None or not _plain(weight) or weight.dim() != 2 or weight.dtype not in _FLOAT_TYPES:
        return reference.quantize_rows_int8(weight)
    w = weight.contiguous()
    n, k = w.shape
    q, scale = torch.empty(n, k, dtype=torch.uint8), torch.empty(n, dtype=torch.float32)
    lib.gptoss_quantize_rows_int8(w.data_ptr(), int(w.dtype == torch.bfloat16), n, k, q.data_ptr(), scale.data_ptr(),
                                  _threads())
    if not bool(scale.isfinite().all()):
        raise RuntimeError("quantize_rows_int8: the weight has non-finite values")
    return q, scale


def moe_experts(x: torch.Tensor, expert_indices: torch.Tensor, expert_weights: torch.Tensor,
                experts: ExpertWeights) -> torch.Tensor:
    """The reference's experts, reading MXFP4 straight from the packed bytes (float experts, which
    only fine-tunes and training use, run the reference)."""
    lib = _load()
    if not experts.is_mxfp4:
        return reference.moe_experts(x, expert_indices, expert_weights, experts)
    e = experts
    tensors = (x, expert_indices, expert_weights, e.gate_up_blocks, e.gate_up_scales, e.gate_up_bias, e.down_blocks,
               e.down_scales, e.down_bias)
    if (lib is None or not _plain(*tensors) or x.dim() != 2 or x.dtype not in _FLOAT_TYPES
            or e.gate_up_bias.dtype not in _FLOAT_TYPES or e.down_bias.dtype != e.gate_up_bias.dtype):
        return reference.moe_experts(x, expert_indices, expert_weights, experts)
    n, h = x.shape
    if e.gate_up_blocks.dtype != torch.uint8 or e.down_blocks.dtype != torch.uint8 \
            or e.gate_up_scales.dtype != torch.uint8 or e.down_scales.dtype != torch.uint8:
        raise RuntimeError("moe_experts: MXFP4 blocks and scales must be uint8")
    gub = e.gate_up_blocks
    if gub.dim() != 4 or gub.shape[2] * 32 != h or gub.shape[3] != 16:
        raise RuntimeError(f"moe_experts: gate_up_blocks must be [E, 2I, H/32, 16] with H = {h}")
    n_experts, i2 = gub.shape[0], gub.shape[1]
    dnb = e.down_blocks
    if dnb.dim() != 4 or dnb.shape[0] != n_experts or dnb.shape[1] != h or dnb.shape[2] * 32 != i2 // 2 \
            or dnb.shape[3] != 16:
        raise RuntimeError("moe_experts: down_blocks must be [E, H, I/32, 16]")
    if e.gate_up_scales.numel() * 16 != gub.numel() or e.down_scales.numel() * 16 != dnb.numel():
        raise RuntimeError("moe_experts: scales do not match the blocks")
    if e.gate_up_bias.numel() != n_experts * i2 or e.down_bias.numel() != n_experts * h:
        raise RuntimeError("moe_experts: bias shapes do not match")
    if expert_indices.dim() != 2 or expert_indices.shape[0] != n or expert_weights.shape != expert_indices.shape:
        raise RuntimeError("moe_experts: expert_indices and expert_weights must be [N, k]")
    topk = expert_indices.shape[1]
    out = torch.zeros(n, h, dtype=torch.float32)
    if n and topk:
        x = x.contiguous()
        idx, wts = expert_indices.long().contiguous(), expert_weights.float().contiguous()
        parts = [t.contiguous() for t in (gub, e.gate_up_scales, e.gate_up_bias, dnb, e.down_scales, e.down_bias)]
        _check(lib.gptoss_moe_experts(
            x.data_ptr(), int(x.dtype == torch.bfloat16), idx.data_ptr(), wts.data_ptr(), n, topk,
            *(t.data_ptr() for t in parts[:3]), *(t.data_ptr() for t in parts[3:]),
            int(e.gate_up_bias.dtype == torch.bfloat16), n_experts, i2, h, float(e.swiglu_limit), out.data_ptr(),
            _threads()))
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
              q_pos: torch.Tensor, k_pos: torch.Tensor, window: int,
              key_rows: torch.Tensor | None = None, seq_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with sinks, GQA and sliding window; per query over its visible keys (decode and prefill).

    With `key_rows`, the keys are read in place from a paged cache (see the reference)."""
    lib = _load()
    if (lib is None or not _plain(q, k, v, sinks, q_pos, k_pos) or q.dim() != 4 or q.dtype not in _FLOAT_TYPES
            or k.dtype != q.dtype or v.dtype != q.dtype or k.dim() < 3 or q.shape[2] % k.shape[-2] != 0):
        return reference.attention(q, k, v, sinks, q_pos, k_pos, window, key_rows)
    b, tq, hq, d = q.shape
    paged = key_rows is not None
    if v.shape != k.shape or k.shape[-1] != d:
        raise RuntimeError("attention: k and v must be [B, S, H, D] (or a flat [..., H, D] cache with key_rows) "
                           "with q's head dim")
    if k_pos.dim() != 2 or k_pos.shape[0] != b or q_pos.shape != (b, tq):
        raise RuntimeError("attention: q_pos must be [B, T] and k_pos [B, S]")
    if not paged and (k.dim() != 4 or k.shape[0] != b or k.shape[1] != k_pos.shape[1]):
        raise RuntimeError("attention: k must be [B, S, H, D]")
    hkv = k.shape[-2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    qp, kp = q_pos.long().contiguous(), k_pos.long().contiguous()
    rows = key_rows.long().contiguous() if paged else None
    if paged and rows.shape != kp.shape:
        raise RuntimeError("attention: key_rows must be shaped like k_pos")
    s = sinks.float().contiguous()
    out = torch.empty(b, tq, hq, d, dtype=torch.float32)
    _check(lib.gptoss_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), int(q.dtype == torch.bfloat16), s.data_ptr(),
                                qp.data_ptr(), kp.data_ptr(), rows.data_ptr() if paged else None,
                                k.numel() // (hkv * d), b, tq, hq, d, kp.shape[1], hkv, int(window), out.data_ptr(),
                                _threads()))
    return out.to(q.dtype)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The kernels' MXFP4 decoder (what prefill tiles use), for tests against gptoss.mxfp4.dequantize."""
    lib = _load()
    if lib is None or dtype not in _FLOAT_TYPES:
        from gptoss import mxfp4
        return mxfp4.dequantize(blocks, scales, dtype)
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise RuntimeError("blocks/scales must be uint8")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or scales.numel() * 16 != blocks.numel():
        raise RuntimeError("blocks must be [..., K/32, 16] with one scale per block")
    blocks, scales = blocks.contiguous(), scales.contiguous()
    nblk = blocks.shape[-2]
    rows = scales.numel() // max(nblk, 1)
    out32 = torch.empty(rows, nblk * 32, dtype=torch.float32)
    out16 = torch.empty(rows, nblk * 32, dtype=torch.bfloat16) if dtype == torch.bfloat16 else None
    lib.gptoss_mxfp4_dequantize(blocks.data_ptr(), scales.data_ptr(), rows, nblk, out32.data_ptr(),
                                out16.data_ptr() if out16 is not None else None, _threads())
    return (out16 if out16 is not None else out32).view(*scales.shape[:-1], nblk * 32)


def read_probe(t: torch.Tensor) -> int:
    """Read every byte of `t` once as fast as the CPU can (for measuring memory bandwidth)."""
    lib = _load()
    if lib is None:
        return int(t.view(torch.uint8).sum())
    t = t.contiguous()
    return int(lib.gptoss_read_probe(t.data_ptr(), t.numel() * t.element_size(), _threads()))


__all__ = ["available", "unavailable_reason", "library_path", "isa", "supported_isas", "set_isa", "int8_activations",
           "set_int8_activations", "int8_activations_supported", "int8_kernels", "dense_int8_supported",
           "use_avx_vnni", "has_avx_vnni", "has_vnni_vbmi", "has_amx_bf16", "has_amx", "use_amx", "gemv_side_by_side",
           "use_gemv_side_by_side", "dispatch_linear",
           "linear", "rms_norm", "rotary", "linear_int8", "quantize_rows_int8", "moe_experts", "attention",
           "mxfp4_dequantize", "read_probe", "compile_library", "source_hash", "cache_dir"]
