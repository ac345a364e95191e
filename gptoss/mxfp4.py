"""MXFP4 (OCP Microscaling v1.0) in the checkpoint's own layout.

Blocks of 32 consecutive values along the last dimension share one E8M0 scale byte
(value 2^(s-127), 0xFF = NaN). Each value is FP4 E2M1, two to a byte: the LOW nibble holds the
even element, the HIGH nibble the odd one. A tensor [..., K] is stored as
`blocks` uint8 [..., K/32, 16] and `scales` uint8 [..., K/32].
"""

from __future__ import annotations

import torch

BLOCK = 32
SCALE_BIAS = 127
SCALE_NAN = 0xFF

# Nibble -> value. Codes 8..15 are the negatives of 0..7 (sign-magnitude).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
E2M1_EMAX = 2  # exponent of the largest E2M1 value (6 = 1.5 * 2^2)

# Rounding |x| to an E2M1 code: each midpoint below is crossed with `>` when the lower code is even
# (a tie stays on the even code) and with `>=` when it is odd (a tie moves up to the even code).
_MIDPOINTS_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_MIDPOINTS_TIE_UP = (0.75, 1.75, 3.5)

RULES = ("floor", "ceil")


def e2m1_lut(dtype=torch.float32, device=None) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def _magnitude_code(a: torch.Tensor) -> torch.Tensor:
    """|x| already divided by the block scale -> E2M1 code 0..7, nearest with ties to even, saturating."""
    code = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    for m in _MIDPOINTS_TIE_DOWN:
        code += (a > m).to(torch.uint8)
    for m in _MIDPOINTS_TIE_UP:
        code += (a >= m).to(torch.uint8)
    return code


def _shared_exponent(amax: torch.Tensor, rule: str) -> torch.Tensor:
    """Block exponent (int32) before clamping to the E8M0 range."""
    if rule == "floor":
        # OCP: floor(log2(amax)) - emax_elem. frexp gives amax = m * 2^e with m in [0.5, 1).
        _, e = torch.frexp(amax)
        return e.to(torch.int32) - 1 - E2M1_EMAX
    if rule == "ceil":
        # triton_kernels: 2^ceil(log2(amax / 6)); never clips the block maximum.
        m, e = torch.frexp(amax / E2M1_MAX)
        return torch.where(m == 0.5, e - 1, e).to(torch.int32)
    raise ValueError(f"unknown MXFP4 scale rule {rule!r}; choose 'floor' (OCP) or 'ceil' (triton_kernels)")


def quantize(x: torch.Tensor, rule: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dimension -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    rule="floor" is the OCP spec rule (the published checkpoints' rule); rule="ceil" is the
    triton_kernels default, which never saturates the block maximum.
    """
    if x.shape[-1] % BLOCK:
        raise ValueError(f"the last dimension ({x.shape[-1]}) must be a multiple of {BLOCK}")
    work_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    xb = x.to(work_dtype).reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    is_nan = torch.isnan(xb)
    block_nan = is_nan.any(dim=-1)
    amax = torch.where(is_nan, 0.0, xb.abs()).amax(dim=-1)
    exponent = _shared_exponent(amax, rule)
    # An all-zero block takes the smallest scale, an infinite one the largest (its values then
    # saturate at +-6); every exponent is clamped to E8M0's range.
    exponent = torch.where(amax == 0, -SCALE_BIAS, exponent)
    exponent = torch.where(torch.isinf(amax), SCALE_BIAS, exponent).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = torch.ldexp(xb.abs(), (-exponent).unsqueeze(-1).to(work_dtype))
    scaled = torch.where(is_nan, 0.0, scaled)
    code = _magnitude_code(scaled) | (torch.signbit(xb).to(torch.uint8) << 3)
    code = torch.where(is_nan, 0, code).to(torch.uint8)
    scales = torch.where(block_nan, SCALE_NAN, exponent + SCALE_BIAS).to(torch.uint8)
    return pack_nibbles(code), scales


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 32] codes 0..15 -> [..., 16] bytes, even element in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes, inverse of pack_nibbles."""
    low = blocks & 0x0F
    high = blocks >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(blocks [..., K/32, 16], scales [..., K/32]) -> tensor [..., K] of `dtype`.

    The reference path: fast kernels read the packed bytes directly and are tested against this.
    """
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
                         "expected [..., K/32, 16] and [..., K/32]")
    work_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    values = e2m1_lut(work_dtype, blocks.device)[unpack_nibbles(blocks).long()]
    exponent = scales.to(torch.int32) - SCALE_BIAS
    out = torch.ldexp(values, exponent.unsqueeze(-1).to(work_dtype))
    out = torch.where((scales == SCALE_NAN).unsqueeze(-1), float("nan"), out)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * BLOCK).to(dtype)
