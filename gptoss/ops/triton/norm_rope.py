"""RMSNorm and rotary embedding as one kernel each: a decode step runs 2 x layers of each, and
as torch ops each is several launches (casts, mean, rsqrt, products; chunk, cat) on tiny tensors."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, eps, stride_x, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (x * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference `rms_norm` (fp32 inside)."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, hidden, eps, rows.stride(0), out.stride(0),
                                           BLOCK=triton.next_power_of_2(hidden))
    return out.view(x.shape)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                   HALF: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    base = x_ptr + token * stride_xt + head * stride_xh
    x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + token * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_ct + i, mask=mask, other=0.0).to(tl.float32)
    out = out_ptr + token * stride_ot + head * stride_oh
    tl.store(out + i, (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF + i, (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference `rotary`: x [B, T, H, D], cos/sin [B, T, 1, D/2]."""
    from gptoss.ops import reference

    b, t, heads, d = x.shape
    if cos.shape != (b, t, 1, d // 2) or x.stride(-1) != 1:
        return reference.rotary(x, cos, sin)
    flat = x.reshape(b * t, heads, d)
    cos2, sin2 = cos.reshape(b * t, d // 2).contiguous(), sin.reshape(b * t, d // 2).contiguous()
    out = torch.empty(b * t, heads, d, dtype=x.dtype, device=x.device)
    if b * t:
        _rotary_kernel[(b * t, heads)](flat, cos2, sin2, out, heads, flat.stride(0), flat.stride(1), cos2.stride(0),
                                       out.stride(0), out.stride(1), HALF=d // 2,
                                       BLOCK=triton.next_power_of_2(d // 2))
    return out.view(x.shape)
